// The forward pass's ops besides the bit-plane GEMV: norms, RoPE, attention,
// elementwise ops, row moves, dense linears, embeddings, DP-LLM estimates and
// decisions. Activations are f32, row-major [n x width], one row per token.
// Every kernel checks its own bounds, so any grid that covers the work is valid.

// ---- norms ----------------------------------------------------------------

// float4s of a row each thread of rms_norm keeps in registers (`NORM_VECS` on the host).
#define NORM_V 4

// Sums of the four values over the block, in every thread (as block_sum).
__device__ float4 block_sum4(float4 v) {
    __shared__ float4 part4[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = make_float4(warp_sum(v.x), warp_sum(v.y), warp_sum(v.z), warp_sum(v.w));
    __syncthreads();  // part4 may still be read by a previous call
    if (lane == 0) part4[warp] = v;
    __syncthreads();
    float4 s = lane < (int)(blockDim.x >> 5) ? part4[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
    return make_float4(warp_sum(s.x), warp_sum(s.y), warp_sum(s.z), warp_sum(s.w));
}

// What norm_row sums over a row: r^2 and (r w)^2 for the row r it norms, and
// the same for the row before the add (s): Σr² gives the norm's scale, and
// ||RMSNorm(r) ⊙ ... || = scale · sqrt(Σ(r w)²) the estimator input's norm.
struct RowSums {
    float rr = 0.f, rw = 0.f, ss = 0.f, sw = 0.f;
    __device__ __forceinline__ void add(float r, float s, float g) {
        rr += r * r;
        rw += (r * g) * (r * g);
        ss += s * s;
        sw += (s * g) * (s * g);
    }
};

// RMSNorm of one row of d values by the block: out = r / sqrt(mean(r^2) + eps) * w
// for r = src, or with add given r = src + add, written back to src (then a
// NaN or infinity in r lowers flags[slot] to `token`, as flag_non_finite
// does). out may be src (each thread writes only what it read). With after
// and before given, *after = ||out|| and *before = the norm of RMSNorm(src
// before the add) with w: the DP-LLM estimator inputs' norms, so
// the linears that follow need not read their rows. With xs given, out goes
// there too as the bit-plane GEMV's halves (row `token` of [2][n][cols_p],
// common.cuh). A row of at most NORM_V float4s a thread is read once, into
// registers, with every load in flight; any other row is read twice.
__device__ void norm_row(float* src, const float* add, const float* w, float eps, float* out, int d,
                         float* flags, int slot, int token, float* after, float* before, u16* xs, int n,
                         int cols_p) {
    const int bd = blockDim.x, n4 = d >> 2;
    bool bad = false;
    RowSums sums;
    float inv;
    if ((d & 3) == 0 && n4 <= NORM_V * bd && aligned16(src) && aligned16(add) && aligned16(w) &&
        aligned16(out)) {
        float4* s4 = (float4*)src;
        const float4* w4 = (const float4*)w;
        float4 r[NORM_V], g[NORM_V];
#pragma unroll
        for (int u = 0; u < NORM_V; u++) {
            const int i = threadIdx.x + u * bd;
            const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
            r[u] = i < n4 ? s4[i] : zero;
            g[u] = i < n4 ? w4[i] : zero;  // requested with the row: one round trip, not two
            const float4 s = r[u];
            if (add && i < n4) {
                const float4 a = ((const float4*)add)[i];
                r[u] = make_float4(r[u].x + a.x, r[u].y + a.y, r[u].z + a.z, r[u].w + a.w);
                s4[i] = r[u];
                bad |= !(isfinite(r[u].x) && isfinite(r[u].y) && isfinite(r[u].z) && isfinite(r[u].w));
            }
            sums.add(r[u].x, s.x, g[u].x);
            sums.add(r[u].y, s.y, g[u].y);
            sums.add(r[u].z, s.z, g[u].z);
            sums.add(r[u].w, s.w, g[u].w);
        }
        if (bad) atomicMin((u32*)(flags + slot), __float_as_uint((float)token));
        if (after) {
            const float4 t = block_sum4(make_float4(sums.rr, sums.rw, sums.ss, sums.sw));
            sums.rr = t.x, sums.rw = t.y, sums.ss = t.z, sums.sw = t.w;
        } else {
            sums.rr = block_sum(sums.rr);
        }
        inv = rsqrtf(sums.rr / (float)d + eps);
        float4* o4 = (float4*)out;
#pragma unroll
        for (int u = 0; u < NORM_V; u++) {
            const int i = threadIdx.x + u * bd;
            if (i < n4) {
                const float o[4] = {r[u].x * inv * g[u].x, r[u].y * inv * g[u].y, r[u].z * inv * g[u].z,
                                    r[u].w * inv * g[u].w};
                o4[i] = make_float4(o[0], o[1], o[2], o[3]);
                if (xs) split_store<4>(xs, n, cols_p, token, 4 * i, o);
            }
        }
    } else {
        if (add || after) {
            for (int i = threadIdx.x; i < d; i += bd) {
                const float s = src[i], v = add ? s + add[i] : s;
                if (add) {
                    src[i] = v;
                    bad |= !isfinite(v);
                }
                sums.add(v, s, w[i]);
            }
            if (bad) atomicMin((u32*)(flags + slot), __float_as_uint((float)token));
            const float4 t = block_sum4(make_float4(sums.rr, sums.rw, sums.ss, sums.sw));
            sums.rr = t.x, sums.rw = t.y, sums.ss = t.z, sums.sw = t.w;
        } else {
            sums.rr = block_sumsq(src, d);
        }
        inv = rsqrtf(sums.rr / (float)d + eps);
        for (int i = threadIdx.x; i < d; i += bd) {
            const float o = src[i] * inv * w[i];
            out[i] = o;
            if (xs) split_store<1>(xs, n, cols_p, token, i, &o);
        }
    }
    if (xs) split_pad(xs, n, d, cols_p, token);
    if (after && threadIdx.x == 0) {
        *after = inv * sqrtf(sums.rw);
        *before = rsqrtf(sums.ss / (float)d + eps) * sqrtf(sums.sw);
    }
}

// One block per segment of d values of x: out = x / sqrt(mean(x^2) + eps) * w.
// In place when out == x. With xs, out's n = gridDim.x rows also go there
// split for the bit-plane GEMV (norm_row).
extern "C" __global__ void rms_norm(float* x, const float* w, float eps, float* out, int d, u16* xs,
                                    int cols_p) {
    pdl_enter();
    const long base = (long)blockIdx.x * d;
    norm_row(x + base, nullptr, w, eps, out + base, d, nullptr, 0, blockIdx.x, nullptr, nullptr, xs,
             gridDim.x, cols_p);
}

// One block per token: h += x, checked as add_flag does, then out = the
// RMSNorm of h with w (d = the width of a token); with after and before
// ([n] each, or both null), the norms of the estimator inputs, and with xs
// out split for the bit-plane GEMV (norm_row).
extern "C" __global__ void add_flag_norm(float* h, const float* x, const float* w, float eps, float* out, int d,
                                         float* flags, int slot, float* after, float* before, u16* xs,
                                         int cols_p) {
    pdl_enter();
    const long base = (long)blockIdx.x * d;
    const int t = blockIdx.x;
    norm_row(h + base, x + base, w, eps, out + base, d, flags, slot, t, after ? after + t : nullptr,
             before ? before + t : nullptr, xs, gridDim.x, cols_p);
}

// Row `row` of x [. x d], with d = 0 its norm x[row], with d < 0 its -d
// parts of the sum of squares (block_estimate's input).
__device__ __forceinline__ const float* est_row(const float* x, int d, int row) {
    return d > 0 ? x + (long)row * d : d < 0 ? x + (long)row * -d : x + row;
}

// One block per row of d values: out[row] = a * ||x_row|| + c (the DP-LLM
// estimates); with d = 0, x holds the rows' norms, with d < 0 their sums of
// squares in -d parts.
extern "C" __global__ void row_norm_affine(const float* x, int d, float a, float c, float* out) {
    pdl_enter();
    const float e = block_estimate(est_row(x, d, blockIdx.x), d, a, c);
    if (threadIdx.x == 0) out[blockIdx.x] = e;
}

// One block per row of d values (or with d = 0 of its norm, as
// row_norm_affine): the DP-LLM decision flags[row] = a * ||x_row|| + c > thr;
// with count, count[slot] += the rows sent high (count[slot] holds 0 before).
extern "C" __global__ void decide_norm(const float* x, int d, float a, float c, float thr, u32* flags,
                                       float* count, int slot) {
    pdl_enter();
    const bool high = decide_high(est_row(x, d, blockIdx.x), d, a, c, thr);
    if (threadIdx.x == 0) {
        flags[blockIdx.x] = high ? 1u : 0u;
        if (count && high) atomicAdd(count + slot, 1.f);
    }
}

// ---- elementwise ----------------------------------------------------------

// silu(g) * u, the same arithmetic in every SwiGLU kernel.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

// gate = silu(gate) * up over n values; with xs, gate's rows of `width`
// values also go there split for the bit-plane GEMV ([2][rows][cols_p],
// common.cuh: each thread takes positions of the padded rows).
extern "C" __global__ void swiglu(float* gate, const float* up, long n, int width, u16* xs, int rows,
                                  int cols_p) {
    pdl_enter();
    const long total = xs ? (long)rows * cols_p : n;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        if (!xs) {
            gate[i] = silu_mul(gate[i], up[i]);
            continue;
        }
        const int tok = (int)(i / cols_p), c = (int)(i % cols_p);
        const long at = (long)tok * width + c;
        float o = 0.f;
        if (c < width) {
            o = silu_mul(gate[at], up[at]);
            gate[at] = o;
        }
        split_store<1>(xs, rows, cols_p, tok, c, &o);
    }
}

// gate = silu(gate) * up for rows of width values, and the sums of squares
// of each row's output in parts of SWIGLU_PART values: block (p, t) makes
// part p of row t and writes its sum to sumsq[t * gridDim.x + p] (the down
// estimator's input, read as block_estimate's n < 0). With xs, the rows also
// go there split for the bit-plane GEMV ([2][gridDim.y][cols_p], common.cuh;
// the last part's block zeroes the padding).
#define SWIGLU_PART 1024
extern "C" __global__ void swiglu_sumsq(float* gate, const float* up, int width, float* sumsq, u16* xs,
                                        int cols_p) {
    pdl_enter();
    const int tok = blockIdx.y, n = gridDim.y;
    const long row = (long)blockIdx.y * width;
    const int beg = blockIdx.x * SWIGLU_PART, end = min(width, beg + SWIGLU_PART);
    float sq = 0.f;
    if ((width & 3) == 0 && aligned16(gate) && aligned16(up)) {
        float4* g4 = (float4*)(gate + row);
        const float4* u4 = (const float4*)(up + row);
        for (int i = (beg >> 2) + threadIdx.x; i < (end >> 2); i += blockDim.x) {
            float4 g = g4[i];
            const float4 u = u4[i];
            g.x = silu_mul(g.x, u.x);
            g.y = silu_mul(g.y, u.y);
            g.z = silu_mul(g.z, u.z);
            g.w = silu_mul(g.w, u.w);
            g4[i] = g;
            sq += g.x * g.x + g.y * g.y + g.z * g.z + g.w * g.w;
            if (xs) {
                const float o[4] = {g.x, g.y, g.z, g.w};
                split_store<4>(xs, n, cols_p, tok, 4 * i, o);
            }
        }
    } else {
        for (int i = beg + threadIdx.x; i < end; i += blockDim.x) {
            const float g = gate[row + i];
            const float o = silu_mul(g, up[row + i]);
            gate[row + i] = o;
            sq += o * o;
            if (xs) split_store<1>(xs, n, cols_p, tok, i, &o);
        }
    }
    if (xs && blockIdx.x == gridDim.x - 1) split_pad(xs, n, width, cols_p, tok);
    sq = block_sum(sq);
    if (threadIdx.x == 0) sumsq[(long)blockIdx.y * gridDim.x + blockIdx.x] = sq;
}

// h += x.
extern "C" __global__ void fill(float* x, long n, float value) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" __global__ void add(float* h, const float* x, long n) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        h[i] += x[i];
}

