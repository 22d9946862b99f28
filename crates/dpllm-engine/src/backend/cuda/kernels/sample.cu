// ---- choosing the token: greedy and random draws on the device -------------
// One block of 1024 threads a row of logits; the host reads back one id a row.

// (value, index) of the larger, the lower index on ties; index ~0u is "none".
__device__ __forceinline__ void argmax_merge(float& v, u32& i, float ov, u32 oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// The sum of v over threads 0..threadIdx.x - 1 of the block (an exclusive
// scan), and the block's total in `total`.
__device__ float block_exclusive_sum(float v, float& total) {
    __shared__ float part[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float inc = v;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        const float o = __shfl_up_sync(FULL, inc, s);
        if (lane >= s) inc += o;
    }
    __syncthreads();
    if (lane == 31) part[warp] = inc;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float w = lane < warps ? part[lane] : 0.f;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        const float o = __shfl_up_sync(FULL, w, s);
        if (lane >= s) w += o;
    }
    // w: inclusive sum of warps 0..lane; warp `warp` starts after warps 0..warp-1.
    const float before = __shfl_sync(FULL, w, (warp + 31) & 31);
    total = __shfl_sync(FULL, w, warps - 1);
    return (warp == 0 ? 0.f : before) + inc - v;
}

// ---- random draws -----------------------------------------------------------
// As the host's sampler (sampler::draw): logits scaled by 1/T; with no filter,
// every token in index order; with top-k or top-p, the candidates in
// descending order of logit (lower index first on ties): the top k, then the
// shortest prefix holding top_p of their mass (of the whole vocabulary's for
// top-p alone); the first candidate whose cumulative probability exceeds
// u * total, else the last with a non-zero probability.

#define SAMPLE_CAP 2048              // candidates a block sorts itself (2 a thread)
#define SAMPLE_ON_HOST 0xfffffffeu   // more candidates, or a scaled logit overflowed: the host draws
#define NUCLEUS_BUCKETS 128          // the host's top-p filter: buckets of 0.25 nats below the max

// f(i, r[i]) for every i < width, the block's threads taking 16-byte loads
// in turn, two in flight a thread: one block reads a whole row, so a loop of
// one 4-byte load at a time waits on L2 latency (measured: a top-k draw's
// four passes over 128k logits cost 0.13 ms). Any order: callers only count,
// reduce or collect.
template <class F>
__device__ __forceinline__ void row_each(const float* r, int width, F f) {
    int tail = 0;
    if (aligned16(r)) {
        const float4* r4 = reinterpret_cast<const float4*>(r);
        const int n4 = width >> 2, step = blockDim.x;
        int i = threadIdx.x;
        for (; i + step < n4; i += 2 * step) {
            const float4 a = r4[i], b = r4[i + step];
            const int j = 4 * i, k = 4 * (i + step);
            f(j, a.x), f(j + 1, a.y), f(j + 2, a.z), f(j + 3, a.w);
            f(k, b.x), f(k + 1, b.y), f(k + 2, b.z), f(k + 3, b.w);
        }
        if (i < n4) {
            const float4 a = r4[i];
            const int j = 4 * i;
            f(j, a.x), f(j + 1, a.y), f(j + 2, a.z), f(j + 3, a.w);
        }
        tail = 4 * n4;
    }
    for (int i = tail + threadIdx.x; i < width; i += blockDim.x) f(i, r[i]);
}

