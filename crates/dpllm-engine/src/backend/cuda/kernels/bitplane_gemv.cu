// Bit-plane GEMV on tensor cores: y[t][r] = sum_c lut_r[idx_rc] * x[t][c] for
// up to 8 tokens at B bits, the weights looked up as f16 and multiplied by
// mma.sync m16n8k16 (sm_80 and later: Ampere, Orin, Ada, Hopper) with f32
// accumulation.
//
// Device layout (made by the host at upload, see bitplane.rs), with 16-row
// tiles and 128-column blocks (KB a row):
//   planes [plane][tile][kb][lane][2] u32. Lane l = 4g + t holds rows g
//   (word 0) and g + 8 (word 1) of the tile, columns 128·kb + 32t + c
//   (c < 32) at bit 16·((c/4) % 2) + 4·(c % 4) + c/8.
//   luts [row][2^B] f16, rows padded to 16 with zeros.
// Activations are split into f16 halves, x = hi + lo ([2][n][128·KB], zero
// past the last column, each 32-column piece's 16-byte parts placed by
// x_slot), so products keep f32 accuracy: the tensor cores multiply f16
// exactly and add in f32. The ops that make a linear's input (the norms,
// SwiGLU) leave them split beside it (common.cuh); other inputs a block
// splits into its shared memory itself where they fit (kernels _t4s, _t8s),
// else split_x does it first.
//
// Why this layout: mma's A fragment gives lane (g, t) rows g and g + 8 at the
// k positions 2t, 2t+1, 2t+8, 2t+9 of each 16-wide k tile, and its B fragment
// gives it the same k positions of token g. A k position is only a summation
// index, so lane t's four positions in k tile j are mapped to its own columns
// 32t + 4j .. 32t + 4j + 3: a lane reads 32 contiguous activations a block,
// and the 4x4 bit transpose of the low four planes (delta swaps) leaves, in
// nibble word k, the indices of tile 2k in nibbles 0..3 and of tile 2k + 1
// in nibbles 4..7, in the fragment's order.
//
// The lookups spend less than one shared-memory access per weight:
// - 3 bits: a row's table sits in registers as two byte tables (the low and
//   the high bytes of its f16 entries), and `prmt` with the nibble word as
//   selector picks four entries' bytes at once (two more `prmt` interleave
//   them into the two f16x2 registers mma takes): no shared memory at all,
//   but one ALU-pipe instruction a weight (kernels _p take the pair tables
//   below instead: half of that, 32 KiB a block).
// - 4 bits: pair tables in shared memory, one copy a lane (word E·32 + lane:
//   no bank conflicts): a byte of the nibble word holds the indices of two
//   neighbouring slots, and one 32-bit load gives both weights as the f16x2
//   register mma takes (64 KiB a block; on layers of many tiles the host
//   leaves the activations to split_x so more blocks fit, and DP-LLM's
//   in-kernel choice takes the entry tables below there: kernels _e).
// - above 4 bits: entry tables in shared memory, one copy a lane, one 32-bit
//   load giving the entry of rows g and g + 8 (2^B · 128 bytes a block).
// Work split: a block of W warps takes one row tile; warp w takes the column
// blocks w, w + W, ..., and the warps' sums meet in shared memory. With T
// tiles a block (tpb), warp w works on tile w % T and column blocks w / T,
// w / T + W / T, ...: the T warps of a column block read the same
// activations at about the same time (L1 instead of L2, for many tokens),
// each tile with its own tables. Split-K
// (layers of few tiles, which would leave multiprocessors idle): S blocks a
// tile (gridDim.y), block s over column blocks [s·KB/S, (s+1)·KB/S); each
// writes its sums to a scratch buffer (part), and the tile's last block to
// finish, found by a per-tile counter (done) that it resets to 0 for the
// next launch, adds the S sums in order (so results do not depend on which
// block finished last) and writes y.
// Up to 4 tokens one mma does hi and lo at once (B columns 0..3 take the hi
// halves of tokens 0..3, columns 4..7 the lo halves); up to 8, two do.

// (u32, u16, FULL and h2f come from common.cuh, prepended by the host.)

