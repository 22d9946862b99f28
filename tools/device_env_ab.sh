#!/usr/bin/env bash
# On the device machine: A/B of CUDA switches read from the environment
# (e.g. DPLLM_CUDA_PDL, DPLLM_CUDA_SPLIT_K), every combination of them on (1)
# and off (0), in one lease: the 8B-shaped decode (4 and 3 bits, f16, static
# and DP-LLM 3.5) two rounds alternating, the GPU tests with every switch on,
# then the GEMV on the 8B's shapes at 3 and 4 bits. Needs .devcarry/ as
# tools/cuda_device_run.sh does (dpllm, tests/<name>, shared/); unpacks
# .devparts/pk.tar.xz when given (made by tools/device_pack.sh on the dev
# machine; carry ".devparts").
#   OUT=... [ROUNDS=2] [GEMV=1] [GEMV_ARGS=...] tools/device_env_ab.sh DPLLM_CUDA_PDL [DPLLM_CUDA_SPLIT_K ...]
# ROUNDS: decode rounds; GEMV=0 leaves the GEMV table out (a short lease);
# GEMV_ARGS: more arguments of `dpllm bench gemv` (e.g. "--tables pairs,half-pairs").
# The run tool returns a limited number of files, so the results are written
# to a temporary folder and packed into $OUT/ab.tgz when the script ends
# (also when `timeout` stops it).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: tools/device_env_ab.sh ENV_VAR [ENV_VAR ...]" >&2; exit 2; }
VARS=("$@")
DEST=${OUT:-device-out}; mkdir -p "$DEST"
OUT=$(mktemp -d)
trap 'tar czf "$DEST/ab.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
trap 'exit 143' TERM
[ -f .devparts/pk.tar.xz ] && tar xJf .devparts/pk.tar.xz
. "$(dirname "$0")/device_env.sh"
device_tests_setup "$OUT/gpu.txt"
mkdir -p target/release && ln -sf "$PWD/.devcarry/dpllm" target/release/dpllm
D=.devcarry/dpllm
# Combination c (0 .. 2^n - 1, all on first): "VAR=0/1 ..." for env, and a
# file-name tag of the 0/1 digits.
n=${#VARS[@]}
combos=$(seq $(( (1 << n) - 1 )) -1 0)
assign() { local c=$1 i s=""; for i in "${!VARS[@]}"; do s+="${VARS[$i]}=$(( (c >> (n - 1 - i)) & 1 )) "; done; echo "$s"; }
tag() { assign "$1" | sed -E 's/[A-Z_]+=//g; s/ //g'; }
t0=$(date +%s)
for r in $(seq "${ROUNDS:-2}"); do
  for c in $combos; do
    for args in "--bits 4" "--bits 3" "" "--static --target 3.5" "--target 3.5"; do
      f="$OUT/decode-$(tag "$c")-r$r-$(echo "x$args" | tr -d ' -').txt"
      env $(assign "$c") timeout 60 $D bench decode --device cuda --synthetic llama3-8b --tokens 64 $args > "$f" 2>&1
      echo "r$r $(assign "$c")${args:-f16}: $(grep -E 'decode latency' "$f")"
    done
  done
done
echo "decode: $(( $(date +%s) - t0 )) s"
all_on=$(assign $(( (1 << n) - 1 )))
for t in cuda_graphs cuda_backend cuda_bitplane reference_logits cuda; do
  [ -x ".devcarry/tests/$t" ] || continue
  env $all_on timeout 150 ".devcarry/tests/$t" --test-threads 1 --skip kernels_compile > "$OUT/test-$t.txt" 2>&1
  echo "$t rc=$? $(grep -E 'test result' "$OUT/test-$t.txt" | tail -1) ($(( $(date +%s) - t0 )) s)"
done
[ "${GEMV:-1}" = 1 ] || exit 0
for c in $combos; do
  env $(assign "$c") timeout 120 $D bench gemv --device cuda --shapes 14336x4096,4096x14336,4096x4096,1024x4096 \
    --bits 3,4 --tokens 1,8 --calls 100 --seconds 0.1 ${GEMV_ARGS:-} --json "$OUT/gemv-$(tag "$c").json" > "$OUT/gemv-$(tag "$c").txt" 2>&1
  echo "gemv $(assign "$c"): $(( $(date +%s) - t0 )) s"
done
