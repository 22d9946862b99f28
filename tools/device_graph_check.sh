#!/usr/bin/env bash
# On the device machine, with .devcarry/ (see tools/device_calibrate.sh's
# header): the GPU tests of the fine-tuning step (engine pair kernels,
# gradient ops, recorded steps against steps run op by op), then
# `bench finetune` with the step replayed as a CUDA graph and queued op by
# op, on SmolLM2's and Llama-3-8B's shapes. Results under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
device_tests_setup "$OUT/gpu.txt"
for t in .devcarry/extra/dpllm-engine-cuda_bitplane .devcarry/tests/*; do
    echo "-- $(basename "$t")"
    timeout 200 "$t" --test-threads 1 --skip kernels_compile 2>&1 | tee -a "$OUT/tests.log" |
        grep -E "^test |test result|panicked|TF32|warn" | head -30
done
D=.devcarry/dpllm
for g in "" --no-graph; do
    for lv in f32 planes; do
        timeout 60 "$D" bench finetune --device cuda --steps 20 --tf32 --levels $lv $g \
            --json "$OUT/bench-ft-smol-$lv${g}.json" 2>&1 | tail -4
    done
done
for g in "" --no-graph; do
    for lv in f32 planes; do
        timeout 100 "$D" bench finetune --device cuda --synthetic llama3-8b --steps 4 --tf32 --levels $lv $g \
            --json "$OUT/bench-ft-8b-$lv${g}.json" 2>&1 | tail -4
    done
done