// Blocks of 512 threads a multiprocessor a kernel of NT (4 or 8) tokens at B
// bits is compiled for: 2, so at most 64 registers a thread, for the 1..4
// token kernels at 3 and 4 bits (H100, one token: 4-16 % faster on the 8B's
// shapes but 1024x4096, where 4 bits lost 4 %; 8B decode 3.5 % faster);
// elsewhere the cap spills (5-8 bits, or 8 tokens: up to 1.9x slower), so 1.
#define GEMV_MIN_BLOCKS(B, NT) ((NT) == 4 && (B) <= 4 ? 2 : 1)

__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}

// c += A · B for one 16x16 A (weights, f16x2 a0..a3) and 16x8 B (tokens, f16x2 b0, b1).
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
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

// A row's 3-bit table in registers: lo[i] / hi[i] hold the low / high bytes
// of entries 4i .. 4i + 3.
struct RegTable {
    u32 lo[2], hi[2];

    __device__ __forceinline__ void load(const u16* __restrict__ lut) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(lut));
        lo[0] = prmt(v.x, v.y, 0x6420);
        hi[0] = prmt(v.x, v.y, 0x7531);
        lo[1] = prmt(v.z, v.w, 0x6420);
        hi[1] = prmt(v.z, v.w, 0x7531);
    }

    // The four weights of selector nibbles 0..3 of `sel` (slots 0..3 of one
    // k tile) as f16x2 (slot 0, slot 1) and (slot 2, slot 3).
    __device__ __forceinline__ void look(u32 sel, u32& a01, u32& a23) const {
        const u32 l = prmt(lo[0], lo[1], sel), h = prmt(hi[0], hi[1], sel);
        a01 = prmt(l, h, 0x5140);
        a23 = prmt(l, h, 0x7362);
    }
};

// The tables of both rows of a lane: at 3 bits in registers, at 4 bits
// shared-memory pair tables, above 4 bits shared-memory entry tables (and
// pair tables of half the copies, HALF_PAIRS, at 3 and 4 bits on demand).
enum TableKind { REGS, PAIRS, ENTRIES, HALF_PAIRS };
// The tables a kernel without the `e` suffix takes at B bits.
__host__ __device__ constexpr int default_kind(int B) { return B == 3 ? REGS : B == 4 ? PAIRS : ENTRIES; }
template <int B, int KIND = default_kind(B)>
struct Tables;

template <int B>
struct Tables<B, REGS> {
    RegTable g, g8;
    // Rows row0 + g and row0 + g + 8 of the lane's tile (lane = 4g + t); no shared memory.
    __device__ __forceinline__ void load(const u16* __restrict__ luts, int row0, int lane, u32*, int, int) {
        const int g_ = lane >> 2;
        g.load(luts + (long long)(row0 + g_) * (1 << B));
        g8.load(luts + (long long)(row0 + g_ + 8) * (1 << B));
    }
    // The A fragment of one k tile (`half` of nibble words n0, n1: rows g, g + 8).
    __device__ __forceinline__ void frag(u32 n0, u32 n1, int half, u32 (&a)[4]) const {
        g.look(n0 >> (16 * half), a[0], a[2]);
        g8.look(n1 >> (16 * half), a[1], a[3]);
    }
};

