// The forward pass's ops besides the bit-plane GEMV: norms, RoPE, attention,
// elementwise ops, row moves, dense linears, embeddings, DP-LLM estimates and
// decisions. Activations are f32, row-major [n x width], one row per token.
// Every kernel checks its own bounds, so any grid that covers the work is valid.

// ---- norms ----------------------------------------------------------------

// One block per segment of d values: out = x / sqrt(mean(x^2) + eps) * w.
// In place when out == x (each thread writes only what it read).
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, float* out, int d) {
    const long base = (long)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = x[base + i];
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[base + i] = x[base + i] * inv * w[i];
}

// One block per row of d values: out[row] = a * ||x_row|| + c (the DP-LLM estimates).
extern "C" __global__ void row_norm_affine(const float* x, int d, float a, float c, float* out) {
    const float e = block_estimate(x + (long)blockIdx.x * d, d, a, c);
    if (threadIdx.x == 0) out[blockIdx.x] = e;
}

// One block per row of d values: the DP-LLM decision flags[row] =
// a * ||x_row|| + c > thr; with count, count[slot] += the rows sent high
// (count[slot] holds 0 before).
extern "C" __global__ void decide_norm(const float* x, int d, float a, float c, float thr, u32* flags,
                                       float* count, int slot) {
    const bool high = decide_high(x + (long)blockIdx.x * d, d, a, c, thr);
    if (threadIdx.x == 0) {
        flags[blockIdx.x] = high ? 1u : 0u;
        if (count && high) atomicAdd(count + slot, 1.f);
    }
}

// ---- elementwise ----------------------------------------------------------

// gate = silu(gate) * up.
extern "C" __global__ void swiglu(float* gate, const float* up, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// h += x.
extern "C" __global__ void fill(float* x, long n, float value) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" __global__ void add(float* h, const float* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        h[i] += x[i];
}

// y[t][r] += bias[r] for y [n x rows].
extern "C" __global__ void add_bias(float* y, const float* bias, int rows, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] += bias[i % rows];
}

// Rotate pairs (i, i + rot/2) of every head of x [n x heads x hd] at positions
// pos0 = step[0].. by the table's angles ([position][cos 0..rot/2 | sin 0..rot/2]).
// Positions come from the step in device memory, so a recorded graph replays.
extern "C" __global__ void rope(float* x, const float* table, int n, int heads, int hd, int rot, const u32* step) {
    const int half = rot / 2, pos0 = (int)step[0];
    const long total = (long)n * heads * half;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x) {
        const int i = j % half;
        const long th = j / half;  // token * heads + head
        const int t = th / heads;
        const float* row = table + (long)(pos0 + t) * rot;
        float* h = x + th * hd;
        const float a = h[i], b = h[i + half], c = row[i], s = row[half + i];
        h[i] = a * c - b * s;
        h[i + half] = b * c + a * s;
    }
}

// ---- KV cache -------------------------------------------------------------

// Keys and values [n x d] of positions step[0].. into one layer's cache.
extern "C" __global__ void kv_store(const float* k, const float* v, float* kc, float* vc, const u32* step,
                                    long nd, int d) {
    const long o = (long)step[0] * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < nd; i += (long)gridDim.x * blockDim.x) {
        kc[o + i] = k[i];
        vc[o + i] = v[i];
    }
}

// ---- row moves ------------------------------------------------------------

// out [n x width] = columns off..off+width of x [n x total].
extern "C" __global__ void split_cols(const float* x, int n, int total, int off, int width, float* out) {
    const long count = (long)n * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < count; j += (long)gridDim.x * blockDim.x) {
        const long t = j / width;
        out[j] = x[t * total + off + j % width];
    }
}

// out row i = x row idx[i], for i < count.
extern "C" __global__ void gather_rows(const float* x, int width, const u32* idx, int count, float* out) {
    const long total = (long)count * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        out[j] = x[(long)idx[j / width] * width + j % width];
}

