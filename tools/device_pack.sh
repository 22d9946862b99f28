#!/usr/bin/env bash
# On the dev machine: build what the device scripts run and pack it for
# `run`'s carry (64 MiB at most): the release `dpllm`, the GPU test
# executables (engine: cuda_bitplane, cuda_backend, cuda_graphs,
# reference_logits; CLI: cuda) as .devcarry/tests/<name>, and the shared
# docs-llama-12m model and docs text the tests read, tarred (xz) into the
# git-ignored .devparts/pk.tar.xz. Carry ".devparts"; tools/device_env_ab.sh
# (and any script that unpacks .devparts/pk.tar.xz) finds it there.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${DPLLM_SHARED_DIR:-../shared}
cargo build --release -p dpllm-cli
exes() {
    cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])'
}
rm -rf .devcarry && mkdir -p .devcarry/tests .devcarry/shared/models .devcarry/shared/data .devparts
cp target/release/dpllm .devcarry/
{
    exes -p dpllm-engine --features cuda --test cuda_bitplane --test cuda_backend --test cuda_graphs --test reference_logits
    exes -p dpllm-cli --test cuda
} | while read -r name exe; do cp "$exe" ".devcarry/tests/$name"; done
cp -r "$SHARED/models/docs-llama-12m" .devcarry/shared/models/
cp -r "$SHARED/data/docs" .devcarry/shared/data/
tar cJf .devparts/pk.tar.xz .devcarry
ls -l .devcarry/tests .devparts/pk.tar.xz
size=$(stat -c %s .devparts/pk.tar.xz)
[ "$size" -lt $((64 << 20)) ] || { echo "pk.tar.xz is $size bytes: over the 64 MiB carry" >&2; exit 1; }