// Pairs (3 and 4 bits): word (E·C + copy) of region r holds, as f16x2,
// entries E % 16 and E / 16 of row g + 8r (lane = 4g + t): a byte of a
// nibble word (the indices of two neighbouring slots) addresses both weights
// of one f16x2 register of the A fragment, so one load gives two weights. At
// 3 bits E < 128 (entries 8..15 of each 16 unused): half the 4-bit tables,
// and the lookup leaves the ALU pipe for shared memory. C = 32 copies (kind
// PAIRS): one a lane, so no bank conflicts. C = 16 (HALF_PAIRS): lanes
// 2i, 2i + 1 share copy i, half the shared memory and half the stores to
// build it; two lanes of a copy that look up different pairs of the same
// parity hit one bank twice.
template <int B, int C>
struct PairTables {
    static constexpr int N = 1 << B;                   // entries a row
    static constexpr u32 REGION = 16 * N * C * 4;      // bytes
    static constexpr int SHIFT = C == 32 ? 7 : 6;      // log2 of a pair's C words in bytes
    u32 base;
    // The tables of tile rows row0.. into smem, by the threads first,
    // first + stride, ... of the block (the warps of this tile).
    __device__ __forceinline__ void load(const u16* __restrict__ luts, int row0, int lane, u32* smem, int first,
                                         int stride) {
        // Thread (hi, rg) writes the words of pairs E = 16·hi + lo of row
        // pair g = rg % 8, region rg / 8, for the C/8 copies of g at once.
        for (int i = first; i < 16 * N; i += stride) {
            const int rg = i & 15, hi = i >> 4, gp = rg & 7, region = rg >> 3;
            const u16* lut = luts + ((long long)(row0 + gp + 8 * region) << B);
            u32 w[8];
#pragma unroll
            for (int q = 0; q < N / 8; ++q) {
                const uint4 u = __ldg(reinterpret_cast<const uint4*>(lut) + q);
                w[4 * q] = u.x, w[4 * q + 1] = u.y, w[4 * q + 2] = u.z, w[4 * q + 3] = u.w;
            }
            const u32 top = (u32)lut[hi] << 16;
            u32* dst = smem + region * (REGION / 4) + hi * 16 * C + (C / 8) * gp;
#pragma unroll
            for (int lo = 0; lo < N; ++lo) {
                const u32 val = ((w[lo >> 1] >> (16 * (lo & 1))) & 0xffffu) | top;
                if constexpr (C == 32)
                    *reinterpret_cast<uint4*>(dst + lo * C) = make_uint4(val, val, val, val);
                else
                    *reinterpret_cast<uint2*>(dst + lo * C) = make_uint2(val, val);
            }
        }
        base = (u32)__cvta_generic_to_shared(smem) + (C == 32 ? lane : lane >> 1) * 4;
    }
    __device__ __forceinline__ u32 at(u32 n, u32 sel, u32 region) const {
        return lds32(base + region + (__byte_perm(n, 0, sel) << SHIFT));
    }
    __device__ __forceinline__ void frag(u32 n0, u32 n1, int half, u32 (&a)[4]) const {
        const u32 s0 = 0x4440 + 2 * half, s1 = 0x4441 + 2 * half;
        a[0] = at(n0, s0, 0);
        a[2] = at(n0, s1, 0);
        a[1] = at(n1, s0, REGION);
        a[3] = at(n1, s1, REGION);
    }
};

template <int B>
struct Tables<B, PAIRS> : PairTables<B, 32> {};
template <int B>
struct Tables<B, HALF_PAIRS> : PairTables<B, 16> {};

template <int B>
struct Tables<B, ENTRIES> {
    u32 base;  // shared address of entry 0 of this lane's copy
    // The tables of tile rows row0.. into smem, by the threads first,
    // first + stride, ... of the block (the warps of this tile).
    __device__ __forceinline__ void load(const u16* __restrict__ luts, int row0, int lane, u32* smem, int first,
                                         int stride) {
        // Word e·32 + l: entry e of rows g_l and g_l + 8 (g_l = l / 4) as
        // f16x2, the same for the four lanes of a row pair (one 16-byte store).
        for (int i = first; i < 1 << B; i += stride) {
            const int gp = i >> (B - 3), e0 = (i & ((1 << (B - 3)) - 1)) * 8;
            const uint4 u = __ldg(reinterpret_cast<const uint4*>(luts + ((long long)(row0 + gp) << B) + e0));
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(luts + ((long long)(row0 + gp + 8) << B) + e0));
            const u32 uw[4] = {u.x, u.y, u.z, u.w}, vw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const u32 w = prmt(uw[k >> 1], vw[k >> 1], (k & 1) ? 0x7632 : 0x5410);
                *reinterpret_cast<uint4*>(smem + (e0 + k) * 32 + 4 * gp) = make_uint4(w, w, w, w);
            }
        }
        base = (u32)__cvta_generic_to_shared(smem) + lane * 4;
    }
    // The word of the index in byte `byte` of e.
    __device__ __forceinline__ u32 at(u32 e, int byte) const {
        return lds32(base + (__byte_perm(e, 0, 0x4440 | byte) << 7));
    }
    // The A fragment of one k tile from index bytes: ev holds the indices of
    // slots 0 and 2 (bytes 0, 1), od of slots 1 and 3; ev0, od0 for row g,
    // ev1, od1 for row g + 8.
    __device__ __forceinline__ void frag(u32 ev0, u32 od0, u32 ev1, u32 od1, u32 (&a)[4]) const {
        // Row g takes the low halves of its lookups, row g + 8 the high halves.
        a[0] = prmt(at(ev0, 0), at(od0, 0), 0x5410);
        a[2] = prmt(at(ev0, 1), at(od0, 1), 0x5410);
        a[1] = prmt(at(ev1, 0), at(od1, 0), 0x7632);
        a[3] = prmt(at(ev1, 1), at(od1, 1), 0x7632);
    }
};