// Per row of x [rows x width], one block a row: out[row] = the index of its
// largest value, the lowest on ties (the host's argmax), or ~0u when the row
// holds a NaN or an infinity (an error for the caller, as a non-finite logit
// is on the host). Greedy decoding then reads back one id, not the logits.
// The row is read with 16-byte loads, two in flight a thread (row_each):
// one 4-byte load at a time took 52 us over 128k logits on an H100.
extern "C" __global__ void argmax_rows(const float* x, int width, u32* out) {
    pdl_enter();
    const float* r = x + (long)blockIdx.x * width;
    float best = NEG_INF;
    u32 bi = 0xffffffffu;
    bool bad = false;
    row_each(r, width, [&](int i, float v) {
        if (!isfinite(v))
            bad = true;
        else
            argmax_merge(best, bi, v, (u32)i);
    });
#pragma unroll
    for (int s = 16; s > 0; s >>= 1)
        argmax_merge(best, bi, __shfl_xor_sync(FULL, best, s), __shfl_xor_sync(FULL, bi, s));
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ int any_bad;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) any_bad = 0;
    __syncthreads();
    if (bad) any_bad = 1;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        best = lane < warps ? sv[lane] : NEG_INF;
        bi = lane < warps ? si[lane] : 0xffffffffu;
#pragma unroll
        for (int s = 16; s > 0; s >>= 1)
            argmax_merge(best, bi, __shfl_xor_sync(FULL, best, s), __shfl_xor_sync(FULL, bi, s));
        if (lane == 0) out[blockIdx.x] = any_bad ? 0xffffffffu : bi;
    }
}

