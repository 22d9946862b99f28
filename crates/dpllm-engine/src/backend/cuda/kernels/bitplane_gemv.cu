// Bit-plane GEMV: y[t][r] = sum_c lut_r[idx_rc] * x[t][c] for NT tokens at B bits.
//
// Device layout (made by the host at upload, see bitplane.rs), W = ceil(cols / 32):
//   planes [plane][row group g = r / 4][word w][row q = r % 4] as u32, so one
//   16-byte load holds word w of one plane for the 4 rows of a group. Word w
//   holds the columns w, W + w, 2W + w, ... (column (8k + i)·W + w at bit 4i + k,
//   i < 8, k < 4): lanes that take consecutive words read consecutive x values.
//   luts [row][2^B] f16 (rows padded to a multiple of 4 with zeros).
// A thread takes G row groups and one word at a time (4G rows x 32 columns);
// TPR threads share the row groups and sum their partial dots at the end.
//
// What limits such a kernel is the SM's load/store path (shared-memory LUT
// lookups, x loads), its integer issue rate and the lookups' latency, not DRAM,
// so the inner loop aims at one shared-memory lookup, one FMA and about two
// integer operations per weight (with the loop's overheads an H100 runs 6.4
// instructions a weight; docs/benchmarks.md):
// - a 4x4 bit transpose by delta swaps turns the low 4 planes of a row into 4
//   nibble words (word k: nibble i = the index bits of column slot 8k + i),
//   about 20 operations per 32 weights;
// - up to 4 bits, each nibble is moved to bits 2..5 of a byte (three
//   operations per 4 weights), the row's number q put in bits 6..7, and one
//   byte_perm per weight builds the shared-memory address of its LUT entry:
//   the group's 4 tables (16 floats each) share one 256-byte-aligned slot
//   (tried: a 256-byte slot per row, saving the OR: 10 % slower in one H100 run);
// - above 4 bits, the high nibbles come from the top planes the same way and
//   each weight's byte index is scaled to its row's table of 2^B floats.
// All lanes of a warp look up the same row's table at once; up to 5 bits it
// sits in distinct banks, so lookups do not conflict. x is read once per word
// for all 4G rows, coalesced. Accumulation is f32.

// (u32, u16, FULL and h2f come from common.cuh, prepended by the host.)

__device__ __forceinline__ float lds(u32 addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
    return v;
}

// Swap the bits of b selected by mask m with the bits of a s places higher.
__device__ __forceinline__ void delta_swap(u32& a, u32& b, int s, u32 m) {
    const u32 t = ((a >> s) ^ b) & m;
    b ^= t;
    a ^= t << s;
}

// On return w[k] holds, in nibble i, bit m = bit 4i + k of the input word m.
__device__ __forceinline__ void transpose4(u32 w[4]) {
    delta_swap(w[0], w[2], 2, 0x33333333u);
    delta_swap(w[1], w[3], 2, 0x33333333u);
    delta_swap(w[0], w[1], 1, 0x55555555u);
    delta_swap(w[2], w[3], 1, 0x55555555u);
}

