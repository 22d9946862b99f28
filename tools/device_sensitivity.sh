#!/usr/bin/env bash
# On the device machine:
# sensitivities on the GPU against the CPU, and their wall time, for
# docs-llama-12m (.devcarry/shared) and, when /tmp/smol.gguf is there,
# SmolLM2-135M at the paper's 100 x 512 tokens. Results under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
D=.devcarry/dpllm
S=.devcarry/shared
compare() {  # compare GPU.safetensors CPU.safetensors
    python3 - "$1" "$2" <<'PY'
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), "different tensors"
worst, name = 0.0, ""
for k in a:
    x, y = a[k].astype("float64"), b[k].astype("float64")
    e = abs(x - y).max() / max(abs(y).max(), 1e-30)
    if e > worst:
        worst, name = e, k
print(f"{len(a)} tensors, largest |gpu - cpu| / max|cpu| = {worst:.2e} ({name})")
PY
}
run() {  # run NAME DEVICE ARGS...: wall seconds into $OUT/time-NAME-DEVICE.txt
    local name=$1 dev=$2
    shift 2
    local t0=$(date +%s%N)
    "$D" sensitivity "$@" --device "$dev" --out "/tmp/$name-$dev.safetensors" 2>&1 | tail -2
    echo "$name $dev $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/sensitivity-times.txt"
}
M=$S/models/docs-llama-12m
C=$S/data/docs/calib.txt
run docs cpu "$M" --calib "$C" --samples 16 --seq-len 512
run docs cuda "$M" --calib "$C" --samples 16 --seq-len 512
compare /tmp/docs-cuda.safetensors /tmp/docs-cpu.safetensors | tee "$OUT/docs-compare.txt"
run docs100 cuda "$M" --calib "$C" --samples 100 --seq-len 512
if [ -f /tmp/smol.gguf ]; then
    V=$S/data/wikitext-2/valid.txt
    run smol8 cpu /tmp/smol.gguf --calib "$V" --samples 8 --seq-len 512
    run smol8 cuda /tmp/smol.gguf --calib "$V" --samples 8 --seq-len 512
    compare /tmp/smol8-cuda.safetensors /tmp/smol8-cpu.safetensors | tee "$OUT/smol-compare.txt"
    run smol100 cuda /tmp/smol.gguf --calib "$V" --samples 100 --seq-len 512
fi
# Precision fine-tuning on the GPU against the CPU: docs-llama-12m quantized
# from the GPU sensitivities, one budget, two targets, same data and settings.
"$D" quantize "$M" --out /tmp/docs-ap --sensitivity /tmp/docs100-cuda.safetensors 2>&1 | tail -1
for dev in cuda cpu; do
    t0=$(date +%s%N)
    "$D" calibrate /tmp/docs-ap --device $dev --budget 5 --targets 3.5,4.5 --calib "$C" \
        --samples ${CAL_SAMPLES:-64} --seq-len 512 --epochs 1 --estimator-samples 8 --force 2>&1 | tail -4 | tee "$OUT/calibrate-$dev.txt"
    echo "calibrate $dev $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/sensitivity-times.txt"
done