// x [n][cols] f32 (rows x_stride apart) as f16 halves into xs [2][n][cols_p]
// (split_store, zero from cols on), eight columns per step of each thread of
// the block (`first`, `stride`: the thread's place and count).
__device__ __forceinline__ void split_into(const float* __restrict__ x, int x_stride, int n, int cols,
                                           int cols_p, u16* xs, int first, int stride) {
    const bool vec = (cols & 3) == 0 && (x_stride & 3) == 0 && (((size_t)x) & 15) == 0;
    const int per = cols_p >> 3;
    for (int i = first; i < n * per; i += stride) {
        const int tok = i / per, c = (i % per) * 8;
        const float* xt = x + (long long)tok * x_stride + c;
        float v[8];
        if (vec && c + 8 <= cols) {
            const float4 a = *reinterpret_cast<const float4*>(xt);
            const float4 b = *reinterpret_cast<const float4*>(xt + 4);
            v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = c + k < cols ? xt[k] : 0.f;
        }
        split_store<8>(xs, n, cols_p, tok, c, v);
    }
}

// Asks L2 for the planes this block will read: B planes of its column blocks
// (its `tiles` tiles from tile0, whole; or with split-K one tile's split
// blockIdx.y of gridDim.y), 256 bytes each, a 128-byte line a thread at a
// time, holding no registers. Issued first thing, before the PDL wait, so
// the tiles stream from HBM while the kernel before ends, and later blocks
// have their whole tiles in flight at once instead of one column block a
// warp ahead.
template <int B>
__device__ __forceinline__ void prefetch_planes(const uint2* __restrict__ planes, long long plane_stride,
                                                int kbs, int tile0, int tiles) {
    const int kb0 = blockIdx.y * kbs / gridDim.y, kb1 = (blockIdx.y + 1) * kbs / gridDim.y;
    const int lines = 2 * (gridDim.y > 1 ? kb1 - kb0 : kbs * tiles);
    const uint2* first = planes + ((long long)tile0 * kbs + kb0) * 32;
    for (int i = threadIdx.x; i < B * lines; i += blockDim.x) {
        const int j = i / lines, l = i - j * lines;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(first + j * plane_stride + 16 * l));
    }
}

