// Bit-plane GEMV: y[t][r] = sum_c lut_r[idx_rc] * x[t][c] for NT tokens at B bits.
//
// Device layout (made by the host at upload, see bitplane.rs):
//   planes [plane][row group g = r / 4][word w][row q = r % 4] as u32, so one
//   16-byte load holds word w of one plane for the 4 rows of a group; inside a
//   word, bit 4i + k holds column 32w + 8k + i (i < 8, k < 4), so residue k of
//   the nibble transpose below covers 8 consecutive columns.
//   luts [row][2^B] f16 (rows padded to a multiple of 4 with zeros).
// A thread takes one row group and one word at a time (4 rows x 32 columns);
// TPR threads share a row group and sum their partial dots at the end. The
// group's LUTs are widened to f32 in shared memory (at most 32 entries per row
// sit in distinct banks up to 5 bits, so lookups of one row do not conflict).
// Accumulation is f32.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Nibble i of the result holds, from bit COUNT-1 down to bit 0, bit 4i + k of
// p[0..COUNT) (p[0] the most significant plane).
template <int COUNT>
__device__ __forceinline__ u32 nibbles(const u32* p, int k) {
    u32 r = 0;
#pragma unroll
    for (int m = 0; m < COUNT; ++m) {
        const int to = COUNT - 1 - m;
        const int sh = to - k;
        const u32 v = sh >= 0 ? (p[m] << sh) : (p[m] >> (-sh));
        r |= v & (0x11111111u << to);
    }
    return r;
}

template <int B, int NT>
__device__ __forceinline__ void gemv(
    const uint4* __restrict__ planes, long long plane_stride,
    const u16* __restrict__ luts, const float* __restrict__ x, int x_stride,
    float* __restrict__ y, int y_stride, int rows, int cols, int words, int tpr) {
    constexpr int E = 1 << B;
    constexpr int LO = B < 4 ? B : 4;
    constexpr int HI = B - LO;
    extern __shared__ float smem[];
    const int gpb = blockDim.x / tpr;
    const int lg = threadIdx.x / tpr;
    const int lt = threadIdx.x % tpr;
    const int groups = (rows + 3) / 4;
    const int g0 = blockIdx.x * gpb;
    const int g = g0 + lg;
    float* lut_s = smem;
    float* red = smem + gpb * 4 * E;

    const int have = min(gpb, groups - g0) * 4 * E;
    for (int e = threadIdx.x; e < gpb * 4 * E; e += blockDim.x)
        lut_s[e] = e < have ? h2f(luts[(long long)g0 * 4 * E + e]) : 0.f;
    __syncthreads();

    float acc[4][NT];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[q][t] = 0.f;

    if (g < groups) {
        const float* L = lut_s + lg * 4 * E;
        for (int w = lt; w < words; w += tpr) {
            u32 p[4][B];
#pragma unroll
            for (int j = 0; j < B; ++j) {
                const uint4 v = __ldg(planes + j * plane_stride + (long long)g * words + w);
                p[0][j] = v.x;
                p[1][j] = v.y;
                p[2][j] = v.z;
                p[3][j] = v.w;
            }
            const bool whole = 32 * w + 32 <= cols;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float xv[NT][8];
                const int c0 = 32 * w + 8 * k;
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float* xt = x + (long long)t * x_stride + c0;
                    if (whole && ((x_stride & 3) == 0)) {
                        const float4 a = __ldg(reinterpret_cast<const float4*>(xt));
                        const float4 b = __ldg(reinterpret_cast<const float4*>(xt) + 1);
                        xv[t][0] = a.x; xv[t][1] = a.y; xv[t][2] = a.z; xv[t][3] = a.w;
                        xv[t][4] = b.x; xv[t][5] = b.y; xv[t][6] = b.z; xv[t][7] = b.w;
                    } else {
#pragma unroll
                        for (int i = 0; i < 8; ++i) xv[t][i] = c0 + i < cols ? xt[i] : 0.f;
                    }
                }
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const u32 lo = nibbles<LO>(p[q] + HI, k);
                    const u32 hi = HI > 0 ? nibbles<(HI > 0 ? HI : 1)>(p[q], k) : 0u;
                    const float* Lq = L + q * E;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        u32 idx = (lo >> (4 * i)) & 15u;
                        if (HI > 0) idx |= ((hi >> (4 * i)) & 15u) << 4;
                        const float v = Lq[idx];
#pragma unroll
                        for (int t = 0; t < NT; ++t) acc[q][t] = fmaf(v, xv[t][i], acc[q][t]);
                    }
                }
            }
        }
    }

    // Sum over the TPR threads of the group: within each warp, then across warps.
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                acc[q][t] += __shfl_xor_sync(0xffffffffu, acc[q][t], o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int t = 0; t < NT; ++t) red[(warp * 4 + q) * NT + t] = acc[q][t];
    }
    __syncthreads();
    const int wpg = tpr / 32;
    if (g < groups && lt < 4 * NT) {
        const int q = lt / NT, t = lt % NT;
        float s = 0.f;
        for (int v = 0; v < wpg; ++v) s += red[((lg * wpg + v) * 4 + q) * NT + t];
        const int r = 4 * g + q;
        if (r < rows) y[(long long)t * y_stride + r] = s;
    }
}

#define GEMV_KERNEL(B, NT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) bitplane_gemv_b##B##_t##NT(            \
        const uint4* planes, long long plane_stride, const u16* luts, const float* x,        \
        int x_stride, float* y, int y_stride, int rows, int cols, int words, int tpr) {      \
        gemv<B, NT>(planes, plane_stride, luts, x, x_stride, y, y_stride, rows, cols, words, \
                    tpr);                                                                    \
    }

#define GEMV_BITS(B) \
    GEMV_KERNEL(B, 1) GEMV_KERNEL(B, 2) GEMV_KERNEL(B, 3) GEMV_KERNEL(B, 4) \
    GEMV_KERNEL(B, 5) GEMV_KERNEL(B, 6) GEMV_KERNEL(B, 7) GEMV_KERNEL(B, 8)

GEMV_BITS(3)
GEMV_BITS(4)
GEMV_BITS(5)
GEMV_BITS(6)
GEMV_BITS(7)
GEMV_BITS(8)
