#!/usr/bin/env bash
# On the device machine: run the CUDA tests and the GPU GEMV benchmark with the
# binaries built on the dev machine and carried in .devcarry/ (dpllm and the
# cuda_bitplane test executable). Results land in $OUT (or ./device-out).
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export DPLLM_CACHE_DIR=/tmp/dpllm-cache
# NVRTC and cuBLAS: the CUDA toolkit's libraries, or PyTorch's wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
echo "== tests"
time .devcarry/cuda_bitplane --nocapture 2>&1 | tee "$OUT/tests.log"
echo "== bench"
.devcarry/dpllm bench gemv --device cuda ${BENCH_ARGS:-} --json "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.txt"