// Sum V values (a power of two, at most 32) over the warp: on return lane l
// holds, in v[0], the sum of value l >> (5 - log2 V). 31 shuffles for 32 values.
template <int V>
__device__ __forceinline__ void warp_sums(float (&v)[V], int lane) {
#pragma unroll
    for (int step = 0; step < 5; ++step) {
        const int s = 16 >> step;
        const int n = V >> step;
        if (n > 1) {
            const bool up = lane & s;
#pragma unroll
            for (int i = 0; i < n / 2; ++i) {
                const float send = up ? v[i] : v[i + n / 2];
                const float keep = up ? v[i + n / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(FULL, send, s);
            }
        } else {
            v[0] += __shfl_xor_sync(FULL, v[0], s);
        }
    }
}

__host__ __device__ constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <int B, int NT, int G>
__device__ __forceinline__ void gemv(
    const uint4* __restrict__ planes, long long plane_stride,
    const u16* __restrict__ luts, const float* __restrict__ x, int x_stride,
    float* __restrict__ y, int y_stride, int rows, int cols, int words, int tpr,
    const u32* __restrict__ mask, u32 want) {
    // Per-token precision (DP-LLM): with a mask, only the tokens whose
    // decision equals `want` are written, and a block with none returns at once
    // (the same for every thread, so before any barrier).
    if (mask) {
        bool any = false;
#pragma unroll
        for (int t = 0; t < NT; ++t) any |= mask[t] == want;
        if (!any) return;
    }
    constexpr int E = 1 << B;
    constexpr int LO = B < 4 ? B : 4;
    constexpr int HI = B - LO;
    // Floats per row table: a 4-row slot of 256 bytes up to 4 bits, else 2^B each.
    constexpr int ROW = B <= 4 ? 16 : E;
    constexpr int NV = 4 * G * NT;
    constexpr int V = pow2_at_least(NV);
    extern __shared__ float smem[];
    const int sets = blockDim.x / tpr;       // row-group sets per block
    const int ls = threadIdx.x / tpr;        // this thread's set
    const int lt = threadIdx.x % tpr;        // its place in the set
    const int groups = (rows + 3) / 4;
    const int g0 = (blockIdx.x * sets + ls) * G;  // first row group of the set
    const int gb = blockIdx.x * sets * G;         // first row group of the block
    // The tables start at a 256-byte boundary of the shared window.
    const u32 smem_base = (u32)__cvta_generic_to_shared(smem);
    const int pad = (int)(((256u - (smem_base & 255u)) & 255u) / 4u);
    float* lut_s = smem + pad;
    float* red = lut_s + sets * G * 4 * ROW;

    // The planes of G row groups at word w (row groups past the end read the last one).
    auto load = [&](u32 (&dst)[G][B][4], int w) {
#pragma unroll
        for (int gi = 0; gi < G; ++gi) {
            const int g = min(g0 + gi, groups - 1);
#pragma unroll
            for (int j = 0; j < B; ++j) {
                const uint4 v = __ldg(planes + j * plane_stride + (long long)g * words + w);
                dst[gi][j][0] = v.x;
                dst[gi][j][1] = v.y;
                dst[gi][j][2] = v.z;
                dst[gi][j][3] = v.w;
            }
        }
    };
    const int have = min(sets * G, groups - gb) * 4;
    for (int e = threadIdx.x; e < sets * G * 4 * ROW; e += blockDim.x) {
        const int r = e / ROW, i = e % ROW;
        lut_s[e] = (r < have && i < E) ? h2f(luts[((long long)gb * 4 + r) * E + i]) : 0.f;
    }
    __syncthreads();

    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;

    const bool full = cols == 32 * words;
    if (g0 < groups) {
        for (int w = lt; w < words; w += tpr) {
            // All G·B loads first, so they are in flight together. (Requesting
            // the next word's planes before using these measured no faster.)
            u32 p[G][B][4];
            load(p, w);
            // The nibble words of every row: lo[gi][q][k] (and hi above 4 bits).
            u32 lo[G][4][4], hi[G][4][4];
#pragma unroll
            for (int gi = 0; gi < G; ++gi)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
#pragma unroll
                    for (int m = 0; m < 4; ++m) {
                        lo[gi][q][m] = m < LO ? p[gi][B - 1 - m][q] : 0u;
                        hi[gi][q][m] = m < HI ? p[gi][HI - 1 - m][q] : 0u;
                    }
                    transpose4(lo[gi][q]);
                    if (HI > 0) transpose4(hi[gi][q]);
                }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                // Column slots 8k..8k+7 of this word: columns (8k + i)·W + w, coalesced across lanes.
                float xv[NT][8];
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const float* xt = x + (long long)t * x_stride + w;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const int c = (8 * k + i) * words;
                        // Every slot is a column when cols is a multiple of 32.
                        xv[t][i] = (full || c + w < cols) ? __ldg(xt + c) : 0.f;
                    }
                }
#pragma unroll
                for (int gi = 0; gi < G; ++gi) {
                    const u32 table =
                        (u32)__cvta_generic_to_shared(lut_s + (ls * G + gi) * 4 * ROW);
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        float v[8];
                        if (B <= 4) {
                            const u32 rowbits = (u32)q * 0x40404040u;
                            const u32 l = lo[gi][q][k];
                            const u32 ev = ((l << 2) & 0x3c3c3c3cu) | rowbits;
                            const u32 od = ((l >> 2) & 0x3c3c3c3cu) | rowbits;
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                v[2 * j] = lds(__byte_perm(ev, table, 0x7650 | j));
                                v[2 * j + 1] = lds(__byte_perm(od, table, 0x7650 | j));
                            }
                        } else {
                            const u32 l = lo[gi][q][k], h = hi[gi][q][k];
                            const u32 ev = (l & 0x0f0f0f0fu) | ((h & 0x0f0f0f0fu) << 4);
                            const u32 od = ((l >> 4) & 0x0f0f0f0fu) | (h & 0xf0f0f0f0u);
                            const u32 base = table + (u32)(q * E * 4);
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                v[2 * j] = lds(base + 4 * __byte_perm(ev, 0, 0x4440 | j));
                                v[2 * j + 1] = lds(base + 4 * __byte_perm(od, 0, 0x4440 | j));
                            }
                        }
#pragma unroll
                        for (int t = 0; t < NT; ++t)