// y[t][r] += bias[r] for y [n x rows].
extern "C" __global__ void add_bias(float* y, const float* bias, int rows, long n) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] += bias[i % rows];
}

// Rotate pairs (i, i + rot/2) of every head of x [n x heads x hd] at positions
// pos0 = step[0].. by the table's angles ([position][cos 0..rot/2 | sin 0..rot/2]).
// Positions come from the step in device memory, so a recorded graph replays.
extern "C" __global__ void rope(float* x, const float* table, int n, int heads, int hd, int rot, const u32* step) {
    pdl_enter();
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
// A cache holds f32 values (kernels named as below) or f16 bits (the same
// kernels with an `_h` suffix: the default on the GPU, half the memory and
// the bandwidth attention reads); values are rounded to nearest on the way in
// and attention computes in f32 either way.

__device__ __forceinline__ void kv_put(float* c, long i, float v) { c[i] = v; }
__device__ __forceinline__ void kv_put(u16* c, long i, float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    c[i] = h;
}
__device__ __forceinline__ float kv_get(const float* c, long i) { return c[i]; }
__device__ __forceinline__ float kv_get(const u16* c, long i) { return h2f(c[i]); }

// Keys and values [n x d] of positions step[0].. into one layer's cache.
template <typename T>
__device__ __forceinline__ void kv_store_body(const float* k, const float* v, T* kc, T* vc, const u32* step,
                                              long nd, int d) {
    const long o = (long)step[0] * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < nd; i += (long)gridDim.x * blockDim.x) {
        kv_put(kc, o + i, k[i]);
        kv_put(vc, o + i, v[i]);
    }
}
extern "C" __global__ void kv_store(const float* k, const float* v, float* kc, float* vc, const u32* step,
                                    long nd, int d) {
    pdl_enter();
    kv_store_body(k, v, kc, vc, step, nd, d);
}
extern "C" __global__ void kv_store_h(const float* k, const float* v, u16* kc, u16* vc, const u32* step,
                                      long nd, int d) {
    pdl_enter();
    kv_store_body(k, v, kc, vc, step, nd, d);
}

