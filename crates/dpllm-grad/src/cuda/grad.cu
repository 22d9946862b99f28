// The gradient model's element-wise and row-wise ops on the GPU (issue #11):
// forward and backward of RMSNorm and SwiGLU, the causal softmax of attention
// and the lm_head's cross-entropy. The matrix products (linears, attention
// scores) go through cuBLAS; residual adds, biases, RoPE (forward, and
// backward through a table of negated sines) and column splits are the
// engine's kernels (ops.cu). Activations are row-major [n x width].
// Row reductions sum in double where the CPU reference does (ops.rs), so the
// two agree to f32 rounding. Grid-stride loops take any grid size.

typedef unsigned int u32;

// -infinity (NVRTC has no math.h constants).
#define NEG_INF __int_as_float(0xff800000)
// A quiet NaN: what an op writes where its device-side inputs are out of range.
#define QNAN __int_as_float(0x7fc00000)

#define GRID_STRIDE(i, n) \
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (n); i += (long)gridDim.x * blockDim.x)

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ double block_sum(double v) {
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += part[w];
    return t;
}

// Largest v over the block; every thread gets it.
__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) t = fmaxf(t, part[w]);
    return t;
}

// out[t] = table[tokens[t]] for rows of d (NaN for an id past the vocabulary).
extern "C" __global__ void embed_rows(const float* table, const u32* tokens, int d, int n, int vocab,
                                      float* out) {
    GRID_STRIDE(i, (long)n * d) {
        const u32 t = tokens[i / d];
        out[i] = t < (u32)vocab ? table[(long)t * d + i % d] : QNAN;
    }
}

// out[i] += g[i]^2.
extern "C" __global__ void add_squared(float* out, const float* g, long n) {
    GRID_STRIDE(i, n) out[i] += g[i] * g[i];
}

// Columns off..off+width of each row of x [n x total] from part [n x width]
// (the inverse of the engine's split_cols).
extern "C" __global__ void join_cols(const float* part, int n, int total, int off, int width, float* x) {
    GRID_STRIDE(i, (long)n * width) x[i / width * total + off + i % width] = part[i];
}

// RMSNorm of each row (one block a row): out = x / sqrt(mean(x^2) + eps) * w. out may be x.
extern "C" __global__ void rms_norm_rows(const float* x, const float* w, float eps, float* out, int d) {
    const float* xr = x + (long)blockIdx.x * d;
    float* o = out + (long)blockIdx.x * d;
    double ss = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += (double)xr[j] * xr[j];
    const float r = (float)(1.0 / sqrt(block_sum(ss) / d + (double)eps));
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = xr[j] * r * w[j];
}

// dx += r w dy - r^3 / d * x * sum(dy w x), r = (mean(x^2) + eps)^-1/2 (one block a row).
extern "C" __global__ void rms_norm_backward_add(const float* x, const float* w, float eps, const float* dy,
                                                 float* dx, int d) {
    const long base = (long)blockIdx.x * d;
    double ss = 0.0, s = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const double v = x[base + j];
        ss += v * v;
        s += v * (double)dy[base + j] * (double)w[j];
    }
    ss = block_sum(ss);
    s = block_sum(s);
    const double r = 1.0 / sqrt(ss / d + (double)eps);
    const float k = (float)(r * r * r * s / d), rf = (float)r;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dx[base + j] += rf * w[j] * dy[base + j] - k * x[base + j];
}

// act = silu(gate) * up.
extern "C" __global__ void swiglu_forward(const float* gate, const float* up, float* act, long n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i];
        act[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// dgate = dact * up * silu'(gate), dup = dact * silu(gate).
extern "C" __global__ void swiglu_backward(const float* gate, const float* up, const float* dact, float* dgate,
                                           float* dup, long n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i], s = 1.f / (1.f + expf(-g));
        dgate[i] = dact[i] * up[i] * (s * (1.f + g * (1.f - s)));
        dup[i] = dact[i] * g * s;
    }
}

// Scores s [rows x n] (row = head * n + query) to causal probabilities in
// place: key j of query t is seen when j <= t and t - j < window (window <= 0:
// no window), softmax of scale * s over those, zero elsewhere.
extern "C" __global__ void causal_softmax(float* s, int n, int window, float scale) {
    float* row = s + (long)blockIdx.x * n;
    const int t = blockIdx.x % n;
    const int lo = window > 0 ? max(0, t + 1 - window) : 0;
    float m = NEG_INF;
    for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, row[j] * scale);
    m = block_max(m);
    double sum = 0.0;
    for (int j = lo + threadIdx.x; j <= t; j += blockDim.x) sum += (double)expf(row[j] * scale - m);
    const float inv = (float)(1.0 / block_sum(sum));
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        row[j] = (j >= lo && j <= t) ? expf(row[j] * scale - m) * inv : 0.f;
}