// SX: the block splits the activations into shared memory itself (xin: x
// f32, rows x_stride apart); else they come split in global memory (xin: xs
// from split_x or the op that made them).
template <int B, int NT, bool SX, int KIND = default_kind(B)>
__device__ __forceinline__ void gemv(
    const uint2* __restrict__ planes, long long plane_stride, const u16* __restrict__ luts,
    const void* __restrict__ xin, int x_stride, int cols, int n, float* __restrict__ y, int y_stride,
    int rows, int kbs, const u32* __restrict__ mask, u32 want, float* __restrict__ part, u32* done,
    int prefetch, int tpb) {
    // Launched with PDL, the next kernel may start once every block is here.
    pdl_launch_dependents();
    // Per-token precision (DP-LLM): with a mask, only the tokens whose
    // decision equals `want` are written, and a block with none returns at once
    // (the same for every thread, so before any barrier; the mask is another
    // kernel's output, so after pdl_wait).
    if (mask) {
        pdl_wait();
        bool any = false;
        for (int t = 0; t < n; ++t) any |= mask[t] == want;
        if (!any) return;
    }
    // tpb tiles a block (no split-K then): warp w takes tile sub = w % tpb of
    // them, and its column blocks w / tpb, w / tpb + warps / tpb, ...: the
    // warps of one column block, one a tile, read the same activations
    // together. A last block's tiles past the layer do nothing.
    const int tile0 = blockIdx.x * tpb, tiles = min(tpb, (rows + 15) / 16 - tile0);
    if (prefetch) prefetch_planes<B>(planes, plane_stride, kbs, tile0, tiles);
    constexpr bool PACK = NT <= 4;   // hi and lo in one mma
    constexpr int XW = PACK ? 1 : 2;  // activation sets a lane loads
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int sub = warp % tpb, wcol = warp / tpb, wstride = warps / tpb;
    const int tile = tile0 + sub, row0 = tile * 16;
    const bool live = sub < tiles;
    // This block's column blocks (all of them without split-K).
    const int splits = gridDim.y, split = blockIdx.y;
    const int kb_end = (split + 1) * kbs / splits;
    const int cols_p = kbs * 128;
    // Shared memory: the tables of each tile (none in registers, 2 · 16 · 2^B ·
    // 32 words of pairs, half that of half pairs, 32 << B words of entries),
    // the split activations (SX: n · cols_p words), the warps' sums.
    extern __shared__ __align__(16) u32 smem[];
    constexpr int TABLE_WORDS = KIND == REGS         ? 0
                                : KIND == PAIRS      ? 2 * 16 * 32 << B
                                : KIND == HALF_PAIRS ? 2 * 16 * 16 << B
                                                     : 32 << B;
    u16* xs_s = reinterpret_cast<u16*>(smem + tpb * TABLE_WORDS);
    float* red = reinterpret_cast<float*>(smem + tpb * TABLE_WORDS + (SX ? n * cols_p : 0));

    // This warp's first column block of planes is requested before the
    // tables and activations are set up, so its latency overlaps that work.
    const uint2* pl = planes + (long long)tile * kbs * 32 + lane;
    auto load_planes = [&](uint2 (&p)[B], int kb) {
#pragma unroll
        for (int j = 0; j < B; ++j) p[j] = __ldg(pl + j * plane_stride + kb * 32);
    };
    uint2 p[B], pn[B];
    int kb = split * kbs / splits + wcol;
    const int kb_stop = live ? kb_end : kb;  // no column blocks past the layer
    if (kb < kb_stop) load_planes(p, kb);

    // The tables (shared ones are ready after the barrier below), each
    // tile's built by its warps.
    Tables<B, KIND> tab;
    if (live) tab.load(luts, row0, lane, smem + sub * TABLE_WORDS, wcol * 32 + lane, wstride * 32);
    // All of the above reads only the weights; the activations and y wait
    // for the kernel before (PDL), which may still be running until here.
    pdl_wait();
    if (SX)
        split_into(reinterpret_cast<const float*>(xin), x_stride, n, cols, cols_p, xs_s, threadIdx.x,
                   blockDim.x);
    if (SX || KIND != REGS) __syncthreads();

    // The activations this lane feeds to B column g.
    const u16* xs = SX ? xs_s : reinterpret_cast<const u16*>(xin);
    const u16* xg[XW];
    if (PACK) {
        xg[0] = xs + ((g < 4 ? 0 : n) + min(g & 3, n - 1)) * cols_p + 32 * t;
    } else {
        xg[0] = xs + min(g, n - 1) * cols_p + 32 * t;
        xg[1] = xs + (n + min(g, n - 1)) * cols_p + 32 * t;
    }
    const int swz = (t >> 1) & 1;  // x_slot's swap of 16-byte pieces
    auto load_x = [&](uint4 (&x)[XW][4], int kb) {
#pragma unroll
        for (int s = 0; s < XW; ++s)
#pragma unroll
            for (int q = 0; q < 4; ++q) x[s][q] = reinterpret_cast<const uint4*>(xg[s] + kb * 128)[q ^ swz];
    };

    constexpr int LO = B < 4 ? B : 4;
    constexpr int HI = B - LO;
    // Two accumulators (even and odd k tiles) halve the chain of dependent mmas.
    float c[4] = {0.f, 0.f, 0.f, 0.f}, c2[4] = {0.f, 0.f, 0.f, 0.f};
    // The planes are requested one column block ahead; the activations
    // (shared memory, or L2 when split_x made them) right after the block that
    // precedes their use: holding both ahead takes registers that cost more
    // occupancy than they gain (measured).
    uint4 x[XW][4];
    if (kb < kb_stop) load_x(x, kb);
    for (; kb < kb_stop; kb += wstride) {
        const bool more = kb + wstride < kb_stop;
        if (more) load_planes(pn, kb + wstride);
        // Nibble words of rows g (r = 0) and g + 8 (r = 1): low four index bits, and the rest.
        u32 lo[2][4], hi[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const uint2 v0 = p[m < LO ? B - 1 - m : 0];
                const uint2 v1 = p[m < HI ? HI - 1 - m : 0];
                lo[r][m] = m < LO ? (r ? v0.y : v0.x) : 0u;
                hi[r][m] = m < HI ? (r ? v1.y : v1.x) : 0u;
            }
            transpose4(lo[r]);
            if (HI > 0) transpose4(hi[r]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int j = 2 * k + half;  // k tile
                u32 a[4];
                if constexpr (KIND != ENTRIES) {
                    tab.frag(lo[0][k], lo[1][k], half, a);
                } else {
                    // Index bytes: ev holds slots 0 and 2 (bytes 0, 1), od slots 1 and 3.
                    u32 e[2], o[2];
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const u32 l = lo[r][k] >> (16 * half), h = hi[r][k] >> (16 * half);
                        e[r] = (l & 0x0f0fu) | ((h & 0x0f0fu) << 4);
                        o[r] = ((l >> 4) & 0x0f0fu) | (h & 0xf0f0u);
                    }
                    tab.frag(e[0], o[0], e[1], o[1], a);
                }
#pragma unroll
                for (int s = 0; s < XW; ++s) {
                    const uint4 xv = x[s][j >> 1];
                    const u32 b0 = half ? xv.z : xv.x, b1 = half ? xv.w : xv.y;
                    mma(half ? c2 : c, a[0], a[1], a[2], a[3], b0, b1);
                }
            }
        }
        if (more) {
#pragma unroll
            for (int j = 0; j < B; ++j) p[j] = pn[j];
            load_x(x, kb + wstride);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] += c2[i];

    // Lane (g, t) holds rows g (c0, c1) and g + 8 (c2, c3) of B columns 2t, 2t + 1.
    if (PACK) {
        // Columns 4..7 are the lo halves of tokens 0..3: add them to columns 0..3.
#pragma unroll
        for (int i = 0; i < 4; ++i) c[i] += __shfl_xor_sync(FULL, c[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) red[(warp * 4 + i) * 32 + lane] = c[i];
    __syncthreads();
    // Item e < 128 (value e / 32 of lane e % 32) of tile sub s, summed over
    // that tile's warps.
    auto block_sum = [&](int e, int s_) {
        float s = 0.f;
        for (int w = s_; w < warps; w += tpb) s += red[(w * 4 + (e >> 5)) * 32 + (e & 31)];
        return s;
    };
    if (splits > 1) {
        // Split-K: this block's sums to the scratch; the tile's last block adds them.
        float* tile_part = part + (long long)tile * splits * 128;
        for (int e = threadIdx.x; e < 128; e += blockDim.x) tile_part[split * 128 + e] = block_sum(e, 0);
        __threadfence();
        __syncthreads();
        __shared__ u32 arrived;
        if (threadIdx.x == 0) arrived = atomicAdd(done + tile, 1u);
        __syncthreads();
        if (arrived != (u32)splits - 1) return;  // the same for the whole block
        __threadfence();
        if (threadIdx.x == 0) done[tile] = 0u;
    }
    for (int te = threadIdx.x; te < 128 * tpb; te += blockDim.x) {
        const int se = te >> 7, e = te & 127, i = e >> 5, l = e & 31;
        const int tok = 2 * (l & 3) + (i & 1), r = (tile0 + se) * 16 + (l >> 2) + 8 * (i >> 1);
        if (tok < n && r < rows && (!mask || mask[tok] == want)) {
            float s = 0.f;
            if (splits > 1) {
                for (int k = 0; k < splits; ++k) s += __ldcg(part + ((long long)tile * splits + k) * 128 + e);
            } else {
                s = block_sum(e, se);
            }
            y[(long long)tok * y_stride + r] = s;
        }
    }
}

// _t4 / _t8: up to 4 / 8 tokens, activations split by split_x; _t4s / _t8s:
// the block splits them itself into shared memory (when they fit). A suffix
// e: 4 bits with entry tables (2 KiB a block instead of 64 KiB of pair
// tables: `CudaAnyPrec::select_tables`, tests and benchmarks); p: 3 bits with
// pair tables (32 KiB) instead of tables in registers; h: pair tables of
// half the copies (16 KiB at 3 bits, 32 KiB at 4).
#define GEMV_KERNEL_K(B, NT, KIND, E)                                                              \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(B, NT))                     \
        bitplane_gemv_b##B##_t##NT##E(                                                            \
        const uint2* planes, long long plane_stride, const u16* luts, const u16* xs, int n,       \
        float* y, int y_stride, int rows, int kbs, const u32* mask, u32 want, float* part,        \
        u32* done, int prefetch, int tpb) {                                                       \
        gemv<B, NT, false, KIND>(planes, plane_stride, luts, xs, 0, 0, n, y, y_stride, rows, kbs, \
                                 mask, want, part, done, prefetch, tpb);                          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(B, NT))                     \
        bitplane_gemv_b##B##_t##NT##s##E(                                                         \
        const uint2* planes, long long plane_stride, const u16* luts, const float* x, int cols,   \
        int n, float* y, int y_stride, int rows, int kbs, const u32* mask, u32 want, float* part, \
        u32* done, int prefetch, int tpb) {                                                       \
        gemv<B, NT, true, KIND>(planes, plane_stride, luts, x, cols, cols, n, y, y_stride, rows,  \
                                kbs, mask, want, part, done, prefetch, tpb);                      \
    }