// RoPE and the cache store of one layer in one launch: q [n x nh x hd] turned
// in place for positions step[0].., k [n x nkv x hd] turned into the cache
// (k itself is left as it was), v copied there; the turn as rope's.
template <typename T>
__device__ __forceinline__ void rope_store_body(float* q, const float* k, const float* v, T* kc, T* vc,
                                                const float* table, int n, int nh, int nkv, int hd, int rot,
                                                const u32* step) {
    const int half = rot / 2, pos0 = (int)step[0];
    const long nq = (long)n * nh * half, nkvd = (long)n * nkv * hd;
    const long o = (long)pos0 * nkv * hd;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < max(nq, nkvd);
         j += (long)gridDim.x * blockDim.x) {
        if (j < nq) {
            const int i = j % half;
            const long th = j / half;
            const float* row = table + (long)(pos0 + th / nh) * rot;
            float* h = q + th * hd;
            const float a = h[i], b = h[i + half], c = row[i], s = row[half + i];
            h[i] = a * c - b * s;
            h[i + half] = b * c + a * s;
        }
        if (j < nkvd) {
            const int dim = j % hd;
            const long th = j / hd;
            const float* row = table + (long)(pos0 + th / nkv) * rot;
            const float* h = k + th * hd;
            float out = h[dim];
            if (dim < half) {
                const float a = h[dim], b = h[dim + half], c = row[dim], s = row[half + dim];
                out = a * c - b * s;
            } else if (dim < rot) {
                const int i = dim - half;
                const float a = h[i], b = h[dim], c = row[i], s = row[half + i];
                out = b * c + a * s;
            }
            kv_put(kc, o + j, out);
            kv_put(vc, o + j, v[j]);
        }
    }
}
extern "C" __global__ void rope_store(float* q, const float* k, const float* v, float* kc, float* vc,
                                      const float* table, int n, int nh, int nkv, int hd, int rot,
                                      const u32* step) {
    pdl_enter();
    rope_store_body(q, k, v, kc, vc, table, n, nh, nkv, hd, rot, step);
}
extern "C" __global__ void rope_store_h(float* q, const float* k, const float* v, u16* kc, u16* vc,
                                        const float* table, int n, int nh, int nkv, int hd, int rot,
                                        const u32* step) {
    pdl_enter();
    rope_store_body(q, k, v, kc, vc, table, n, nh, nkv, hd, rot, step);
}