// dp [rows x n] to the score gradient in place: ds = p (dp - sum(p dp)) * scale.
extern "C" __global__ void softmax_backward(const float* p, float* dp, int n, float scale) {
    const long base = (long)blockIdx.x * n;
    double s = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += (double)p[base + j] * dp[base + j];
    const float dot = (float)block_sum(s);
    for (int j = threadIdx.x; j < n; j += blockDim.x) dp[base + j] = p[base + j] * (dp[base + j] - dot) * scale;
}

// Softmax cross-entropy of logit rows [rows x vocab] against targets (one
// block a row): *loss += inv_rows * (log(sum exp(x - max)) - (x_t - max)) a
// row (NaN for a target past the vocabulary), and the row becomes
// scale * (softmax - onehot(t)), the gradient of scale * sum of losses.
extern "C" __global__ void cross_entropy(float* logits, const u32* targets, int vocab, float scale,
                                         double inv_rows, double* loss) {
    float* row = logits + (long)blockIdx.x * vocab;
    const u32 tgt = targets[blockIdx.x];
    if (tgt >= (u32)vocab) {  // the same for every thread: no barrier is skipped by some
        if (threadIdx.x == 0) atomicAdd(loss, (double)QNAN);
        return;
    }
    const float xt = row[tgt];  // read before any thread overwrites the row
    float m = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m);
    const float shifted = xt - m;
    double sum = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += (double)e;
    }
    sum = block_sum(sum);
    const float inv = (float)(1.0 / sum) * scale;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = row[j] * inv - (j == (int)tgt ? scale : 0.f);
    if (threadIdx.x == 0) atomicAdd(loss, (log(sum) - (double)shifted) * inv_rows);
}

// W_lo and W_hi of the pair at `pair` (lo, hi, a, b as f32; lo <= hi) within
// `levels`, a weight of n values at precisions min_bits .. min_bits + count - 1
// one after another; false when the pair is outside them.
__device__ __forceinline__ bool pair_levels(const float* levels, int min_bits, int count, const float* pair,
                                            long n, const float** lo, const float** hi) {
    const int l = (int)pair[0], h = (int)pair[1];
    if (l > h || l < min_bits || h >= min_bits + count) return false;
    *lo = levels + (long)(l - min_bits) * n;
    *hi = levels + (long)(h - min_bits) * n;
    return true;
}

// dst = a * W_lo + b * W_hi of the pair (NaN when it is outside the levels).
extern "C" __global__ void mix_levels(float* dst, const float* levels, int min_bits, int count,
                                      const float* pair, long n) {
    const float *lo, *hi;
    if (!pair_levels(levels, min_bits, count, pair, n, &lo, &hi)) {
        GRID_STRIDE(i, n) dst[i] = QNAN;
        return;
    }
    const float a = pair[2], b = pair[3];
    GRID_STRIDE(i, n) dst[i] = a * lo[i] + b * hi[i];
}

// *out += sum of g * (W_hi - W_lo) of the pair over the block's share (f64;
// NaN when the pair is outside the levels).
extern "C" __global__ void dot_diff_levels(const float* g, const float* levels, int min_bits, int count,
                                           const float* pair, long n, double* out) {
    const float *lo, *hi;
    if (!pair_levels(levels, min_bits, count, pair, n, &lo, &hi)) {  // the same for the whole grid
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(out, (double)QNAN);
        return;
    }
    double s = 0.0;
    GRID_STRIDE(i, n) s += (double)g[i] * (double)(hi[i] - lo[i]);
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// The estimators' projection fine-tuning (METHOD.md 2c), as ops.rs's
// norm_error_scale: each row r of y [n x k] times 2(|y_r| - e_r) / (|y_r| n),
// |y_r| at least 1e-12 (one block a row).
extern "C" __global__ void norm_error_scale(float* y, const float* e, int k, int n) {
    float* row = y + (long)blockIdx.x * k;
    double s = 0.0;
    for (int j = threadIdx.x; j < k; j += blockDim.x) s += (double)row[j] * row[j];
    s = block_sum(s);
    const float norm = fmaxf(sqrtf((float)s), 1e-12f);
    const float c = 2.0f * (norm - e[blockIdx.x]) / (norm * (float)n);
    for (int j = threadIdx.x; j < k; j += blockDim.x) row[j] *= c;
}

// One Adam step, as ops.rs's adam_step: b1, b2 the decay rates, c1, c2 their
// bias corrections 1 - b^t, eps added to the root of the second moment.
extern "C" __global__ void adam_step(float* w, const float* g, float* m, float* v, float lr, float b1,
                                     float b2, float c1, float c2, float eps, long n) {
    GRID_STRIDE(i, n) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] -= lr * (mi / c1) / (sqrtf(vi / c2) + eps);
    }
}