#define GEMV_BITS(B) GEMV_KERNEL_K(B, 4, default_kind(B), ) GEMV_KERNEL_K(B, 8, default_kind(B), )

GEMV_BITS(3)
GEMV_KERNEL_K(3, 4, PAIRS, p)
GEMV_KERNEL_K(3, 8, PAIRS, p)
GEMV_KERNEL_K(3, 4, HALF_PAIRS, h)
GEMV_KERNEL_K(3, 8, HALF_PAIRS, h)
GEMV_BITS(4)
GEMV_KERNEL_K(4, 4, ENTRIES, e)
GEMV_KERNEL_K(4, 8, ENTRIES, e)
GEMV_KERNEL_K(4, 4, HALF_PAIRS, h)
GEMV_KERNEL_K(4, 8, HALF_PAIRS, h)
GEMV_BITS(5)
GEMV_BITS(6)
GEMV_BITS(7)
GEMV_BITS(8)

// One token whose precision is decided in the kernel (DP-LLM, b_h = b_l + 1):
// every block works out the decision from the estimator's input e_in (n_e
// values: the linear's input, or a JL estimator's projection; with n_e = 0,
// e_in[0] is the input's norm, left by the kernel that made it) and runs the GEMV
// at BL + 1 bits (tables luts_high) when a * ||e_in|| + c > thr, else at BL
// (luts_low). The first block adds the decision to count[slot] when count is
// given. One launch instead of an estimate, a decision and two masked GEMVs.
// (Kernels _b<BL> take x and split it in the block; _b<BL>x take it split
// by split_x, for layers too wide to split in the block; suffix e below.)
#define GEMV_SELECT_BODY(BL, KL, KH, SX, XIN, XSTRIDE)                                           \
    pdl_enter();                                                                                 \
    const bool high = decide_high(e_in, n_e, a, c, thr);                                         \
    if (high && count && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0)                 \
        atomicAdd(count + slot, 1.f);                                                            \
    if (high)                                                                                    \
        gemv<BL + 1, 4, SX, KH>(planes, plane_stride, luts_high, XIN, XSTRIDE, XSTRIDE, 1, y,    \
                                rows, rows, kbs, nullptr, 0u, part, done, 0, 1);                 \
    else                                                                                         \
        gemv<BL, 4, SX, KL>(planes, plane_stride, luts_low, XIN, XSTRIDE, XSTRIDE, 1, y, rows,   \
                            rows, kbs, nullptr, 0u, part, done, 0, 1);