// dst row idx[i] = src row i, for i < count.
extern "C" __global__ void scatter_rows(const float* src, int width, const u32* idx, int count, float* dst) {
    const long total = (long)count * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        dst[(long)idx[j / width] * width + j % width] = src[j];
}

// Sum of x [n4 float4s] into *out (set to 0 before): a read-bandwidth probe.
extern "C" __global__ void read_sum(const float4* x, long n4, float* out) {
    float s = 0.f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        const float4 v = x[i];
        s += (v.x + v.y) + (v.z + v.w);
    }
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

// ---- random weights (benchmarks) ----------------------------------------

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = random bits.
extern "C" __global__ void fill_random_u32(u32* out, long n, unsigned long long seed) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = (u32)(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1)) >> 32);
}

// out[i] = f16 bits of a uniform value in [-scale, scale).
extern "C" __global__ void fill_random_f16(u16* out, long n, float scale, unsigned long long seed) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const unsigned long long z = mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1));
        const float u = (float)(z >> 40) * (1.f / 16777216.f);
        u16 h;
        const float v = (2.f * u - 1.f) * scale;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        out[i] = h;
    }
}

// ---- checks and decisions -------------------------------------------------

// h += x, and flags[slot] as flag_non_finite sets it for the sum.
extern "C" __global__ void add_flag(float* h, const float* x, long n, int width, float* flags, int slot) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float v = h[i] + x[i];
        h[i] = v;
        if (!isfinite(v)) atomicMin((u32*)(flags + slot), __float_as_uint((float)(i / width)));
    }
}

// flags[slot] = min(flags[slot], first token of x [. x width] holding a NaN or
// infinity). flags holds non-negative floats, whose bits order as unsigned ints.
extern "C" __global__ void flag_non_finite(const float* x, long n, int width, float* flags, int slot) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) atomicMin((u32*)(flags + slot), __float_as_uint((float)(i / width)));
}

// out[slot] = the number of set flags among n (one warp).
extern "C" __global__ void count_flags(const u32* flags, int n, float* out, int slot) {
    float c = 0.f;
    for (int t = threadIdx.x; t < n; t += 32) c += flags[t] != 0u ? 1.f : 0.f;
    c = warp_sum(c);
    if (threadIdx.x == 0) out[slot] = c;
}

// flags[t] = values[t] > threshold.
extern "C" __global__ void threshold(const float* values, int n, float thr, u32* flags) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) flags[t] = values[t] > thr ? 1u : 0u;
}

// ---- dense weights --------------------------------------------------------
// Stored forms: 0 f32, 1 f16, 2 bf16, 3 Q8_0 (int8 [rows x cols] with one f16
// scale per 32 columns, [rows x cols/32]).

template <int T>
__device__ __forceinline__ float ldw(const void* w, const u16* scales, long r, int c, int cols) {
    const long i = r * cols + c;
    if (T == 0) return ((const float*)w)[i];
    if (T == 1) return h2f(((const u16*)w)[i]);
    if (T == 2) return bf2f(((const u16*)w)[i]);
    return (float)((const signed char*)w)[i] * h2f(scales[r * (cols / 32) + c / 32]);
}

// out [n x cols] = rows tokens[t] of the table.
template <int T>
__device__ void embed(const void* w, const u16* scales, const u32* tokens, int n, int cols, float* out) {
    const long total = (long)n * cols;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        out[j] = ldw<T>(w, scales, tokens[j / cols], j % cols, cols);
}

// y [NT x rows] (row stride ys) = x [NT x cols] (row stride xs) . W^T (+ bias):
// one warp per output row, coalesced weight loads, f32 accumulation.
template <int T, int NT>
__device__ void dense_gemv(const void* w, const u16* scales, const float* x, int xs, const float* bias,
                           int has_bias, float* y, int ys, int rows, int cols) {
    const long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    for (int c = lane; c < cols; c += 32) {
        const float wv = ldw<T>(w, scales, r, c, cols);
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = fmaf(wv, x[(long)t * xs + c], acc[t]);
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(long)t * ys + r] = s + (has_bias ? bias[r] : 0.f);
    }
}