// x [len] as f16 halves into xs [2][len]: hi = x rounded, lo = x - hi rounded
// (as the GEMV splits it), so a GEMM on f16 tensor cores over both keeps f32
// accuracy.
extern "C" __global__ void split_halves(const float* x, long len, u16* xs) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < len; i += (long)gridDim.x * blockDim.x) {
        const float v = x[i];
        u16 h, l;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(l) : "f"(v - h2f(h)));
        xs[i] = h;
        xs[len + i] = l;
    }
}

// y [len] = c [0, len) + c [len, 2 len): the products of the halves summed.
extern "C" __global__ void sum_halves(const float* c, long len, float* y) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < len; i += (long)gridDim.x * blockDim.x)
        y[i] = c[i] + c[len + i];
}

// ---- row moves ------------------------------------------------------------

// out [n x width] = columns off..off+width of x [n x total].
extern "C" __global__ void split_cols(const float* x, int n, int total, int off, int width, float* out) {
    pdl_enter();
    const long count = (long)n * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < count; j += (long)gridDim.x * blockDim.x) {
        const long t = j / width;
        out[j] = x[t * total + off + j % width];
    }
}

// out row i = x row idx[i], for i < count.
extern "C" __global__ void gather_rows(const float* x, int width, const u32* idx, int count, float* out) {
    pdl_enter();
    const long total = (long)count * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        out[j] = x[(long)idx[j / width] * width + j % width];
}

