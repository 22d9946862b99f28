#!/usr/bin/env bash
# On the device machine, with .devcarry/ (see tools/device_calibrate.sh's
# header): Nsight Compute's time of every kernel of `bench finetune`'s
# fine-tuning steps, queued op by op (no graph), at the clocks the GPU runs
# at. Writes $OUT/ncu-$NAME.csv and, per kernel name, the time a step of the
# last depth minus a step of the first (one block's worth) in
# $OUT/ncu-$NAME.txt.
#   SHAPES (llama3-8b), LEVELS (planes), NAME (SHAPES-LEVELS),
#   ARGS (more `bench finetune` arguments)
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
OUT=${OUT:-device-out}
mkdir -p "$OUT"
S=${SHAPES:-llama3-8b}
L=${LEVELS:-planes}
N=${NAME:-$S-$L}
# Depths 1 and 2, one untimed and one timed step each: the steps are told
# apart by their first kernel (a weight mix, or the embedding).
ncu --metrics gpu__time_duration.sum --csv --clock-control none \
    .devcarry/dpllm bench finetune --device cuda --synthetic "$S" --levels "$L" \
    --tf32 --no-graph --depths 1,2 --steps 1 ${ARGS:-} > "$OUT/ncu-$N.csv" 2> "$OUT/ncu-$N.err"
python3 - "$OUT/ncu-$N.csv" > "$OUT/ncu-$N.txt" <<'EOF'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
steps, cur, prev = [], None, ""
mix = ("bitplane_mix", "mix_levels")
for r in rows[1:]:
    name = r[ki]
    # A step starts with the mixes of its weights (run before its
    # embedding), or with the embedding where no mix runs.
    starts = name.startswith(mix) and not prev.startswith(mix)
    starts |= name.startswith("embed") and not prev.startswith(mix)
    prev = name
    if starts:
        cur = collections.Counter()
        steps.append(cur)
    if cur is None:
        continue
    v = float(r[vi].replace(",", ""))
    v *= {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0,
          "ms": 1e3, "msecond": 1e3}[r[ui]]
    short = name.split("(")[0][:90]
    cur[short] += v
    cur["#" + short] += 1
print(f"{len(steps)} steps; µs a step, by kernel")
for i, s in enumerate(steps):
    print(f"step {i}: {sum(v for k, v in s.items() if not k.startswith('#')):.0f} µs")
if len(steps) >= 4:
    one, two = steps[1], steps[3]
    keys = sorted({k for k in list(one) + list(two) if not k.startswith("#")},
                  key=lambda k: -(two[k] - one[k]))
    print("\nper block (depth-2 step minus depth-1 step), and the depth-1 step:")
    print(f"{'kernel':90s} {'block µs':>10s} {'calls':>6s} {'depth1 µs':>10s}")
    for k in keys:
        print(f"{k:90s} {two[k]-one[k]:10.1f} {two['#'+k]-one['#'+k]:6.0f} {one[k]:10.1f}")
EOF
cat "$OUT/ncu-$N.txt"