// [dense_gemv] for 16-bit weights with cols a multiple of 8 (and x rows
// 16-byte aligned): each lane reads 8 weights (16 bytes) and 8 activations a
// step, several steps in flight.
template <int T, int NT>
__device__ void dense_gemv_v8(const void* w, const float* x, int xs, const float* bias, int has_bias,
                              float* y, int ys, int rows, int cols) {
    const long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const uint4* wr = (const uint4*)((const u16*)w + r * cols);
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    const int steps = cols / 8;
#pragma unroll 4
    for (int c8 = lane; c8 < steps; c8 += 32) {
        const uint4 v = __ldg(wr + c8);
        const u32 p[4] = {v.x, v.y, v.z, v.w};
        float wv[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            wv[2 * i] = T == 1 ? h2f((u16)(p[i] & 0xffffu)) : bf2f((u16)(p[i] & 0xffffu));
            wv[2 * i + 1] = T == 1 ? h2f((u16)(p[i] >> 16)) : bf2f((u16)(p[i] >> 16));
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float4* xt = (const float4*)(x + (long)t * xs) + 2 * c8;
            const float4 a = __ldg(xt), b = __ldg(xt + 1);
            float s = acc[t];
            s = fmaf(wv[0], a.x, s);
            s = fmaf(wv[1], a.y, s);
            s = fmaf(wv[2], a.z, s);
            s = fmaf(wv[3], a.w, s);
            s = fmaf(wv[4], b.x, s);
            s = fmaf(wv[5], b.y, s);
            s = fmaf(wv[6], b.z, s);
            s = fmaf(wv[7], b.w, s);
            acc[t] = s;
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) y[(long)t * ys + r] = s + (has_bias ? bias[r] : 0.f);
    }
}

#define DENSE_V8_T(NAME, T, NT)                                                                       \
    extern "C" __global__ void dense_##NAME##_v8_t##NT(const void* w, const u16* scales, const float* x, \
                                                       int xs, const float* bias, int has_bias, float* y,  \
                                                       int ys, int rows, int cols) {                       \
        dense_gemv_v8<T, NT>(w, x, xs, bias, has_bias, y, ys, rows, cols);                                \
    }

#define DENSE_V8(NAME, T)                                                                         \
    DENSE_V8_T(NAME, T, 1) DENSE_V8_T(NAME, T, 2) DENSE_V8_T(NAME, T, 3) DENSE_V8_T(NAME, T, 4)   \
    DENSE_V8_T(NAME, T, 5) DENSE_V8_T(NAME, T, 6) DENSE_V8_T(NAME, T, 7) DENSE_V8_T(NAME, T, 8)

DENSE_V8(f16, 1)
DENSE_V8(bf16, 2)

#define DENSE_T(NAME, T, NT)                                                                        \
    extern "C" __global__ void dense_##NAME##_t##NT(const void* w, const u16* scales, const float* x, \
                                                    int xs, const float* bias, int has_bias, float* y,  \
                                                    int ys, int rows, int cols) {                       \
        dense_gemv<T, NT>(w, scales, x, xs, bias, has_bias, y, ys, rows, cols);                        \
    }

#define DENSE(NAME, T)                                                                              \
    extern "C" __global__ void embed_##NAME(const void* w, const u16* scales, const u32* tokens, int n, \
                                            int cols, float* out) {                                    \
        embed<T>(w, scales, tokens, n, cols, out);                                                     \
    }                                                                                               \
    DENSE_T(NAME, T, 1) DENSE_T(NAME, T, 2) DENSE_T(NAME, T, 3) DENSE_T(NAME, T, 4)                 \
    DENSE_T(NAME, T, 5) DENSE_T(NAME, T, 6) DENSE_T(NAME, T, 7) DENSE_T(NAME, T, 8)

DENSE(f32, 0)
DENSE(f16, 1)
DENSE(bf16, 2)
DENSE(q8_0, 3)

