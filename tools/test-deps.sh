#!/usr/bin/env bash
# Everything the test suite uses beyond crates.io, fetched once:
#  - SmolLM2-135M-Instruct's GGUF (tools/fetch-smollm2.sh) for the real-model tests;
#  - NVIDIA's NVRTC library (tools/fetch-nvrtc.sh), so the CUDA kernels' compile
#    checks run on machines with no GPU or CUDA toolkit (CI);
#  - the `openai` Python package, for the server test with the official client;
#  - Debian's chromium and chromedriver, for the web page's browser test.
# A missing optional piece (no root for apt, no network) is reported, and the
# tests that need it skip with a message; the SmolLM2 fetch must succeed.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/fetch-smollm2.sh >/dev/null
tools/fetch-nvrtc.sh >/dev/null ||
  echo "warning: cannot fetch NVRTC: the CUDA kernel compile checks will skip" >&2
if ! python3 -c 'import openai' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check openai >&2 ||
    echo "warning: cannot install the openai Python package: its server test will skip" >&2
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver) >&2 ||
    echo "warning: cannot install chromium and chromium-driver: the browser test will skip" >&2
fi
