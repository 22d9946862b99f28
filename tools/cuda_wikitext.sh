#!/usr/bin/env bash
# On the device machine: SmolLM2-135M any-precision (with its budget-5 plans)
# on WikiText-2 test on the GPU, each configuration against the GGUF
# (dequantized) reference for KL. Configurations already done (JSON in
# /tmp/smolout) are skipped, so a later call on a warm machine continues.
#
# The model does not fit one carry (64 MiB): tar smol-ap (config, tokenizer,
# dpllm-anyprec.safetensors, plans/budget-5.00), wiki-test.txt and the GGUF,
# `split -b 55M`, carry one part per call into /tmp/smolparts/ (the machine
# keeps /tmp while warm), then run this with the dpllm binary in .devcarry/:
#
#   SHA=<sha256 of the tar> CHUNKS=16 CONFIGS='dp-b5-t4.00|--budget 5 --target 4
#   static-b5-t4.00|--budget 5 --target 4 --static' bash tools/cuda_wikitext.sh
#
# Measured (H100, 2026-11-25, session 6): all 152 chunks of WikiText-2 test
# with the reference alongside in about 2 minutes a configuration (2,300-2,650
# tokens/s), plus about a minute for the first NVRTC compile (cached in /tmp);
# one call of 10 minutes holds three configurations.
set -uo pipefail
S=/tmp/smol
if [ ! -d $S/smol-ap ]; then
  cat /tmp/smolparts/part.* > /tmp/smol.tar
  [ -n "${SHA:-}" ] && { echo "$SHA  /tmp/smol.tar" | sha256sum -c || exit 1; }
  mkdir -p $S && tar xf /tmp/smol.tar -C $S && rm /tmp/smol.tar
fi
D=$PWD/.devcarry/dpllm
OUT=${OUT:-/tmp/smolout}
mkdir -p /tmp/smolout "$OUT"
export DPLLM_CACHE_DIR=/tmp/dpllm-cache
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  j=/tmp/smolout/$name.json
  [ -f $j ] && continue
  t0=$(date +%s)
  $D perplexity $S/smol-ap $args --text $S/wiki-test.txt --ctx 2048 ${CHUNKS:+--max-chunks $CHUNKS} \
     --compare-to $S/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --json $j > /tmp/smolout/$name.log 2>&1 \
     || { echo "FAILED $name"; tail -5 /tmp/smolout/$name.log; }
  echo "$name: $(( $(date +%s) - t0 )) s: $(grep -E '^perplexity' /tmp/smolout/$name.log)"
  grep -E '^vs' /tmp/smolout/$name.log
  cp $j "$OUT"/ 2>/dev/null
done <<< "${CONFIGS}"
