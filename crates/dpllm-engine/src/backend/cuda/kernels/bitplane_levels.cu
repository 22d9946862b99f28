// A layer's weights at two of its precisions read straight from the planes,
// for calibration (issue #11), which would otherwise hold every precision
// dequantized as f32 (six copies of an 8B model's weights): bitplane_mix
// writes a·W_lo + b·W_hi as f32 and bitplane_dot_diff sums g·(W_hi − W_lo).
// A thread takes 4 columns of one row (one 16-byte access where aligned):
// the lanes of a warp cover one row's 128-column block, so the f32 reads and
// writes are coalesced; the 8 lanes of one 32-column word read the same
// plane words. A block takes whole rows. Index bits as in
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

// f(i, wl, wh) for every quad of 4 columns of the layer: i = row * cols + its
// first column, wl / wh the 4 weights at lo and at hi bits (columns past
// `cols` undefined). A block takes rows in turn (grid-stride), its warps the
// row's 128-column blocks, so no thread divides its index.
template <typename F>
__device__ __forceinline__ void for_each_quad(const u32* planes, long long plane_stride, const u16* lut_lo,
                                              const u16* lut_hi, int lo, int hi, int rows, int cols, int kbs,
                                              F f) {
    const int warp = threadIdx.x >> 5, q = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const u16* ll = lut_lo + ((long long)r << lo);
        const u16* lh = lut_hi + ((long long)r << hi);
        for (int kb = warp; kb < kbs; kb += warps) {
            const int c0 = 128 * kb + 4 * q;
            if (c0 >= cols) continue;
            u32 idx[4];
            quad_indices(planes, plane_stride, hi, r, kbs, kb, q, idx);
            float wl[4], wh[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                wl[k] = h2f(ll[idx[k] >> (hi - lo)]);
                wh[k] = h2f(lh[idx[k]]);
            }
            f((long long)r * cols + c0, cols - c0, wl, wh);
        }
    }
}

// Whether quads of 4 floats at `p` + a multiple of 4 are 16-byte aligned
// in a layer of `cols` columns: then a quad is one vector access.
__device__ __forceinline__ bool quads_aligned(const float* p, int cols) {
    return (cols & 3) == 0 && ((unsigned long long)p & 15) == 0;
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
    pdl_enter();
    int lo, hi;
    const u16 *lut_lo, *lut_hi;
    if (!pair_luts(pair, LUT_ARGS, &lo, &hi, &lut_lo, &lut_hi)) {
        const long long n = (long long)rows * cols;
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
            out[i] = __int_as_float(0x7fc00000);
        return;
    }
    const float a = pair[2], b = pair[3];
    const bool vec = quads_aligned(out, cols);
    for_each_quad(planes, plane_stride, lut_lo, lut_hi, lo, hi, rows, cols, kbs,
                  [&](long long i, int left, const float* wl, const float* wh) {
                      if (vec) {
                          *(float4*)(out + i) = make_float4(a * wl[0] + b * wh[0], a * wl[1] + b * wh[1],
                                                            a * wl[2] + b * wh[2], a * wl[3] + b * wh[3]);
                      } else {
                          for (int k = 0; k < 4 && k < left; ++k) out[i + k] = a * wl[k] + b * wh[k];
                      }
                  });
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
    pdl_enter();
    int lo, hi;
    const u16 *lut_lo, *lut_hi;
    if (!pair_luts(pair, LUT_ARGS, &lo, &hi, &lut_lo, &lut_hi)) {  // the same for the whole grid
        if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(out, (double)__int_as_float(0x7fc00000));
        return;
    }
    // Each quad's four products summed in f32, the quads in f64.
    double s = 0.0;
    const bool vec = quads_aligned(g, cols);
    for_each_quad(planes, plane_stride, lut_lo, lut_hi, lo, hi, rows, cols, kbs,
                  [&](long long i, int left, const float* wl, const float* wh) {
                      float t = 0.0f;
                      if (vec) {
                          const float4 v = *(const float4*)(g + i);
                          t = v.x * (wh[0] - wl[0]) + v.y * (wh[1] - wl[1]) + v.z * (wh[2] - wl[2]) +
                              v.w * (wh[3] - wl[3]);
                      } else {
                          for (int k = 0; k < 4 && k < left; ++k) t += g[i + k] * (wh[k] - wl[k]);
                      }
                      s += (double)t;
                  });
    s = block_sum_f64(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