#define GEMV_SELECT_KERNEL_K(BL, KL, KH, E)                                                        \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(BL + 1, 4))                 \
        bitplane_gemv_select_b##BL##E(                                                             \
        const uint2* planes, long long plane_stride, const u16* luts_low, const u16* luts_high,    \
        const float* x, int cols, float* y, int rows, int kbs, const float* e_in, int n_e, float a, \
        float c, float thr, float* count, int slot, float* part, u32* done) {                      \
        GEMV_SELECT_BODY(BL, KL, KH, true, x, cols)                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(512, GEMV_MIN_BLOCKS(BL + 1, 4))                 \
        bitplane_gemv_select_b##BL##x##E(                                                          \
        const uint2* planes, long long plane_stride, const u16* luts_low, const u16* luts_high,    \
        const u16* xs, int cols, float* y, int rows, int kbs, const float* e_in, int n_e, float a, \
        float c, float thr, float* count, int slot, float* part, u32* done) {                      \
        GEMV_SELECT_BODY(BL, KL, KH, false, xs, cols)                                              \
    }
#define GEMV_SELECT_KERNEL(BL) GEMV_SELECT_KERNEL_K(BL, default_kind(BL), default_kind(BL + 1), )

GEMV_SELECT_KERNEL(3) GEMV_SELECT_KERNEL(4) GEMV_SELECT_KERNEL(5) GEMV_SELECT_KERNEL(6)
GEMV_SELECT_KERNEL(7)
// Suffix e: the 4-bit side with entry tables, as the plain GEMV's kernels _e
// (`CudaAnyPrec::tables`); the other side's tables need little or no shared
// memory, so the launch keeps the plain GEMV's occupancy.
GEMV_SELECT_KERNEL_K(3, REGS, ENTRIES, e) GEMV_SELECT_KERNEL_K(4, ENTRIES, ENTRIES, e)
// Suffix p: the 3-bit side with pair tables, as the plain GEMV's kernels _p.
GEMV_SELECT_KERNEL_K(3, PAIRS, PAIRS, p) GEMV_SELECT_KERNEL_K(3, PAIRS, ENTRIES, pe)
// Suffix h: the 4-bit side with half-copy pair tables (32 KiB instead of 64:
// the 3-bit side keeps the occupancy of its plain GEMV).
GEMV_SELECT_KERNEL_K(3, REGS, HALF_PAIRS, h) GEMV_SELECT_KERNEL_K(3, PAIRS, HALF_PAIRS, ph)
GEMV_SELECT_KERNEL_K(4, HALF_PAIRS, ENTRIES, h)

