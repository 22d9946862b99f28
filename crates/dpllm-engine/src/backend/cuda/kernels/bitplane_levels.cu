// A layer's weights at two of its precisions read straight from the planes,
// for calibration (issue #11), which would otherwise hold every precision
// dequantized as f32 (six copies of an 8B model's weights): bitplane_mix
// writes a·W_lo + b·W_hi as f32 and bitplane_dot_diff sums g·(W_hi − W_lo).
// A thread takes 4 columns of one row: the lanes of a warp cover one row's
// 128-column block, so the f32 reads and writes are coalesced; the 8 lanes of
// one 32-column word read the same plane words. Index bits as in
// bitplane_dequant (plane j gives bit hi-1-j), so the index at lo bits is the
// top lo bits of the index at hi bits. Grid-stride loops take any grid.

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

// out [rows x cols] = a * W_lo + b * W_hi (lo <= hi; lut_lo, lut_hi: the
// LUTs of those precisions).
extern "C" __global__ void bitplane_mix(const u32* planes, long long plane_stride, const u16* lut_lo,
                                        const u16* lut_hi, int lo, int hi, int rows, int cols, int kbs,
                                        float a, float b, float* out) {
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

// *out += sum over the layer of g * (W_hi − W_lo), g [rows x cols] f32, summed
// in double (as the f32 levels' dot_diff); one atomic add per block.
extern "C" __global__ void bitplane_dot_diff(const u32* planes, long long plane_stride, const u16* lut_lo,
                                             const u16* lut_hi, int lo, int hi, int rows, int cols, int kbs,
                                             const float* g, double* out) {
    double s = 0.0;
    for_each_pair(planes, plane_stride, lut_lo, lut_hi, lo, hi, rows, cols, kbs,
                  [&](long long i, float wl, float wh) { s += (double)g[i] * (double)(wh - wl); });
    s = block_sum_f64(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
