#!/usr/bin/env bash
# On the device machine: A/B of a CUDA switch read from the environment
# (e.g. DPLLM_CUDA_PDL, DPLLM_CUDA_SPLIT_K), set to 1 and then 0, in one lease:
# the 8B-shaped decode (4 and 3 bits, f16, static and DP-LLM 3.5) two rounds
# alternating, the GEMV on the 8B's shapes at 3 and 4 bits, then the GPU tests
# with the switch on. Needs .devcarry/ as tools/cuda_device_run.sh does
# (dpllm, tests/<name>, shared/); unpacks .devparts/pk.tar.xz when given
# (made by tools/device_pack.sh on the dev machine; carry ".devparts").
#   OUT=... tools/device_env_ab.sh DPLLM_CUDA_PDL
set -uo pipefail
VAR=${1:?usage: tools/device_env_ab.sh ENV_VAR}
OUT=${OUT:-device-out}; mkdir -p "$OUT"
[ -f .devparts/pk.tar.xz ] && tar xJf .devparts/pk.tar.xz
. "$(dirname "$0")/device_env.sh"
device_tests_setup "$OUT/gpu.txt"
mkdir -p target/release && ln -sf "$PWD/.devcarry/dpllm" target/release/dpllm
D=.devcarry/dpllm
t0=$(date +%s)
for r in 1 2; do
  for on in 1 0; do
    for args in "--bits 4" "--bits 3" "" "--static --target 3.5" "--target 3.5"; do
      f="$OUT/decode-$on-r$r-$(echo "x$args" | tr -d ' -').txt"
      env "$VAR=$on" timeout 60 $D bench decode --device cuda --synthetic llama3-8b --tokens 64 $args > "$f" 2>&1
      echo "r$r $VAR=$on ${args:-f16}: $(grep -E 'decode latency' "$f")"
    done
  done
done
echo "decode: $(( $(date +%s) - t0 )) s"
for on in 1 0; do
  env "$VAR=$on" timeout 120 $D bench gemv --device cuda --shapes 14336x4096,4096x14336,4096x4096,1024x4096 \
    --bits 3,4 --tokens 1,8 --calls 100 --seconds 0.1 --json "$OUT/gemv-$on.json" > "$OUT/gemv-$on.txt" 2>&1
  echo "gemv $VAR=$on: $(( $(date +%s) - t0 )) s"
done
for t in cuda_graphs cuda_backend cuda_bitplane reference_logits cuda; do
  [ -x ".devcarry/tests/$t" ] || continue
  env "$VAR=1" timeout 240 ".devcarry/tests/$t" --test-threads 1 --skip kernels_compile > "$OUT/test-$t.txt" 2>&1
  echo "$t rc=$? $(grep -E 'test result' "$OUT/test-$t.txt" | tail -1) ($(( $(date +%s) - t0 )) s)"
done
