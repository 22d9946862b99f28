#!/usr/bin/env bash
# On the device machine, with .devcarry/ (see tools/device_calibrate.sh's
# header): the GPU tests of calibration (scratch buffers poisoned with NaN),
# then `bench finetune` of two builds interleaved in the same lease:
# .devcarry/dpllm-old (the reference) and .devcarry/dpllm, on Llama-3-8B's
# shapes (planes, TF32, the step replayed as a graph) and on SmolLM2's.
# Results under $OUT (ab-*.json, tests.log).
#   ROUNDS (2), TESTS (1: run the GPU tests first; 0: skip them)
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
device_tests_setup "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
    for t in .devcarry/extra/dpllm-engine-cuda_bitplane .devcarry/tests/*; do
        SECONDS=0
        DPLLM_POISON_SCRATCH=1 timeout 200 "$t" --test-threads 1 --skip kernels_compile \
            >> "$OUT/tests.log" 2>&1
        echo "-- $(basename "$t"): rc=$? in ${SECONDS}s"
    done
    grep -E "test result|FAILED|panicked" "$OUT/tests.log"
fi
for round in $(seq "${ROUNDS:-2}"); do
    for build in old new; do
        D=.devcarry/dpllm
        [ $build = old ] && D=.devcarry/dpllm-old
        timeout 150 "$D" bench finetune --device cuda --synthetic llama3-8b --steps 4 --tf32 \
            --levels planes --json "$OUT/ab-8b-$build-$round.json" 2>&1 | tail -3
        timeout 60 "$D" bench finetune --device cuda --steps 20 --tf32 --levels planes \
            --json "$OUT/ab-smol-$build-$round.json" 2>&1 | tail -2
    done
done
