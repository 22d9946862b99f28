// A layer's weights at two of its precisions read straight from the planes,
// for calibration (issue #11), which would otherwise hold every precision
// dequantized as f32 (six copies of an 8B model's weights): bitplane_mix
// writes a·W_lo + b·W_hi as f32 and bitplane_dot_diff sums g·(W_hi − W_lo).
// A thread takes 4 columns of one row: the lanes of a warp cover one row's
// 128-column block, so the f32 reads and writes are coalesced; the 8 lanes of
// one 32-column word read the same plane words. Index bits as in
// bitplane_dequant (plane j gives bit hi-1-j), so the index at lo bits is the
// top lo bits of the index at hi bits. Grid-stride loops take any grid.
// The precision pair is read from device memory (`pair`: lo, hi, a, b as
// f32), so a recorded graph of these launches serves every step; the LUTs
// come as one pointer a precision 3..8 (null where not held).

// Indices at `hi` bits of columns 128·kb + 4q .. +3 of row r (q < 32).
// Columns 4m..4m+3 of a 32-column word (m = q & 7) sit at bits base + 4k of
// its device word (column_bit), so one shift and mask a plane gathers the
// four, a nibble each: planes 0..3 into a, 4..7 into b (MSB first).
__device__ __forceinline__ void quad_indices(const u32* planes, long long plane_stride, int hi, int r,
                                             int kbs, int kb, int q, u32 idx[4]) {
    const int t = q >> 3, m = q & 7;
    const int lane = 4 * (r & 7) + t;
    const long long at = (((long long)(r >> 4) * kbs + kb) * 32 + lane) * 2 + ((r >> 3) & 1);
    const int base = 16 * (m & 1) + (m >> 1);
    u32 a = 0, b = 0;
    for (int j = 0; j < hi; ++j) {
        const u32 x = (planes[j * plane_stride * 2 + at] >> base) & 0x1111u;
        if (j < 4)
            a = (a << 1) | x;
        else
            b = (b << 1) | x;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const u32 na = (a >> (4 * k)) & 0xfu, nb = (b >> (4 * k)) & 0xfu;
        idx[k] = hi > 4 ? (na << (hi - 4)) | nb : na;
    }
}

// f(i, w_lo, w_hi) for every element i = row * cols + column of this
// thread's quads (grid-stride), with the weight at lo and at hi bits.
template <typename F>
__device__ __forceinline__ void for_each_pair(const u32* planes, long long plane_stride, const u16* lut_lo,
                                              const u16* lut_hi, int lo, int hi, int rows, int cols, int kbs,
                                              F f) {
    const long long total = (long long)rows * kbs * 32;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(e / (kbs * 32)), rem = (int)(e % (kbs * 32));
        const int kb = rem >> 5, q = rem & 31, c0 = 128 * kb + 4 * q;
        if (c0 >= cols) continue;
        u32 idx[4];
        quad_indices(planes, plane_stride, hi, r, kbs, kb, q, idx);
        const u16* ll = lut_lo + ((long long)r << lo);
        const u16* lh = lut_hi + ((long long)r << hi);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (c0 + k < cols) f((long long)r * cols + c0 + k, h2f(ll[idx[k] >> (hi - lo)]), h2f(lh[idx[k]]));
    }
}

// The LUTs at 3..8 bits, one kernel parameter each (null where not held).
#define LUT_PARAMS const u16 *l3, const u16 *l4, const u16 *l5, const u16 *l6, const u16 *l7, const u16 *l8
#define LUT_ARGS l3, l4, l5, l6, l7, l8

// The pair's precisions (lo <= hi) and their LUTs; false when either is not held.
__device__ __forceinline__ bool pair_luts(const float* pair, LUT_PARAMS, int* lo, int* hi, const u16** lut_lo,
                                          const u16** lut_hi) {
    const u16* at[6] = {LUT_ARGS};
    *lo = (int)pair[0];
    *hi = (int)pair[1];
    if (*lo > *hi || *lo < 3 || *hi > 8) return false;
    *lut_lo = at[*lo - 3];
    *lut_hi = at[*hi - 3];
    return *lut_lo != nullptr && *lut_hi != nullptr;
}

// out [rows x cols] = a * W_lo + b * W_hi of the pair (NaN where it is not held).
extern "C" __global__ void bitplane_mix(const u32* planes, long long plane_stride, LUT_PARAMS, int rows, int cols,
                                        int kbs, const float* pair, float* out) {
    int lo, hi;
    const u16 *lut_lo, *lut_hi;
    if (!pair_luts(pair, LUT_ARGS, &lo, &hi, &lut_lo, &lut_hi)) {
        const long long n = (long long)rows * cols;
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
            out[i] = __int_as_float(0x7fc00000);
        return;
    }
    const float a = pair[2], b = pair[3];
    for_each_pair(planes, plane_stride, lut_lo, lut_hi, lo, hi, rows, cols, kbs,
                  [&](long long i, float wl, float wh) { out[i] = a * wl + b * wh; });
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), in thread 0.
__device__ double block_sum_f64(double v) {
    __shared__ double part[32];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(FULL, v, s);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    double t = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
    return t;
}

// *out += sum over the layer of g * (W_hi - W_lo) of the pair, g [rows x cols]
// f32, summed in double (as the f32 levels' dot_diff_levels); one atomic add
// per block (NaN where the pair is not held).
extern "C" __global__ void bitplane_dot_diff(const u32* planes, long long plane_stride, LUT_PARAMS, int rows,
                                             int cols, int kbs, const float* pair, const float* g, double* out) {
    int lo, hi;
    const u16 *lut_lo, *lut_hi;
    if (!pair_luts(pair, LUT_ARGS, &lo, &hi, &lut_lo, &lut_hi)) {  // the same for the whole grid
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(out, (double)__int_as_float(0x7fc00000));
        return;
    }
    double s = 0.0;
    for_each_pair(planes, plane_stride, lut_lo, lut_hi, lo, hi, rows, cols, kbs,
                  [&](long long i, float wl, float wh) { s += (double)g[i] * (double)(wh - wl); });
    s = block_sum_f64(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
