#!/usr/bin/env bash
# On the device machine, in the background (setsid) so it outlives one call:
# every calibration stage of a random Llama-3-8B-shaped checkpoint
# (tools/make_synthetic_llama.py) on real text, each timed with its peak host
# memory, and the GPU's memory sampled every half second. Results in $RES
# (default /tmp/cal8b): times.txt, gpu-mem.txt (peak MiB a stage), the
# commands' output; `done` there when finished. Needs numpy, .devcarry/dpllm,
# .devcarry/shared/data/wikitext-2/valid.txt and a tokenizer.json (TOK).
# Disk: the checkpoint (16 GB) and the f32 sensitivities (28 GB) are deleted
# once the any-precision model (about 9 GB) is written.
# How it ran on 2026-12-07 (H100): `LAYERS=4 RES=/tmp/cal8b-4 W=/tmp/l4` and
# then `LAYERS=8 RES=/tmp/cal8b-8 W=/tmp/l8` in one setsid chain, both done
# within 283 s of the call; results in docs/cuda/calibrate-8b-2026-12-07/.
# Later that day, each in the foreground of one call: `LAYERS=4
# CAL_VARIANTS="--jl-device cpu|--jl-device cuda"` (155 s) and `LAYERS=16
# CAL_ARGS="--tf32 --jl-device cuda"` (392 s; the planes path).
#   SENS_SAMPLES (32), SAMPLES (fine-tuning sequences, 16), EPOCHS (1),
#   EST (estimator sequences, 40), TARGETS (3.5), BUDGET (5), W (/tmp/l8b),
#   SHAPE (llama3-8b; tiny to try the script), LAYERS (the shape's, or fewer),
#   DEV (cuda), CAL_ARGS (--tf32), CAL_VARIANTS (one calibrate a variant; below)
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
RES=${RES:-/tmp/cal8b}
W=${W:-/tmp/l8b}
mkdir -p "$RES"
rm -f "$RES/done"
D=.devcarry/dpllm
V=.devcarry/shared/data/wikitext-2/valid.txt
TOK=${TOK:-.devcarry/shared/models/docs-llama-12m/tokenizer.json}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$RES/gpu-mem.log" &
SMI=$!
stage() {  # stage NAME CMD...: wall time, peak host RSS and peak GPU memory of CMD
    local name=$1
    shift
    local from
    from=$(wc -l < "$RES/gpu-mem.log")
    python3 - "$name" "$@" >> "$RES/times.txt" 2>> "$RES/$name.log" <<'EOF'
import resource, subprocess, sys, time
t = time.time()
rc = subprocess.run(sys.argv[2:], stdout=open(f"{sys.argv[1]}.out", "w"), stderr=subprocess.STDOUT).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"{sys.argv[1]}: {time.time() - t:.1f} s, peak host RSS {peak:.1f} GiB, rc={rc}")
EOF
    sleep 1
    echo "$name: peak GPU memory $(tail -n +"$((from + 1))" "$RES/gpu-mem.log" | sort -n | tail -1) MiB" >> "$RES/gpu-mem.txt"
    df -h /tmp | tail -1 >> "$RES/disk.txt"
}
cd "$RES" || exit 1
B=$OLDPWD
stage synth python3 "$B/tools/make_synthetic_llama.py" --shape "${SHAPE:-llama3-8b}" --out "$W" --tokenizer "$B/$TOK" \
    ${LAYERS:+--layers "$LAYERS"}
stage sensitivity "$B/$D" sensitivity "$W" --device "${DEV:-cuda}" --calib "$B/$V" \
    --samples "${SENS_SAMPLES:-32}" --seq-len 512 --out "$W.sens.safetensors"
# The checkpoint and the sensitivities (24 GB at full depth) are still being
# written back to disk; flush them first so quantize is not timed waiting on
# the page cache's writeback (suspected at 16 blocks, docs/benchmarks.md).
stage flush sync
stage quantize "$B/$D" quantize "$W" --out "$W-ap" --sensitivity "$W.sens.safetensors" --force
rm -rf "$W" "$W.sens.safetensors"
# One calibrate a variant of CAL_VARIANTS ('|'-separated extra arguments, e.g.
# "--jl-device cpu|--jl-device cuda"), each on the same model: calibrate-1,
# calibrate-2, ... with their plans' JSON copied beside (small; the estimator
# matrices stay behind).
IFS='|' read -ra VARIANTS <<< "${CAL_VARIANTS:-}"
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=("")
i=0
for extra in "${VARIANTS[@]}"; do
    i=$((i + 1))
    name=calibrate
    [ ${#VARIANTS[@]} -gt 1 ] && name=calibrate-$i
    # shellcheck disable=SC2086 # the arguments split on purpose
    stage "$name" "$B/$D" calibrate ${CAL_ARGS---tf32} $extra "$W-ap" --device "${DEV:-cuda}" --budget "${BUDGET:-5}" \
        --targets "${TARGETS:-3.5}" --calib "$B/$V" --samples "${SAMPLES:-16}" --seq-len 512 \
        --epochs "${EPOCHS:-1}" --estimator-samples "${EST:-40}" --force
    grep -v "\[" "$name.out" | tail -20 > "$name-summary.txt"
    for f in "$W-ap"/plans/*/*.json; do
        [ -e "$f" ] && cp "$f" "$name-$(basename "$(dirname "$f")")-$(basename "$f")"
    done
done
kill $SMI
du -sh "$W-ap" >> "$RES/disk.txt"
touch "$RES/done"
