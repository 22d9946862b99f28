#!/usr/bin/env bash
# On the device machine, with .devcarry/ (dpllm and docs-llama-12m): the
# fine-tuning step on random weights of SmolLM2's and Llama-3-8B's shapes
# (f32 and TF32), an op-by-op profile of it, and calibrate --device cuda on
# docs-llama-12m with stage times. Results under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
D=.devcarry/dpllm
# f32 and TF32 products; the precisions as f32 copies or read from the planes.
for lv in f32 planes; do
    for t in --tf32 ""; do
        "$D" bench finetune --device cuda --steps 8 $t --levels $lv --json "$OUT/bench-ft-smol-$lv$t.json"
    done
done
for lv in f32 planes; do
    DPLLM_PROFILE=1 "$D" bench finetune --device cuda --steps 4 --tf32 --levels $lv 2>&1 |
        tail -40 > "$OUT/profile-smol-tf32-$lv.txt"
    cat "$OUT/profile-smol-tf32-$lv.txt"
done
for lv in f32 planes; do
    for t in --tf32 ""; do
        "$D" bench finetune --device cuda --synthetic llama3-8b --steps 4 $t --levels $lv \
            --json "$OUT/bench-ft-8b-$lv$t.json"
    done
done
M=.devcarry/shared/models/docs-llama-12m
C=.devcarry/shared/data/docs/calib.txt
if [ -d "$M" ]; then
    "$D" quantize "$M" --out /tmp/docs-ap 2>&1 | tail -1
    for dev in cuda cpu; do
        "$D" calibrate /tmp/docs-ap --device $dev --budget 5 --targets 3.5,4.5 --calib "$C" --samples 32 \
            --seq-len 512 --epochs 1 --estimator-samples 8 --force 2>&1 | tail -8 | tee "$OUT/calibrate-docs-$dev.txt"
    done
else
    echo "no $M (not carried): the docs-llama calibration is skipped"
fi
# The whole 8B (32 blocks) fits one GPU with the precisions read from the planes.
if [ -z "${NO_FULL_8B:-}" ]; then
    "$D" bench finetune --device cuda --synthetic llama3-8b --depths 16,32 --steps 2 --tf32 --levels planes \
        --json "$OUT/bench-ft-8b-full-planes.json"
fi
