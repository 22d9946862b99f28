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
