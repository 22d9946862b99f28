# Sourced on the device machine by the tools/*device* scripts: the PTX cache
# in /tmp, and NVRTC and cuBLAS from the CUDA toolkit or PyTorch's wheels.
export DPLLM_CACHE_DIR=/tmp/dpllm-cache
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH

# For the scripts that run the GPU tests: the tests find the shared data and
# the repository (/work/main) in this copy; the GPU's name goes to $1.
device_tests_setup() {
    if [ ! -e /work/main ] && mkdir -p /work 2>/dev/null; then
        ln -s "$PWD" /work/main
    fi
    export DPLLM_SHARED_DIR="$PWD/.devcarry/shared"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$1"
}
