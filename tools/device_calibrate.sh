#!/usr/bin/env bash
# On the device machine:
# SmolLM2-135M calibrated on the GPU, each stage timed. Needs /tmp/smol.gguf
# (sent in two parts, see DEVELOPERS.md) and the binaries in .devcarry/.
# How it ran on 2026-12-07: here, `(cd .devparts && split -n 2 -d
# ../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smol.)` and
# `tar -cJf .devparts/devcarry.tar.xz --exclude=.devcarry/shared/models .devcarry`;
# call 1 carries smol.00 + devcarry.tar.xz (`tar -xJf`, `cp .devparts/smol.00
# /tmp/`, then the tests and tools/device_finetune_bench.sh), call 2, at once
# while the machine is warm, carries smol.01 + devcarry.tar.xz:
# `cat /tmp/smol.00 .devparts/smol.01 > /tmp/smol.gguf` and this script.
# The paper's settings for budget 4: SAMPLES=1000 EPOCHS=5 BUDGET=4
# TARGETS=3.25,3.5,3.75 CAL_ARGS=--tf32 (315 s on an H100).
# Stages already done on this machine (/tmp) are reused, so a long run can be
# split over calls while the machine stays warm.
#   SENS_SAMPLES (100), SAMPLES (fine-tuning sequences, 64), EPOCHS (1),
#   BUDGET (4), TARGETS (3.5), EST (estimator sequences, 40), JL_STEPS (2000),
#   CAL_ARGS (more calibrate arguments, e.g. --tf32)
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
D=.devcarry/dpllm
V=.devcarry/shared/data/wikitext-2/valid.txt
[ -f /tmp/smol.gguf ] || { echo "no /tmp/smol.gguf: send .devparts first"; exit 1; }
timed() {  # timed NAME CMD...: wall seconds appended to $OUT/calibrate-times.txt
    local name=$1
    shift
    local t0=$(date +%s%N)
    "$@"
    local rc=$?
    echo "$name $(( ($(date +%s%N) - t0) / 1000000 )) ms rc=$rc" | tee -a "$OUT/calibrate-times.txt"
    return $rc
}
if [ ! -f /tmp/smol-sens.safetensors ]; then
    timed sensitivity "$D" sensitivity /tmp/smol.gguf --device cuda --calib "$V" \
        --samples "${SENS_SAMPLES:-100}" --seq-len 512 --out /tmp/smol-sens.safetensors 2>&1 | tail -2
fi
if [ ! -f /tmp/smol-ap/config.json ]; then
    timed quantize "$D" quantize /tmp/smol.gguf --out /tmp/smol-ap \
        --sensitivity /tmp/smol-sens.safetensors 2>&1 | tail -2
fi
timed "calibrate-b${BUDGET:-4}-t${TARGETS:-3.5}-s${SAMPLES:-64}-e${EPOCHS:-1}${CAL_ARGS:+ ${CAL_ARGS}}" \
    "$D" calibrate ${CAL_ARGS:-} /tmp/smol-ap --device cuda --budget "${BUDGET:-4}" --targets "${TARGETS:-3.5}" \
    --calib "$V" --samples "${SAMPLES:-64}" --seq-len 512 --epochs "${EPOCHS:-1}" \
    --estimator-samples "${EST:-40}" --jl-steps "${JL_STEPS:-2000}" --force 2>&1 |
    grep -v "\[" | tee -a "$OUT/calibrate-smol.txt"