// dst row idx[i] = src row i, for i < count.
extern "C" __global__ void scatter_rows(const float* src, int width, const u32* idx, int count, float* dst) {
    pdl_enter();
    const long total = (long)count * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        dst[(long)idx[j / width] * width + j % width] = src[j];
}

// Sum of x [n4 float4s] into *out (set to 0 before): a read-bandwidth probe.
extern "C" __global__ void read_sum(const float4* x, long n4, float* out) {
    pdl_enter();
    float s = 0.f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        const float4 v = x[i];
        s += (v.x + v.y) + (v.z + v.w);
    }
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

// ---- random weights (benchmarks) ----------------------------------------
// These write weights and tables, which the GEMV reads before its pdl_wait():
// they wait for the kernel before but let the next start only when they have
// finished (no pdl_launch_dependents, see common.cuh).

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = random bits.
extern "C" __global__ void fill_random_u32(u32* out, long n, unsigned long long seed) {
    pdl_wait();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = (u32)(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1)) >> 32);
}

// out[i] = f16 bits of a uniform value in [-scale, scale).
extern "C" __global__ void fill_random_f16(u16* out, long n, float scale, unsigned long long seed) {
    pdl_wait();
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
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float v = h[i] + x[i];
        h[i] = v;
        if (!isfinite(v)) atomicMin((u32*)(flags + slot), __float_as_uint((float)(i / width)));
    }
}

// flags[slot] = min(flags[slot], first token of x [. x width] holding a NaN or
// infinity). flags holds non-negative floats, whose bits order as unsigned ints.
extern "C" __global__ void flag_non_finite(const float* x, long n, int width, float* flags, int slot) {
    pdl_enter();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        if (!isfinite(x[i])) atomicMin((u32*)(flags + slot), __float_as_uint((float)(i / width)));
}

// out[slot] = the number of set flags among n (one warp).
extern "C" __global__ void count_flags(const u32* flags, int n, float* out, int slot) {
    pdl_enter();
    float c = 0.f;
    for (int t = threadIdx.x; t < n; t += 32) c += flags[t] != 0u ? 1.f : 0.f;
    c = warp_sum(c);
    if (threadIdx.x == 0) out[slot] = c;
}

// out[offset + t * stride] = flags[t] != 0 (1 or 0), t < n.
extern "C" __global__ void store_flags(const u32* flags, int n, float* out, int offset, int stride) {
    pdl_enter();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) out[offset + t * stride] = flags[t] != 0u ? 1.f : 0.f;
}

