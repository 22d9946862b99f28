// Definitions every kernel file shares; the host prepends this file to each
// source before NVRTC compiles it (NVRTC has no include path here).

typedef unsigned int u32;
typedef unsigned short u16;

#define FULL 0xffffffffu
#define NEG_INF (__int_as_float(0xff800000))

// f16 bits to f32 (no cuda_fp16.h needed).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// bf16 bits to f32.
__device__ __forceinline__ float bf2f(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Sum of v over the warp, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(FULL, v, s);
    return v;
}

// Max of v over the warp, in every lane.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, s));
    return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), in every thread.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    __syncthreads();  // part may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float s = lane < warps ? part[lane] : 0.f;
    return warp_sum(s);
}

// The DP-LLM estimate of one token, by the whole block (every thread gets it):
// a * ||v|| + c over the n values of v (the estimator's input, or the
// projection of a JL estimator with a = 1, c = its bias).
__device__ float block_estimate(const float* v, int n, float a, float c) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += v[i] * v[i];
    return a * sqrtf(block_sum(ss)) + c;
}

// The DP-LLM decision of one token: its estimate above thr. The same
// arithmetic wherever an estimate or a decision is made, so every path decides alike.
__device__ bool decide_high(const float* v, int n, float a, float c, float thr) {
    volatile float e = block_estimate(v, n, a, c);  // rounded to f32 as an estimate stored in memory is
    return e > thr;
}