// out [rows x cols] f32 = the stored weight (for long batches, one GEMM).
template <int T>
__device__ void widen(const void* w, const u16* scales, int rows, int cols, float* out) {
    const long total = (long)rows * cols;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        out[j] = ldw<T>(w, scales, j / cols, j % cols, cols);
}

extern "C" __global__ void widen_f16(const void* w, const u16* s, int rows, int cols, float* out) { widen<1>(w, s, rows, cols, out); }
extern "C" __global__ void widen_bf16(const void* w, const u16* s, int rows, int cols, float* out) { widen<2>(w, s, rows, cols, out); }
extern "C" __global__ void widen_q8_0(const void* w, const u16* s, int rows, int cols, float* out) { widen<3>(w, s, rows, cols, out); }

// Rows of y [n x width] whose flag is 0 become the rows of low.
extern "C" __global__ void blend_rows(float* y, const float* low, const u32* flags, int n, int width) {
    const long total = (long)n * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        if (flags[j / width] == 0u) y[j] = low[j];
}

// ---- attention ------------------------------------------------------------
// Causal attention of query token t (blockIdx.y) and head h (blockIdx.x) over
// positions lo..=pos0+t (pos0 = step[0]) of one layer's cache (k, v [positions x kv_dim]), with
// grouped KV heads and an optional window (0: none). Each warp runs an online
// softmax over every ATT_WARPS-th position, keeping the head's output in
// registers (ATT_MAXD / 32 per lane); the warps' partial results are merged at
// the end.

#define ATT_WARPS 4
#define ATT_MAXD 256

extern "C" __global__ void attention(const float* q, const float* k, const float* v, float* out,
                                     const u32* step, int nh, int nkv, int hd, int window, float scale) {
    const int pos0 = (int)step[0];
    const int h = blockIdx.x, t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvd = nkv * hd, qd = nh * hd;
    const long kvo = (long)(h / (nh / nkv)) * hd;
    const int pos = pos0 + t;
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    float qr[ATT_MAXD / 32], acc[ATT_MAXD / 32];
#pragma unroll
    for (int m = 0; m < ATT_MAXD / 32; m++) {
        const int i = lane + 32 * m;
        qr[m] = i < hd ? q[(long)t * qd + (long)h * hd + i] * scale : 0.f;
        acc[m] = 0.f;
    }
    float mx = NEG_INF, l = 0.f;
    for (int j = lo + warp; j <= pos; j += ATT_WARPS) {
        const float* kr = k + (long)j * kvd + kvo;
        float s = 0.f;
#pragma unroll
        for (int m = 0; m < ATT_MAXD / 32; m++) {
            const int i = lane + 32 * m;
            if (i < hd) s = fmaf(qr[m], kr[i], s);
        }
        s = warp_sum(s);
        const float nm = fmaxf(mx, s);
        const float corr = expf(mx - nm), p = expf(s - nm);
        l = l * corr + p;
        const float* vr = v + (long)j * kvd + kvo;
#pragma unroll
        for (int m = 0; m < ATT_MAXD / 32; m++) {
            const int i = lane + 32 * m;
            if (i < hd) acc[m] = fmaf(acc[m], corr, p * vr[i]);
        }
        mx = nm;
    }
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS], sm_acc[ATT_WARPS][ATT_MAXD];
    if (lane == 0) {
        sm_m[warp] = mx;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int m = 0; m < ATT_MAXD / 32; m++) {
        const int i = lane + 32 * m;
        if (i < hd) sm_acc[warp][i] = acc[m];
    }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) big = fmaxf(big, sm_m[w]);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float total = 0.f, o = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            if (sm_m[w] == NEG_INF) continue;  // a warp that saw no position
            const float f = expf(sm_m[w] - big);
            total += sm_l[w] * f;
            o += sm_acc[w][i] * f;
        }
        out[(long)t * qd + (long)h * hd + i] = o / total;
    }
}