// The activations of a launch whose block cannot hold them split (see
// split_into): the whole grid splits x [n][cols] into xs [2][n][cols_p]. |x|
// above the f16 range becomes inf, which the forward pass's finiteness
// checks report.
extern "C" __global__ void split_x(const float* x, int x_stride, int n, int cols, int cols_p, u16* xs) {
    pdl_enter();
    split_into(x, x_stride, n, cols, cols_p, xs, blockIdx.x * blockDim.x + threadIdx.x,
               gridDim.x * blockDim.x);
}

// Bit position of column c (< 32) of a lane's word (see the layout above).
__device__ __forceinline__ int column_bit(int c) { return 16 * ((c >> 2) & 1) + 4 * (c & 3) + (c >> 3); }

// The weight at `bits` as f16 [rows x cols] (for long batches, which run as
// one tensor-core GEMM; the values are LUT entries, so f16 holds them
// exactly): one thread per (row, 32-column word), reading `bits` planes and
// the row's LUT. Index bits are MSB first: plane j gives bit bits-1-j.
extern "C" __global__ void bitplane_dequant(const u32* planes, long long plane_stride, const u16* luts,
                                            int bits, u16* out, int rows, int cols, int kbs) {
    pdl_enter();
    const long long total = (long long)rows * kbs * 4;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(e / (kbs * 4)), wi = (int)(e % (kbs * 4));
        const int kb = wi >> 2, t = wi & 3;
        const int lane = 4 * (r & 7) + t;
        const long long at = (((long long)(r >> 4) * kbs + kb) * 32 + lane) * 2 + ((r >> 3) & 1);
        u32 p[8];
        for (int j = 0; j < bits; ++j) p[j] = planes[j * plane_stride * 2 + at];
        const u16* lut = luts + ((long long)r << bits);
        for (int s = 0; s < 32; ++s) {
            const int col = 128 * kb + 32 * t + s;
            if (col >= cols) break;
            const int bit = column_bit(s);
            u32 idx = 0;
            for (int j = 0; j < bits; ++j) idx |= ((p[j] >> bit) & 1u) << (bits - 1 - j);
            out[(long long)r * cols + col] = lut[idx];
        }
    }
}