// flags[t] = values[t] > threshold.
extern "C" __global__ void threshold(const float* values, int n, float thr, u32* flags) {
    pdl_enter();
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
                                                       int ys, int rows, int cols) { pdl_enter();                       \
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
                                                    int ys, int rows, int cols) { pdl_enter();                       \
        dense_gemv<T, NT>(w, scales, x, xs, bias, has_bias, y, ys, rows, cols);                        \
    }

#define DENSE(NAME, T)                                                                              \
    extern "C" __global__ void embed_##NAME(const void* w, const u16* scales, const u32* tokens, int n, \
                                            int cols, float* out) { pdl_enter();                                    \
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

extern "C" __global__ void widen_f16(const void* w, const u16* s, int rows, int cols, float* out) { pdl_enter(); widen<1>(w, s, rows, cols, out); }
extern "C" __global__ void widen_bf16(const void* w, const u16* s, int rows, int cols, float* out) { pdl_enter(); widen<2>(w, s, rows, cols, out); }
extern "C" __global__ void widen_q8_0(const void* w, const u16* s, int rows, int cols, float* out) { pdl_enter(); widen<3>(w, s, rows, cols, out); }

// Rows of y [n x width] whose flag is 0 become the rows of low.
extern "C" __global__ void blend_rows(float* y, const float* low, const u32* flags, int n, int width) {
    pdl_enter();
    const long total = (long)n * width;
    for (long j = blockIdx.x * (long)blockDim.x + threadIdx.x; j < total; j += (long)gridDim.x * blockDim.x)
        if (flags[j / width] == 0u) y[j] = low[j];
}

// ---- attention ------------------------------------------------------------
// Causal attention of query token t (blockIdx.y) and head h (blockIdx.x) over
// positions lo..=pos0+t (pos0 = step[0]) of one layer's cache (k, v [positions x kv_dim]), with
// grouped KV heads and an optional window (0: none). The positions are cut
// into gridDim.z equal spans, one a block (split-K over the sequence, so long
// contexts fill the GPU); each warp runs an online softmax over ATT_P
// positions at a time (their loads in flight together), keeping the head's
// output in registers (ATT_MAXD / 32 per lane); the warps' partial results are
// merged at the end. With one span the block writes out; with more it writes
// its (max, sum, unnormalised output) to part, [n][nh][spans][2 + hd], and
// attention_merge combines them. With sumsq, the sum of squares of each
// head's output goes to sumsq[t * nh + h] (the o estimator's input, read as
// block_estimate's n < 0), and with xs the output split for the bit-plane
// GEMV ([2][n][cols_p], common.cuh; the last head's block zeroes the
// padding), by whichever kernel writes the output.

#define ATT_WARPS 8
#define ATT_MAXD 256
#define ATT_P 4

template <typename T>
__device__ __forceinline__ void attention_body(const float* q, const T* k, const T* v, float* out, float* part,
                                               const u32* step, int nh, int nkv, int hd, int window, float scale,
                                               float* sumsq, u16* xs, int cols_p) {
    const int pos0 = (int)step[0];
    const int h = blockIdx.x, t = blockIdx.y, spans = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvd = nkv * hd, qd = nh * hd;
    const long kvo = (long)(h / (nh / nkv)) * hd;
    const int pos = pos0 + t;
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const int chunk = (pos + 1 - lo + spans - 1) / spans;
    const int beg = lo + (int)blockIdx.z * chunk, end = min(pos + 1, beg + chunk);
    float qr[ATT_MAXD / 32], acc[ATT_MAXD / 32];
#pragma unroll
    for (int m = 0; m < ATT_MAXD / 32; m++) {
        const int i = lane + 32 * m;
        qr[m] = i < hd ? q[(long)t * qd + (long)h * hd + i] * scale : 0.f;
        acc[m] = 0.f;
    }
    float mx = NEG_INF, l = 0.f;
    for (int j0 = beg + warp * ATT_P; j0 < end; j0 += ATT_WARPS * ATT_P) {
        float s[ATT_P], vv[ATT_P][ATT_MAXD / 32];
#pragma unroll
        for (int p = 0; p < ATT_P; p++) {
            const long row = (long)min(j0 + p, end - 1) * kvd + kvo;  // past end: read, then weighted 0
            s[p] = 0.f;
#pragma unroll
            for (int m = 0; m < ATT_MAXD / 32; m++) {
                const int i = lane + 32 * m;
                vv[p][m] = 0.f;
                if (i < hd) {
                    s[p] = fmaf(qr[m], kv_get(k, row + i), s[p]);
                    vv[p][m] = kv_get(v, row + i);
                }
            }
        }
        float nm = mx;
#pragma unroll
        for (int p = 0; p < ATT_P; p++) {
            s[p] = warp_sum(s[p]);
            if (j0 + p < end) nm = fmaxf(nm, s[p]);
        }
        const float corr = expf(mx - nm);
        l *= corr;
#pragma unroll
        for (int m = 0; m < ATT_MAXD / 32; m++) acc[m] *= corr;
#pragma unroll
        for (int p = 0; p < ATT_P; p++) {
            const float e = j0 + p < end ? expf(s[p] - nm) : 0.f;
            l += e;
#pragma unroll
            for (int m = 0; m < ATT_MAXD / 32; m++) acc[m] = fmaf(e, vv[p][m], acc[m]);
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
    float* mine = part + (((long)t * nh + h) * spans + blockIdx.z) * (2 + hd);
    float sq = 0.f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float total = 0.f, o = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            if (sm_m[w] == NEG_INF) continue;  // a warp that saw no position
            const float f = expf(sm_m[w] - big);
            total += sm_l[w] * f;
            o += sm_acc[w][i] * f;
        }
        if (spans == 1) {
            const float r = o / total;
            out[(long)t * qd + (long)h * hd + i] = r;
            sq += r * r;
            if (xs) split_store<1>(xs, gridDim.y, cols_p, t, h * hd + i, &r);
        } else {
            mine[2 + i] = o;
            if (i == 0) {
                mine[0] = big;
                mine[1] = total;
            }
        }
    }
    if (xs && spans == 1 && h == nh - 1) split_pad(xs, gridDim.y, qd, cols_p, t);
    if (sumsq && spans == 1) {  // the same for the whole block
        sq = block_sum(sq);
        if (threadIdx.x == 0) sumsq[(long)t * nh + h] = sq;
    }
}

extern "C" __global__ void attention(const float* q, const float* k, const float* v, float* out, float* part,
                                     const u32* step, int nh, int nkv, int hd, int window, float scale,
                                     float* sumsq, u16* xs, int cols_p) {
    pdl_enter();
    attention_body(q, k, v, out, part, step, nh, nkv, hd, window, scale, sumsq, xs, cols_p);
}
extern "C" __global__ void attention_h(const float* q, const u16* k, const u16* v, float* out, float* part,
                                       const u32* step, int nh, int nkv, int hd, int window, float scale,
                                       float* sumsq, u16* xs, int cols_p) {
    pdl_enter();
    attention_body(q, k, v, out, part, step, nh, nkv, hd, window, scale, sumsq, xs, cols_p);
}

// The spans of attention merged: one block per (head, query token) as there.
extern "C" __global__ void attention_merge(const float* part, float* out, int nh, int hd, int spans, float* sumsq,
                                           u16* xs, int cols_p) {
    pdl_enter();
    const int h = blockIdx.x, t = blockIdx.y;
    const float* p = part + ((long)t * nh + h) * spans * (2 + hd);
    float big = NEG_INF;
    for (int s = 0; s < spans; s++) big = fmaxf(big, p[s * (2 + hd)]);
    float sq = 0.f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float total = 0.f, o = 0.f;
        for (int s = 0; s < spans; s++) {
            const float* ps = p + s * (2 + hd);
            if (ps[0] == NEG_INF) continue;  // a span with no position (the window's or the sequence's end)
            const float f = expf(ps[0] - big);
            total += ps[1] * f;
            o += ps[2 + i] * f;
        }
        const float r = o / total;
        out[((long)t * nh + h) * hd + i] = r;
        sq += r * r;
        if (xs) split_store<1>(xs, gridDim.y, cols_p, t, h * hd + i, &r);
    }
    if (xs && h == nh - 1) split_pad(xs, gridDim.y, nh * hd, cols_p, t);
    if (sumsq) {
        sq = block_sum(sq);
        if (threadIdx.x == 0) sumsq[(long)t * nh + h] = sq;
    }
}
