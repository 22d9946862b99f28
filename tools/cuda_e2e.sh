#!/usr/bin/env bash
# On a GPU machine: a quantized model (with calibrated plans) on --device cuda
# against --device cpu: perplexity (same chunks) and decode speed at uniform
# bits, static and DP-LLM plans. JSON per run and a summary table in $OUT.
#
#   tools/cuda_e2e.sh DPLLM MODEL TEXT [CTX] [CHUNKS]
#
# Environment: BITS (default "3 4 5 8"), TARGETS (default "3.5 4.0"),
# DECODE_TOKENS (default 128), SKIP_CPU=1 to run the GPU only.
set -uo pipefail
DPLLM=$1 MODEL=$2 TEXT=$3 CTX=${4:-256} CHUNKS=${5:-8}
OUT=${OUT:-e2e-out}
mkdir -p "$OUT"
BITS=${BITS:-3 4 5 8}
TARGETS=${TARGETS:-3.5 4.0}
DEVICES="cuda"
[ -z "${SKIP_CPU:-}" ] && DEVICES="cuda cpu"

runs=()
for b in $BITS; do runs+=("bits$b|--bits $b"); done
for t in $TARGETS; do
    runs+=("static$t|--target $t --static")
    runs+=("dpllm$t|--target $t")
done

printf "%-12s %-5s %10s %8s %12s %10s\n" run device ppl bits "decode tok/s" "ms/token" | tee "$OUT/summary.txt"
for r in "${runs[@]}"; do
    name=${r%%|*} args=${r#*|}
    for d in $DEVICES; do
        p="$OUT/ppl-$name-$d.json" b="$OUT/decode-$name-$d.json"
        $DPLLM perplexity "$MODEL" $args --text "$TEXT" --ctx "$CTX" --max-chunks "$CHUNKS" \
            --device "$d" --json "$p" > "$OUT/ppl-$name-$d.log" 2>&1 || { echo "FAILED perplexity $name $d"; tail -5 "$OUT/ppl-$name-$d.log"; }
        $DPLLM bench decode "$MODEL" $args --tokens "${DECODE_TOKENS:-128}" --bandwidth-mib 1024 \
            --device "$d" --json "$b" > "$OUT/decode-$name-$d.log" 2>&1 || { echo "FAILED decode $name $d"; tail -5 "$OUT/decode-$name-$d.log"; }
        python3 - "$p" "$b" "$name" "$d" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
def load(f):
    try:
        return json.load(open(f))
    except Exception:
        return {}
p, b = load(sys.argv[1]), load(sys.argv[2])
eb = p.get("effective_bits") or 0
print(f"{sys.argv[3]:<12} {sys.argv[4]:<5} {p.get('perplexity', float('nan')):>10.4f} {eb:>8.3f} "
      f"{b.get('decode_tokens_per_sec', float('nan')):>12.1f} {b.get('ms_per_token_median', float('nan')):>10.3f}")
EOF
    done
done
