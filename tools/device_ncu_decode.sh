#!/usr/bin/env bash
# On the device machine: where a decode step's GPU time goes, kernel by
# kernel, under Nsight Compute (ncu: each kernel timed alone, so no PDL
# overlap and no graph; the sum is an upper bound of the step). For each
# configuration given (the arguments of `dpllm bench decode` after the
# model, quoted as one word each), it profiles a short decode of the
# synthetic 8B (1 prompt token, TOKENS decoded, graphs off) and writes
# $OUT/ncu-<i>.csv and a table of kernel name, launches and µs per decoded
# token ($OUT/ncu-<i>.txt; launches before the first decode step are left
# out: a step starts with the embedding kernel). Needs .devcarry/ (tools/device_pack.sh).
#   OUT=... [TOKENS=3] tools/device_ncu_decode.sh "--static --target 3.5" "--target 3.5"
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: tools/device_ncu_decode.sh 'BENCH ARGS' ['BENCH ARGS' ...]" >&2; exit 2; }
OUT=${OUT:-device-out}; mkdir -p "$OUT"
[ -f .devparts/pk.tar.xz ] && [ ! -d .devcarry ] && tar xJf .devparts/pk.tar.xz
. "$(dirname "$0")/device_env.sh"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 1; }
T=${TOKENS:-3}
i=0
for args in "$@"; do
  i=$((i + 1))
  echo "== $i: $args"
  # shellcheck disable=SC2086
  DPLLM_CUDA_GRAPHS=0 timeout 300 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
    --page raw --log-file "$OUT/ncu-$i.log" \
    .devcarry/dpllm bench decode --device cuda --synthetic llama3-8b --prompt-tokens 1 --tokens "$T" $args \
    > "$OUT/ncu-$i.csv" 2> "$OUT/ncu-$i.err"
  echo "rc=$?"
  python3 - "$OUT/ncu-$i.csv" "$T" "$args" > "$OUT/ncu-$i.txt" <<'EOF'
import csv, sys, collections
path, tokens, args = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [r for r in csv.reader(open(path)) if r]
head = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
cols = rows[head]
name, dur = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
units = rows[head + 1][dur] if len(rows) > head + 1 else ""
scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "ns": 1e-3, "us": 1.0}.get(units, None)
data = []
for r in rows[head + 1:]:
    try:
        v = float(r[dur].replace(",", ""))
    except (ValueError, IndexError):
        continue
    data.append((r[name], v * (scale if scale else 1e-3)))
# A decode step starts with the embedding: keep the launches from the
# start of the last `tokens` steps on.
starts = [i for i, (n, _) in enumerate(data) if n.startswith("embed_")]
if len(starts) >= tokens:
    data = data[starts[-tokens]:]
by = collections.defaultdict(lambda: [0, 0.0])
for n, v in data:
    k = by[n.split("(")[0]]
    k[0] += 1
    k[1] += v
total = sum(v for _, v in data)
print(f"# {args}: {len(data)} launches over {tokens} decoded tokens, {total / tokens:.1f} us/token (kernels alone)")
print(f"{'kernel':48} {'launches/token':>14} {'us/token':>10} {'us/launch':>10}")
for n, (c, v) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"{n[:48]:48} {c / tokens:14.1f} {v / tokens:10.1f} {v / c:10.2f}")
EOF
  head -40 "$OUT/ncu-$i.txt"
done