#pragma unroll
                            for (int i = 0; i < 8; ++i) {
                                float& a = acc[(gi * 4 + q) * NT + t];
                                a = fmaf(v[i], xv[t][i], a);
                            }
                    }
                }
            }
        }
    }

    // Sum over the TPR threads of the set: within each warp, then across warps.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_sums<V>(acc, lane);
    constexpr int REP = 32 / V;  // lanes holding each value
    if (lane % REP == 0) red[warp * V + lane / REP] = acc[0];
    __syncthreads();
    const int wps = tpr / 32;
    if (lt < NV) {
        float s = 0.f;
        for (int u = 0; u < wps; ++u) s += red[(ls * wps + u) * V + lt];
        const int gi = lt / (4 * NT), q = (lt / NT) % 4, t = lt % NT;
        const int r = 4 * (g0 + gi) + q;
        if (g0 + gi < groups && r < rows && (!mask || mask[t] == want))
            y[(long long)t * y_stride + r] = s;
    }
}

#define GEMV_KERNEL(B, NT, G)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) bitplane_gemv_b##B##_t##NT##_g##G(       \
        const uint4* planes, long long plane_stride, const u16* luts, const float* x,         \
        int x_stride, float* y, int y_stride, int rows, int cols, int words, int tpr,         \
        const u32* mask, u32 want) {                                                          \
        gemv<B, NT, G>(planes, plane_stride, luts, x, x_stride, y, y_stride, rows, cols, words, \
                       tpr, mask, want);                                                      \
    }

#define GEMV_BITS(B)                                                                           \
    GEMV_KERNEL(B, 1, 1) GEMV_KERNEL(B, 1, 2) GEMV_KERNEL(B, 1, 4) GEMV_KERNEL(B, 2, 1)       \
    GEMV_KERNEL(B, 2, 2) GEMV_KERNEL(B, 3, 1) GEMV_KERNEL(B, 4, 1) GEMV_KERNEL(B, 5, 1)       \
    GEMV_KERNEL(B, 6, 1) GEMV_KERNEL(B, 7, 1) GEMV_KERNEL(B, 8, 1)

// One token whose precision is decided in the kernel (DP-LLM, b_h = b_l + 1):
// every block works out the decision from the estimator's input e_in (n_e
// values: the linear's input, or a JL estimator's projection) and runs the GEMV
// at BL + 1 bits (tables luts_high) when a * ||e_in|| + c > thr, else at BL
// (luts_low). The first block adds the decision to count[slot] when count is
// given. One launch instead of an estimate, a decision and two masked GEMVs.
#define GEMV_SELECT_KERNEL(BL, G)                                                                \
    extern "C" __global__ void __launch_bounds__(256) bitplane_gemv_select_b##BL##_g##G(         \
        const uint4* planes, long long plane_stride, const u16* luts_low, const u16* luts_high,  \
        const float* x, float* y, int rows, int cols, int words, int tpr, const float* e_in,     \
        int n_e, float a, float c, float thr, float* count, int slot) {                          \
        const bool high = decide_high(e_in, n_e, a, c, thr);                                     \
        if (high && count && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(count + slot, 1.f); \
        if (high)                                                                                \
            gemv<BL + 1, 1, G>(planes, plane_stride, luts_high, x, cols, y, rows, rows, cols,    \
                               words, tpr, nullptr, 0u);                                         \
        else                                                                                     \
            gemv<BL, 1, G>(planes, plane_stride, luts_low, x, cols, y, rows, rows, cols, words,  \
                           tpr, nullptr, 0u);                                                    \
    }

GEMV_SELECT_KERNEL(3, 1) GEMV_SELECT_KERNEL(3, 2) GEMV_SELECT_KERNEL(4, 1) GEMV_SELECT_KERNEL(4, 2)
GEMV_SELECT_KERNEL(5, 1) GEMV_SELECT_KERNEL(5, 2) GEMV_SELECT_KERNEL(6, 1) GEMV_SELECT_KERNEL(6, 2)
GEMV_SELECT_KERNEL(7, 1) GEMV_SELECT_KERNEL(7, 2)

GEMV_BITS(3)
GEMV_BITS(4)
GEMV_BITS(5)
GEMV_BITS(6)
GEMV_BITS(7)
GEMV_BITS(8)

// The weight at `bits` as f32 [rows x cols] (for long batches, which run as one
// GEMM): one thread per (row, word), reading `bits` planes and the row's LUT.
// Index bits are MSB first: plane j gives bit bits-1-j.
extern "C" __global__ void bitplane_dequant(const u32* planes, long long plane_stride, const u16* luts,
                                            int bits, float* out, int rows, int cols, int words) {
    const long long total = (long long)rows * words;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(e / words), w = (int)(e % words);
        const long long at = ((long long)(r / 4) * words + w) * 4 + r % 4;
        u32 p[8];
        for (int j = 0; j < bits; ++j) p[j] = planes[j * plane_stride * 4 + at];
        const u16* lut = luts + ((long long)r << bits);
        for (int s = 0; s < 32; ++s) {
            const int c = s * words + w;
            if (c >= cols) break;
            const int bit = 4 * (s % 8) + s / 8;
            u32 idx = 0;
            for (int j = 0; j < bits; ++j) idx |= ((p[j] >> bit) & 1u) << (bits - 1 - j);
            out[(long long)r * cols + c] = h2f(lut[idx]);
        }
    }
}
