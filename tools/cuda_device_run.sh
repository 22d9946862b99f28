#!/usr/bin/env bash
# On the device machine: run the CUDA tests and the GPU benchmarks with the
# binaries built on the dev machine and carried in .devcarry/ (dpllm, and test
# executables in .devcarry/tests/). Results land in $OUT (or ./device-out).
# Test executables look for the repository where it was built (/work/main,
# linked here when missing) and for ../shared in .devcarry/shared.
# Optional: BENCH_ARGS (bench gemv), NO_GEMV=1 (skip it), EXTRA (a script run at the end),
# NCU=<kernel regex> (Nsight Compute on one launch of it: NCU_SHAPE, NCU_BITS, NCU_TOKENS).
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
. "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [ ! -e /work/main ] && mkdir -p /work 2>/dev/null; then
    ln -s "$PWD" /work/main
fi
[ -d .devcarry/shared ] && export DPLLM_SHARED_DIR="$PWD/.devcarry/shared"
# The CLI's tests run the binary where cargo built it.
if [ -x .devcarry/dpllm ] && [ ! -e target/release/dpllm ]; then
    mkdir -p target/release && ln -s "$PWD/.devcarry/dpllm" target/release/dpllm
fi
echo "== tests"
for t in .devcarry/tests/*; do
    [ -x "$t" ] || continue
    echo "-- $(basename "$t")"
    (time "$t" --nocapture --test-threads 1 --skip kernels_compile) 2>&1 |
        tee -a "$OUT/tests.log" | grep -E "^test |test result|panicked|SKIP|max \|Δ|error" | head -60
done
if [ -z "${NO_GEMV:-}" ]; then
    echo "== bench"
    .devcarry/dpllm bench gemv --device cuda ${BENCH_ARGS:-} --json "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.txt"
fi
echo "== resources"
if [ -n "${RES:-}" ] && command -v nvcc >/dev/null; then
    k=crates/dpllm-engine/src/backend/cuda/kernels
    cat $k/common.cuh $k/bitplane_gemv.cu > /tmp/bitplane_gemv.cu
    nvcc -arch=sm_90 -cubin --resource-usage -o /tmp/bitplane.cubin /tmp/bitplane_gemv.cu 2>&1 |
        grep -A3 -E "_b[3-8]_t[48]'" | grep -E "Function properties|registers|spill" > "$OUT/resources.txt"
    head -40 "$OUT/resources.txt"
    cuobjdump -sass -fun bitplane_gemv_b4_t4 /tmp/bitplane.cubin > "$OUT/sass_b4_t4.txt" 2>&1
fi
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
    echo "== ncu"
    ncu --kernel-name "regex:${NCU}" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats --section InstructionStats \
        .devcarry/dpllm bench gemv --device cuda --shapes ${NCU_SHAPE:-14336x4096} --bits ${NCU_BITS:-4} \
        --tokens ${NCU_TOKENS:-1} \
        --calls 3 --working-set-mib 64 > "$OUT/ncu.txt" 2>&1
    grep -E "Duration|Throughput|Achieved Occupancy|Registers Per|Warp Cycles|Issued|Eligible|Pipe|Ipc|No Eligible|Active Warps" "$OUT/ncu.txt" | head -40; grep -A12 -i "pipe utilization" "$OUT/ncu.txt" | head -30
fi
if [ -n "${EXTRA:-}" ]; then
    echo "== extra"
    bash -c "$EXTRA" 2>&1 | tee "$OUT/extra.log"
fi