// An unsigned key that orders floats as the host's total_cmp does.
__device__ __forceinline__ u32 float_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Candidate (ka, ia) before (kb, ib): the larger logit, the lower index on ties.
__device__ __forceinline__ bool cand_before(u32 ka, u32 ia, u32 kb, u32 ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// The host's top-p bucket of scaled logit s below the row's maximum m.
__device__ __forceinline__ int nucleus_bucket(float m, float s) {
    const float d = (m - s) / 0.25f;
    return d >= (float)(NUCLEUS_BUCKETS - 1) ? NUCLEUS_BUCKETS - 1 : (int)d;
}

// Add one to hist[bin] for each lane of the warp that calls it, one atomic a
// distinct bin (the lanes of a row mostly share its few top key bytes).
__device__ __forceinline__ void hist_add(int* hist, u32 bin) {
    const u32 peers = __match_any_sync(__activemask(), bin);
    if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// The draw among the top-k / top-p candidates of one row r of `width`
// logits (its scaled maximum m). Writes the token, or SAMPLE_ON_HOST when
// the candidates exceed SAMPLE_CAP. Every thread of the block calls it.
__device__ void sample_filtered(const float* r, int width, float inv_t, float u, float top_p, u32 k,
                                float m, u32* out) {
    __shared__ u32 ck[SAMPLE_CAP], ci[SAMPLE_CAP];
    __shared__ float cum[SAMPLE_CAP];
    __shared__ int hist[256];
    __shared__ float bucket_mass[32][NUCLEUS_BUCKETS];  // a row a warp
    __shared__ u32 s_prefix;
    __shared__ int s_need, s_pick, s_count;
    const int tid = threadIdx.x, warp = tid >> 5;

    // The candidates, before sorting: top-k, every token whose key is at
    // least the k-th largest key (found by an 8-bit radix select; the sort
    // then puts the lower indices of a tie first and the list is cut at k);
    // top-p alone, the host's buckets down to the one where the mass
    // reaches top_p, and one more for rounding (a superset of the nucleus).
    u32 kth = 0;
    int last_bucket = NUCLEUS_BUCKETS - 1;
    float vocab_mass = 0.f;
    if (k) {
        u32 prefix = 0, mask = 0;
        int remaining = (int)k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            row_each(r, width, [&](int, float v) {
                const u32 key = float_key(__fmul_rn(v, inv_t));
                if ((key & mask) == prefix) hist_add(hist, (key >> shift) & 255u);
            });
            __syncthreads();
            if (tid == 0) {
                int above = 0, b = 255;
                for (; b > 0 && above + hist[b] < remaining; b--) above += hist[b];
                s_prefix = prefix | ((u32)b << shift);
                s_need = remaining - above;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_need;
            mask |= 255u << shift;
            __syncthreads();  // hist is cleared again only after thread 0 read it
        }
        kth = prefix;
    } else {
        for (int i = tid; i < 32 * NUCLEUS_BUCKETS; i += blockDim.x) (&bucket_mass[0][0])[i] = 0.f;
        __syncthreads();
        float s = 0.f;
        row_each(r, width, [&](int, float v) {
            const float sc = __fmul_rn(v, inv_t);
            const float p = expf(__fsub_rn(sc, m));
            s += p;
            const int b = nucleus_bucket(m, sc);
            if (b < NUCLEUS_BUCKETS - 1) atomicAdd(&bucket_mass[warp][b], p);
        });
        vocab_mass = block_sum(s);  // its barriers also complete bucket_mass
        if (tid < NUCLEUS_BUCKETS) {
            float t = 0.f;
            for (int w = 0; w < 32; w++) t += bucket_mass[w][tid];
            bucket_mass[0][tid] = t;  // each thread reads and writes only its own column
        }
        __syncthreads();
        if (tid == 0) {
            const float want = top_p * vocab_mass;
            float c = 0.f;
            int b = 0;
            for (; b < NUCLEUS_BUCKETS - 1; b++) {
                c += bucket_mass[0][b];
                if (c >= want) break;
            }
            s_pick = min(b + 1, NUCLEUS_BUCKETS - 1);
        }
        __syncthreads();
        last_bucket = s_pick;
    }
    if (tid == 0) s_count = 0;
    __syncthreads();
    row_each(r, width, [&](int i, float v) {
        const float sc = __fmul_rn(v, inv_t);
        if (k ? float_key(sc) >= kth : nucleus_bucket(m, sc) <= last_bucket) {
            const int at = atomicAdd(&s_count, 1);
            if (at < SAMPLE_CAP) {
                ck[at] = float_key(sc);
                ci[at] = (u32)i;
            }
        }
    });
    __syncthreads();
    const int found = s_count;
    if (found > SAMPLE_CAP) {
        if (tid == 0) *out = SAMPLE_ON_HOST;
        return;
    }
    int n2 = 2;
    while (n2 < found) n2 <<= 1;
    for (int i = found + tid; i < n2; i += blockDim.x) {
        ck[i] = 0u;  // below every finite logit's key: sorted last
        ci[i] = 0xffffffffu;
    }
    __syncthreads();

    // Bitonic sort into the candidate order.
    for (int size = 2; size <= n2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < n2; i += blockDim.x) {
                const int j = i ^ stride;
                if (j <= i) continue;
                const bool forward = (i & size) == 0;
                if (cand_before(ck[j], ci[j], ck[i], ci[i]) == forward) {
                    const u32 tk = ck[i], ti = ci[i];
                    ck[i] = ck[j];
                    ci[i] = ci[j];
                    ck[j] = tk;
                    ci[j] = ti;
                }
            }
            __syncthreads();
        }
    }

    // Probabilities and their running sums (thread t: candidates 2t, 2t + 1).
    const int count = k ? min(found, (int)k) : found;
    const int a = 2 * tid, b = a + 1;
    const float pa = a < count ? expf(__fsub_rn(key_float(ck[a]), m)) : 0.f;
    const float pb = b < count ? expf(__fsub_rn(key_float(ck[b]), m)) : 0.f;
    float cand_mass;
    const float before = block_exclusive_sum(pa + pb, cand_mass);
    if (b < SAMPLE_CAP) {
        cum[a] = before + pa;
        cum[b] = before + pa + pb;
    }
    if (tid == 0) s_pick = count;
    __syncthreads();
    int keep = count;
    float total = k ? cand_mass : vocab_mass;
    if (top_p < 1.f) {
        // The shortest prefix whose mass reaches top_p of the total.
        const float share = top_p * total;
        if (a < count && cum[a] >= share) atomicMin(&s_pick, a);
        else if (b < count && cum[b] >= share) atomicMin(&s_pick, b);
        __syncthreads();
        keep = min(s_pick + 1, count);
        total = cum[keep - 1];
        __syncthreads();
        if (tid == 0) s_pick = count;
        __syncthreads();
    }
    const float x = u * total;
    if (a < keep && x < cum[a]) atomicMin(&s_pick, a);
    else if (b < keep && x < cum[b]) atomicMin(&s_pick, b);
    __syncthreads();
    if (s_pick < keep) {
        if (tid == 0) *out = ci[s_pick];
        return;
    }
    // Rounding put u * total past the last candidate: the last with a non-zero mass.
    __syncthreads();
    if (tid == 0) s_pick = 0;
    __syncthreads();
    if (b < keep && pb > 0.f) atomicMax(&s_pick, b);
    else if (a < keep && pa > 0.f) atomicMax(&s_pick, a);
    __syncthreads();
    if (tid == 0) *out = ci[s_pick];
}

