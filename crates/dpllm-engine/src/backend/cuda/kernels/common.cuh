// Definitions every kernel file shares; the host prepends this file to each
// source before NVRTC compiles it (NVRTC has no include path here).

typedef unsigned int u32;
typedef unsigned short u16;

#define FULL 0xffffffffu
#define NEG_INF (__int_as_float(0xff800000))

// Programmatic dependent launch (compute capability 9.0 and later; nothing
// elsewhere). The host may launch a kernel while the one before it on the
// stream still runs (launch.rs). pdl_wait() returns once that kernel has
// finished and its writes are visible: every kernel calls it before it reads
// anything another kernel wrote or writes anything (only the bit-plane GEMV
// does work before it, on its weights and tables).
// pdl_launch_dependents() lets the next kernel start early; it still waits
// in its own pdl_wait(). A kernel that writes weights or tables
// (fill_random_*) must not call it: a GEMV's work before its wait could then
// read them half written, even several launches later (each of those may
// start as soon as the one before has started). Without the call the next
// kernel starts when it has finished.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Both, first thing in a kernel that needs its inputs before anything else.
__device__ __forceinline__ void pdl_enter() {
    pdl_launch_dependents();
    pdl_wait();
}

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

// Max (MAX) or sum of v over the block (blockDim.x a multiple of 32, at most
// 1024), in every thread.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // part may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    const float s = lane < warps ? part[lane] : (MAX ? NEG_INF : 0.f);
    return MAX ? warp_max(s) : warp_sum(s);
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ __forceinline__ float block_max(float v) { return block_reduce<true>(v); }

// True when p is 16-byte aligned (float4 loads and stores).
__device__ __forceinline__ bool aligned16(const void* p) { return ((size_t)p & 15) == 0; }

// Sum of squares of the n values of v by the whole block, in every thread.
// Each thread keeps four loads in flight (float4 when v is aligned and n a
// multiple of 4): a loop of one dependent load per step is latency-bound, at
// about 0.7 us per step from HBM.
__device__ float block_sumsq(const float* v, int n) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    const int bd = blockDim.x;
    int i = threadIdx.x;
    if ((n & 3) == 0 && aligned16(v)) {
        const float4* v4 = (const float4*)v;
        const int n4 = n >> 2;
        for (; i + 3 * bd < n4; i += 4 * bd) {
            const float4 a = v4[i], b = v4[i + bd], c = v4[i + 2 * bd], d = v4[i + 3 * bd];
            s0 += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
            s1 += b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
            s2 += c.x * c.x + c.y * c.y + c.z * c.z + c.w * c.w;
            s3 += d.x * d.x + d.y * d.y + d.z * d.z + d.w * d.w;
        }
        for (; i < n4; i += bd) {
            const float4 a = v4[i];
            s0 += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
    } else {
        for (; i + 3 * bd < n; i += 4 * bd) {
            const float a = v[i], b = v[i + bd], c = v[i + 2 * bd], d = v[i + 3 * bd];
            s0 += a * a;
            s1 += b * b;
            s2 += c * c;
            s3 += d * d;
        }
        for (; i < n; i += bd) s0 += v[i] * v[i];
    }
    return block_sum((s0 + s1) + (s2 + s3));
}

// The total of the p values of v (sums of squares in parts), by every warp
// on its own in the same order, so every thread gets the same bits with no
// barrier (the warp's 32 lanes must all be active).
__device__ __forceinline__ float parts_total(const float* v, int p) {
    float s = 0.f;
    for (int i = threadIdx.x & 31; i < p; i += 32) s += v[i];
    return warp_sum(s);
}

// The DP-LLM estimate of one token, by the whole block (every thread gets it):
// a * ||v|| + c over the n values of v (the estimator's input, or the
// projection of a JL estimator with a = 1, c = its bias); with n = 0, v[0]
// is the norm itself, and with n < 0, v holds -n parts of the sum of squares
// (both left by the kernel that made the input).
__device__ float block_estimate(const float* v, int n, float a, float c) {
    if (n == 0) return a * v[0] + c;
    if (n < 0) return a * sqrtf(parts_total(v, -n)) + c;
    return a * sqrtf(block_sumsq(v, n)) + c;
}

// The DP-LLM decision of one token: its estimate above thr. The same
// arithmetic wherever an estimate or a decision is made, so every path decides alike.
__device__ bool decide_high(const float* v, int n, float a, float c, float thr) {
    volatile float e = block_estimate(v, n, a, c);  // rounded to f32 as an estimate stored in memory is
    return e > thr;
}

// ---- activations split for the bit-plane GEMV -------------------------------
// The GEMV (bitplane_gemv.cu) reads each token's activations as f16 halves
// x = hi + lo, [2][n][cols_p] (cols_p: the columns padded to 128, zero past
// the last). The ops that make a linear's input (the norms, SwiGLU) can
// write them beside their f32 output, so no linear reading it splits it again.

// Where column c of a token's activations sits in its row of halves: the
// 16-byte pieces of lane t's 64 bytes (columns 32t .. 32t + 31 of a column
// block) are swapped in pairs for t = 2, 3, so the four lanes' loads of one
// piece hit distinct shared-memory banks.
__device__ __forceinline__ int x_slot(int c) { return c ^ (((c >> 6) & 1) << 3); }

// v as f16 hi (v rounded) and lo (v - hi rounded).
__device__ __forceinline__ void split_half(float v, u16& hi, u16& lo) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(v));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(v - h2f(hi)));
}

// Columns c .. c + K - 1 (K = 1, 4 or 8; c a multiple of K) of token tok,
// v[0..K), into xs [2][n][cols_p] as halves (one K-wide store each: x_slot
// keeps 8 aligned columns together).
template <int K>
__device__ __forceinline__ void split_store(u16* xs, int n, int cols_p, int tok, int c, const float* v) {
    u16* hi = xs + (long long)tok * cols_p + x_slot(c);
    u16* lo = hi + (long long)n * cols_p;
    if constexpr (K == 1) {
        split_half(v[0], hi[0], lo[0]);
    } else {
        u32 hw[K / 2], lw[K / 2];
#pragma unroll
        for (int k = 0; k < K / 2; ++k) {
            u16 h0, h1, l0, l1;
            split_half(v[2 * k], h0, l0);
            split_half(v[2 * k + 1], h1, l1);
            hw[k] = (u32)h0 | (u32)h1 << 16;
            lw[k] = (u32)l0 | (u32)l1 << 16;
        }
        if constexpr (K == 8) {
            *reinterpret_cast<uint4*>(hi) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
            *reinterpret_cast<uint4*>(lo) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
        } else {
            *reinterpret_cast<uint2*>(hi) = make_uint2(hw[0], hw[1]);
            *reinterpret_cast<uint2*>(lo) = make_uint2(lw[0], lw[1]);
        }
    }
}

// The padding of token tok's halves (columns cols .. cols_p) set to zero by
// the block's threads.
__device__ __forceinline__ void split_pad(u16* xs, int n, int cols, int cols_p, int tok) {
    for (int c = cols + threadIdx.x; c < cols_p; c += blockDim.x) {
        const float z = 0.f;
        split_store<1>(xs, n, cols_p, tok, c, &z);
    }
}
