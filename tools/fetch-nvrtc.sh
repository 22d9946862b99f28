#!/usr/bin/env bash
# Fetch NVIDIA's NVRTC (the CUDA C compiler library, CUDA 13.0) from the Python
# package index (package nvidia-cuda-nvrtc==13.0.88), check the wheel's sha256
# and unpack its libraries into the git-ignored cache models/nvrtc/ (reused
# when present). Prints the directory.
# The kernel compile checks (`kernels_compile_for_every_target` in the engine's
# and the gradient crate's tests) then compile every CUDA kernel for sm_87,
# sm_89 and sm_90 on a machine with no GPU and no CUDA toolkit: they run
# themselves again with this directory on LD_LIBRARY_PATH. Nothing else uses
# it: dpllm itself loads the NVRTC of the machine's CUDA installation.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=13.0.88
SHA=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
DIR=models/nvrtc
if [ -f "$DIR/libnvrtc.so.13" ] && [ "$(cat "$DIR/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "$DIR"
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: pip is missing (tools/fetch-smollm2.sh installs it)" >&2
  exit 1
fi
mkdir -p models
TMP=$(mktemp -d models/.nvrtc.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
if ! python3 -m pip download --quiet --no-deps "nvidia-cuda-nvrtc==$VERSION" -d "$TMP" >&2; then
  echo "error: cannot download nvidia-cuda-nvrtc==$VERSION from the Python package index (no network?)" >&2
  exit 1
fi
WHL=$(ls "$TMP"/nvidia_cuda_nvrtc-*.whl)
if [ "$(sha256sum "$WHL" | cut -d' ' -f1)" != "$SHA" ]; then
  echo "error: $(basename "$WHL") does not have the expected sha256 $SHA" >&2
  exit 1
fi
python3 - "$WHL" "$TMP/lib" <<'PY'
import os, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base.startswith("libnvrtc") and ".alt." not in base:
            with open(os.path.join(out, base), "wb") as f:
                f.write(z.read(name))
PY
ln -s libnvrtc.so.13 "$TMP/lib/libnvrtc.so"
echo "$VERSION" > "$TMP/lib/VERSION"
rm -rf "$DIR"
mv "$TMP/lib" "$DIR"
echo "$DIR"