// Per row of x [rows x width], with params[4 row ..] = (1/T, u, top_p, top_k
// as the bits of a float): the token the host's sampler draws, within the
// rounding of sums in another order; 0xffffffff for a row holding a NaN or
// an infinity, SAMPLE_ON_HOST where the host must draw it. One block of 1024
// threads a row; thread t walks one contiguous chunk of the row.
extern "C" __global__ void sample_rows(const float* x, int width, const float* params, u32* out) {
    pdl_enter();
    const float* r = x + (long)blockIdx.x * width;
    const float* pr = params + 4 * blockIdx.x;
    const float inv_t = pr[0], u = pr[1], top_p = pr[2];
    const u32 k = __float_as_uint(pr[3]) < (u32)width ? __float_as_uint(pr[3]) : 0u;
    const int chunk = (width + blockDim.x - 1) / blockDim.x;
    const int lo = min(width, (int)threadIdx.x * chunk), hi = min(width, lo + chunk);
    __shared__ int any_bad, overflow, chosen;
    if (threadIdx.x == 0) {
        any_bad = 0;
        overflow = 0;
        chosen = 0x7fffffff;
    }
    __syncthreads();
    float m = NEG_INF;
    row_each(r, width, [&](int, float v) {
        const float s = __fmul_rn(v, inv_t);
        if (!isfinite(v)) any_bad = 1;
        else if (!isfinite(s)) overflow = 1;
        else m = fmaxf(m, s);
    });
    m = block_max(m);
    if (any_bad || overflow) {
        if (threadIdx.x == 0) out[blockIdx.x] = any_bad ? 0xffffffffu : SAMPLE_ON_HOST;
        return;
    }
    if (k || top_p < 1.f) {
        sample_filtered(r, width, inv_t, u, top_p, k, m, out + blockIdx.x);
        return;
    }
    // No filter: every token in index order. Scaled logits rounded as the
    // host rounds them (no fused multiply-add).
    float s = 0.f;
    int last = -1;
    for (int i = lo; i < hi; i++) {
        const float p = expf(__fsub_rn(__fmul_rn(r[i], inv_t), m));
        s += p;
        if (p > 0.f) last = i;
    }
    float total;
    const float pre = block_exclusive_sum(s, total);
    const float target = u * total;
    if (s > 0.f && pre <= target && target < pre + s) {
        float left = target - pre;
        int j = last;
        for (int i = lo; i < hi; i++) {
            const float p = expf(__fsub_rn(__fmul_rn(r[i], inv_t), m));
            if (left < p) {
                j = i;
                break;
            }
            left -= p;
        }
        atomicMin(&chosen, j);  // rounding may let two neighbours claim it
    }
    __syncthreads();
    if (chosen != 0x7fffffff) {
        if (threadIdx.x == 0) out[blockIdx.x] = (u32)chosen;
        return;
    }
    // Rounding put u * total past the last chunk: the last non-zero index.
    const float l = block_max((float)last);
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)l;
}
