#!/usr/bin/env bash
# On the device machine, in the background (setsid) so it outlives one call:
# SmolLM2 calibrated at the paper's settings for one budget
# (tools/device_calibrate.sh), then evaluated on WikiText-2 test against the
# GGUF: uniform bits, and static and DP-LLM at every target. Everything in
# $RES (default /tmp/paper); `done` there when finished. Needs /tmp/smol.gguf.
# How it ran on 2026-12-07 (H200): with .devcarry unpacked and /tmp/smol.gguf
# assembled (see tools/device_calibrate.sh), one call started
#   mkdir -p /tmp/w && cp -r .devcarry tools /tmp/w/ && cd /tmp/w && (setsid nohup bash -c
#   'BUDGET=5 bash tools/device_smol_paper.sh; BUDGET=4 TARGETS=3.25,3.5,3.75 UNIFORM=
#   RES=/tmp/paper4 bash tools/device_smol_paper.sh; touch /tmp/all-done' > /tmp/paper.out 2>&1 &)
# and polled; the next calls, at once while the machine stayed warm, polled
# for /tmp/all-done, then `tar -czf $OUT/paper.tgz` the results: a call
# brings back at most 8 files.
#   BUDGET (5), TARGETS (3.25..4.75), CHUNKS (16 chunks of 2048 tokens),
#   UNIFORM (bits evaluated uniformly: 3 4 5 6 7 8; empty for none),
#   EVAL_TARGETS (the targets evaluated, default TARGETS)
set -uo pipefail
RES=${RES:-/tmp/paper}
mkdir -p "$RES"
rm -f "$RES/done"
B=${BUDGET:-5}
T=${TARGETS:-3.25,3.5,3.75,4,4.25,4.5,4.75}
OUT=$RES SAMPLES=1000 EPOCHS=5 BUDGET=$B TARGETS=$T CAL_ARGS=--tf32 \
    bash "$(dirname "$0")/device_calibrate.sh" > "$RES/calibrate.log" 2>&1
D=.devcarry/dpllm
eval_one() {  # eval_one NAME ARGS...
    local name=$1
    shift
    "$D" perplexity /tmp/smol-ap "$@" --text .devcarry/shared/data/wikitext-2/test.txt --ctx 2048 \
        --max-chunks "${CHUNKS:-16}" --compare-to /tmp/smol.gguf --device cuda --json "$RES/$name.json" \
        > "$RES/$name.txt" 2>&1
    echo "$name rc=$?" >> "$RES/eval.log"
}
for b in ${UNIFORM-3 4 5 6 7 8}; do
    eval_one "uniform-$b" --bits "$b"
done
E=${EVAL_TARGETS:-$T}
for t in ${E//,/ }; do
    eval_one "b$B-static-$t" --budget "$B" --target "$t" --static
    eval_one "b$B-dpllm-$t" --budget "$B" --target "$t"
done
cp -r /tmp/smol-ap/plans "$RES/plans" 2>/dev/null
touch "$RES/done"
