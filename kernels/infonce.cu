// The dense all-action InfoNCE loss of SPEC §4.2, fused, loss and gradients, as src/cpu/infonce.rs computes
// it (the derivation is there). Queries are the valid history positions (or the last one per user),
// columns the valid targets, both numbered user by user by the host (src/cuda/infonce.rs), which also
// gives each user a bitmask of the columns that are its false negatives. With q̃ = u/τ and
// s_qc = q̃·v_c − log q_c (the shift only when given), and w = S/P (S the loss scale, P the pairs):
//
//     infonce_split    the queries' user rows and the columns' item rows as pairs of halves (below), in
//                      query and column order, zero past the last and for padding
//     infonce_lse_dq   N_q = log Σ exp s_qc over q's negatives and O_q = Σ_c exp(s_qc − N_q)·v_c, in one
//                      stream of column tiles (online, as flash attention's forward)
//     infonce_pos      one block per user: its positive pairs, l = softplus(N_q − s_qk), the loss,
//                      g_q = Σ_k σ(N_q − s_qk), ∂L/∂u = (w·g_q·O_q − Σ_k w·σ_qk·v_k) / τ, and the
//                      positive part of ∂L/∂v
//     infonce_dc       ∂L/∂v_c += (w/τ)·Σ_q g_q·exp(s_qc − N_q)·u_q
//
// No [queries × columns] matrix exists anywhere: each block holds one 64 × 64 score tile in shared memory
// and recomputes it where it needs it (twice in all: once per query block, once per column block), as
// flash attention does. Every sum has a fixed order and nothing is atomic, so the results repeat bit for
// bit.
//
// Products on tensor cores, to fp32 accuracy. Scores must be fp32: with τ = 0.05 they reach ±20, where
// fp16 inputs would move the loss by about 1e-2. So each fp32 operand x is split into two halves,
// x ≈ hi + lo·2⁻¹¹ with hi = fp16(x) and lo = fp16((x − hi)·2¹¹) (the scale keeps lo clear of fp16's
// subnormals), and a product is hi·hi + (hi·lo + lo·hi)·2⁻¹¹: three wmma products into two fp32
// accumulators, on every GPU from sm_70. What is dropped (lo·lo, and lo's own rounding) is about 2⁻²² of
// each term, against 2⁻²⁴ for the fp32 FMA loop this replaces, at several times its rate. The embeddings
// are split once per launch (infonce_split; the model's are unit rows, far inside fp16's range, and τ is
// applied to the fp32 sums, not to the halves).
//
// The gradient products (P·V in infonce_lse_dq, Pᵀ·U in infonce_dc) need no split: they take the probability
// tile and the embeddings' hi halves alone, one wmma product instead of three. A term is then off by at most
// 2⁻¹⁰ of itself (both factors rounded to fp16), in a sum of positive weights, where the towers' fp16
// backward rounds the gradient it receives to 2⁻¹¹ anyway; the scores, whose error exp(s − N) multiplies by
// s's ±1/τ range, keep the split. The probability tile is stored times NCE_P_SCALE, so that weights down to
// 2⁻²¹ stay normal halves: in infonce_dc exp(s − N) ≤ 1 and g_q ≤ T ≤ NCE_MAX_TARGETS bound every value by
// 2⁸, in infonce_lse_dq the weights against a row's running reference by e⁶ (NCE_REF_SLACK), and both times
// NCE_P_SCALE are under fp16's 65504. The scale, a power of two, comes off exactly with the weights.
//
// The gradients may carry a loss scale S (mixed-precision training): w = S/P instead of 1/P, and every
// gradient flows from w. With S a power of two the scaled gradients are the unscaled ones times S exactly;
// the loss itself is never scaled. Both weights are read from device memory, so a CUDA graph that captured
// the launch replays it with the next update's scale and pair count.
//
// Padding: a query or column whose row (and user) is −1 is padding, as one past the last: it splits to
// zeros, is masked out of every score, and nothing is written for it. A training step padded to a shape
// bucket (src/cuda/trainer) so fills whole tiles, and its results are those of the unpadded batch exactly.
//
// A block is 256 threads over a 64 × 64 tile. In the products warp w owns tile rows 16·(w / 2) .. + 16 and
// half of the columns; in the element-wise work (masks, exponentials, row reductions) thread (ty, tx) owns
// rows ty + 16i and columns tx + 16j (i, j < 4), read from the fp32 tile in shared memory.
#include "common.cuh"

#define NCE_TILE 64
#define NCE_THREADS 256
// Blocks a multiprocessor should hold at once, which caps the tiled passes' registers: two (128 registers a
// thread) from sm_80 on; one on a V100, whose shared memory holds one block anyway and whose wmma code
// needs more registers than 128 without spilling.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define NCE_MIN_BLOCKS 2
#else
#define NCE_MIN_BLOCKS 1
#endif
// Queries per pass of infonce_pos, and the most targets a user may have there.
#define NCE_CHUNK 32
#define NCE_MAX_TARGETS 256
#define NCE_LO_SCALE 2048.0f
#define NCE_P_SCALE 128.0f
#define NCE_REF_SLACK 6.0f  // infonce_lse_dq's weights stay under e⁶ (× NCE_P_SCALE: 51,641 < 65504)
#define NCE_LDS 80              // fp32 score rows: a warp's two rows in the element phase lie 16 banks apart
#define NCE_LDP (NCE_TILE + 8)  // fp16 probability rows

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// log(1 + eˣ) without overflow; 0 at −∞.
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// 1 / (1 + e⁻ˣ) without overflow; 0 at −∞.
__device__ __forceinline__ float sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}

// Max and sum over the 16 lanes of a half-warp (the threads that share a tile row).
__device__ __forceinline__ float half_max(float v) {
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float half_sum(float v) {
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// x as hi + lo·2⁻¹¹ (see the top of the file).
__device__ __forceinline__ void split(float x, f16& hi, f16& lo) {
    hi = f32_to_f16(x);
    lo = f32_to_f16((x - f16_to_f32(hi)) * NCE_LO_SCALE);
}

// hi[r, k] and lo[r, k] for r < n_pad (a multiple of 64) and k < d: row idx[r] of src, zero past n and for
// padding (idx −1).
extern "C" __global__ void infonce_split(f16* __restrict__ hi, f16* __restrict__ lo, const float* __restrict__ src,
                                         const int* __restrict__ idx, int n, int n_pad, int d) {
    const index_t total = (index_t)n_pad * d;
    for (index_t e = blockIdx.x * (index_t)blockDim.x + threadIdx.x; e < total; e += (index_t)gridDim.x * blockDim.x) {
        const int r = (int)(e / d), k = (int)(e % d);
        const int row = r < n ? idx[r] : -1;
        split(row >= 0 ? src[(index_t)row * d + k] : 0.0f, hi[e], lo[e]);
    }
}

// A pass's dynamic shared memory at width D: the hi and lo halves of a 64-row query tile and of a 64-row
// column tile (rows of D + 8 halves, so that a fragment's 16 rows start in different banks), then one
// region that holds in turn the fp32 score tile, the fp16 probability tile, and the block's fp32 gradient
// rows; infonce_lse_dq adds the block's fp32 O rows after it (BYTES_O in all).
template <int D>
struct NceShared {
    static constexpr int LDH = D + 8;
    static constexpr int LDG = D + 4;  // fp32 gradient and O rows
    static constexpr int TILE_HALVES = NCE_TILE * LDH;
    static constexpr int SCORES = NCE_TILE * NCE_LDS * 4, PROBS = NCE_TILE * NCE_LDP * 2;
    static constexpr int GRADS = NCE_TILE * LDG * 4;
    static constexpr int REGION = SCORES > PROBS ? (SCORES > GRADS ? SCORES : GRADS) : (PROBS > GRADS ? PROBS : GRADS);
    static constexpr int BYTES = 4 * TILE_HALVES * 2 + REGION;
    static constexpr int BYTES_O = BYTES + GRADS;
    f16 *qh, *ql, *ch, *cl, *p;
    float *s, *grads, *o;
};

template <int D, bool WITH_O>
__device__ __forceinline__ NceShared<D> nce_shared() {
    using S = NceShared<D>;
    DYNAMIC_SHARED(f16, smem);
    if (dynamic_smem_size() < (unsigned)(WITH_O ? S::BYTES_O : S::BYTES)) __trap();
    S sh;
    sh.qh = smem;
    sh.ql = sh.qh + S::TILE_HALVES;
    sh.ch = sh.ql + S::TILE_HALVES;
    sh.cl = sh.ch + S::TILE_HALVES;
    sh.s = sh.grads = reinterpret_cast<float*>(sh.cl + S::TILE_HALVES);
    sh.p = reinterpret_cast<f16*>(sh.s);
    sh.o = WITH_O ? sh.s + S::REGION / 4 : nullptr;
    return sh;
}

// Rows first .. first + 63 of the split arrays into a tile's hi and lo halves.
template <int D>
__device__ __forceinline__ void load_split(f16* hi_tile, f16* lo_tile, const f16* __restrict__ hi,
                                           const f16* __restrict__ lo, int first) {
    load_tile<NCE_TILE, D>(hi_tile, NceShared<D>::LDH, hi, D, first, first + NCE_TILE);
    load_tile<NCE_TILE, D>(lo_tile, NceShared<D>::LDH, lo, D, first, first + NCE_TILE);
}

// acc[j] += a·b for COLS / 16 column blocks of 16 from split operands: A (16 rows, K deep, row-major, ld
// lda) and B (K × COLS, column-major: its columns are rows of bh/bl). main gets hi·hi, cross hi·lo + lo·hi.
// A is loaded once per K step for every column block (shared memory, not the tensor cores, bounds these
// products on an H100: docs/perf.md). Unrolled by two, not fully: the full unroll's fragments spill at
// sm_90's 128-register cap (NCE_MIN_BLOCKS) in infonce_dc_d64.
template <int K, int COLS>
__device__ __forceinline__ void split_products(FragC main[COLS / 16], FragC cross[COLS / 16], const f16* ah,
                                               const f16* al, int lda, const f16* bh, const f16* bl, int ldb) {
#pragma unroll 2
    for (int kk = 0; kk < K / 16; ++kk) {
        FragA a_hi, a_lo;
        load_a_row(a_hi, ah + kk * 16, lda);
        load_a_row(a_lo, al + kk * 16, lda);
#pragma unroll
        for (int j = 0; j < COLS / 16; ++j) {
            FragB b_hi, b_lo;
            load_b_col(b_hi, bh + j * 16 * ldb + kk * 16, ldb);
            load_b_col(b_lo, bl + j * 16 * ldb + kk * 16, ldb);
            mma_row_col(main[j], a_hi, b_hi);
            mma_row_col(cross[j], a_hi, b_lo);
            mma_row_col(cross[j], a_lo, b_hi);
        }
    }
}

// main + cross·2⁻¹¹ of COLS / 16 accumulator pairs, stored from dst on (fp32 rows of ld).
template <int COLS>
__device__ __forceinline__ void store_split(float* dst, int ld, FragC main[COLS / 16], const FragC cross[COLS / 16]) {
#pragma unroll
    for (int j = 0; j < COLS / 16; ++j) {
        axpy_c(main[j], 1.0f / NCE_LO_SCALE, cross[j]);
        store_d_row(dst + j * 16, main[j], ld);
    }
}

// N accumulators, zeroed.
template <int N>
__device__ __forceinline__ void zero_all(FragC acc[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) zero_c(acc[j]);
}

// acc[j] += a·b for COLS / 16 column blocks of 16, fp16 operands: A (16 rows, K deep, row-major, ld lda)
// and B (K × COLS, row-major, ld ldb). A is loaded once per K step: with one accumulator per column block
// the fragments fit the register cap without reloading it.
template <int K, int COLS>
__device__ __forceinline__ void half_products(FragC acc[COLS / 16], const f16* a, int lda, const f16* b, int ldb) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        FragA fa;
        load_a_row(fa, a + kk * 16, lda);
#pragma unroll
        for (int j = 0; j < COLS / 16; ++j) {
            FragB fb;
            load_b_row(fb, b + kk * 16 * ldb + j * 16, ldb);
            mma_row_row(acc[j], fa, fb);
        }
    }
}

// The unshifted, unmasked score tile Σ_k u_qk·v_ck of the query and column tiles into sh.s (τ not applied).
template <int D>
__device__ __forceinline__ void score_tile(const NceShared<D>& sh) {
    constexpr int LDH = NceShared<D>::LDH;
    const int warp = threadIdx.x / 32;
    const int r0 = 16 * (warp / 2), c0 = (NCE_TILE / 2) * (warp % 2);
    FragC main[NCE_TILE / 32], cross[NCE_TILE / 32];
    zero_all<NCE_TILE / 32>(main);
    zero_all<NCE_TILE / 32>(cross);
    split_products<D, NCE_TILE / 2>(main, cross, sh.qh + r0 * LDH, sh.ql + r0 * LDH, LDH, sh.ch + c0 * LDH,
                                    sh.cl + c0 * LDH, LDH);
    store_split<NCE_TILE / 2>(sh.s + r0 * NCE_LDS + c0, NCE_LDS, main, cross);
}

// The thread's 4 × 4 scores of the tile in sh.s, over τ.
__device__ __forceinline__ void read_scores(float s[4][4], const float* tile, float inv_tau) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = tile[(ty + 16 * i) * NCE_LDS + tx + 16 * j] * inv_tau;
}

// Per column of a tile: its user (−1 past the last column and for padding) and its shift (log q, or 0).
struct ColumnInfo {
    int user[NCE_TILE];
    float shift[NCE_TILE];
};

__device__ __forceinline__ void load_columns(ColumnInfo& info, const int* __restrict__ c_user,
                                             const int* __restrict__ c_row, const float* __restrict__ log_q,
                                             int first, int nc) {
    for (int c = threadIdx.x; c < NCE_TILE; c += NCE_THREADS) {
        const bool real = first + c < nc && c_user[first + c] >= 0;
        info.user[c] = real ? c_user[first + c] : -1;
        info.shift[c] = real && log_q != nullptr ? log_q[c_row[first + c]] : 0.0f;
    }
}

// The scores s_qc of the thread's elements with every non-negative at −∞: padding rows and columns, the
// query user's own columns, and (with `ban`) its false negatives, bit c of row `user` of the
// [users, words] bitmask. row_user < 0 marks a padding row; c0 is the tile's first column.
__device__ __forceinline__ void mask_scores(float s[4][4], const int row_user[4], const ColumnInfo& info,
                                            const unsigned* __restrict__ ban, int words, int c0) {
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // The tile's 64 columns are two words of the user's bitmask (c0 is a multiple of 64).
        unsigned long long bits = 0;
        if (ban != nullptr && row_user[i] >= 0) {
            const unsigned* w = ban + (index_t)row_user[i] * words + c0 / 32;
            bits = (unsigned long long)w[0] | (c0 / 32 + 1 < words ? (unsigned long long)w[1] << 32 : 0ull);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = tx + 16 * j;
            const int cu = info.user[c];
            const bool negative = row_user[i] >= 0 && cu >= 0 && cu != row_user[i] && !((bits >> c) & 1ull);
            s[i][j] = negative ? s[i][j] - info.shift[c] : neg_inf();
        }
    }
}

// Row q's (g, N), or (0, −∞) past the last query and for padding.
__device__ __forceinline__ void row_terms(int q, int nq, const int* __restrict__ q_user, const float* __restrict__ lse,
                                          const float* __restrict__ g, int& user, float& row_lse, float& row_g) {
    user = q < nq ? q_user[q] : -1;
    row_lse = user >= 0 ? lse[q] : neg_inf();
    row_g = user >= 0 ? g[q] : 0.0f;
}

// exp(s − N) of a score, 0 where it is masked (−∞; this also covers N = −∞, a row without negatives).
__device__ __forceinline__ float prob(float s, float row_lse) { return s == neg_inf() ? 0.0f : expf(s - row_lse); }

// The probability value of the thread's element (r, c) of the tile into sh.p, times NCE_P_SCALE.
template <int D>
__device__ __forceinline__ void store_prob(const NceShared<D>& sh, int r, int c, float p) {
    sh.p[r * NCE_LDP + c] = f32_to_f16(p * NCE_P_SCALE);
}

// The warp's accumulators (sums times NCE_P_SCALE) into the block's fp32 gradient rows sh.grads, once every
// warp is done with the tiles (the region is shared).
template <int D>
__device__ __forceinline__ void stage_grads(const NceShared<D>& sh, const FragC acc[D / 32]) {
    const int warp = threadIdx.x / 32;
    float* dst = sh.grads + 16 * (warp / 2) * NceShared<D>::LDG + (D / 2) * (warp % 2);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < D / 32; ++j) store_d_row(dst + j * 16, acc[j], NceShared<D>::LDG);
    __syncthreads();
}

// O = (O + the warps' accumulators)·scale, row by row (the thread's rows ty + 16i), through sh.grads; every
// thread calls it, and it leaves the region free for the next tile.
template <int D>
__device__ __forceinline__ void add_into_o(const NceShared<D>& sh, const FragC acc[D / 32], const float scale[4]) {
    constexpr int LDG = NceShared<D>::LDG;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    stage_grads<D>(sh, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            const int e = (ty + 16 * i) * LDG + tx + 16 * j;
            sh.o[e] = (sh.o[e] + sh.grads[e]) * scale[i];
        }
    __syncthreads();
}

// Pass 1, for one block of 64 queries: over the column tiles, N_q = log Σ exp s_qc over q's
// negatives (−∞ when it has none) and O_q = Σ_c exp(s_qc − N_q)·v_c, the negatives' weighted mean of the
// column embeddings, written to o in query order (infonce_pos turns it into ∂L/∂q̃ once it knows g_q). As
// flash attention does, the weights are taken against a reference per row and O is rescaled when that
// changes; lazily here: the reference moves only when a tile's scores pass it by more than NCE_REF_SLACK,
// so a weight is at most e^NCE_REF_SLACK (fp16 holds it times NCE_P_SCALE), and a rescale, which goes
// through shared memory (wmma's accumulators hide which row a register holds), is rare after the first
// tiles. The products accumulate in registers and are added into the block's O in shared memory, each
// thread owning the same elements as in the element-wise work, at a rescale and at the end.
template <int D>
__device__ void lse_dq_impl(float* __restrict__ lse, float* __restrict__ o, const f16* __restrict__ q_hi,
                            const f16* __restrict__ q_lo, const f16* __restrict__ c_hi, const f16* __restrict__ c_lo,
                            const float* __restrict__ log_q, const int* __restrict__ q_user,
                            const int* __restrict__ c_row, const int* __restrict__ c_user,
                            const unsigned* __restrict__ ban, int nq, int nc, int words, float inv_tau) {
    constexpr int LDH = NceShared<D>::LDH, LDG = NceShared<D>::LDG;
    const NceShared<D> sh = nce_shared<D, true>();
    __shared__ ColumnInfo info;
    __shared__ int rescale;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16, warp = threadIdx.x / 32;
    const int first = blockIdx.x * NCE_TILE;
    load_split<D>(sh.qh, sh.ql, q_hi, q_lo, first);
    int row_user[4];
    float ref[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = first + ty + 16 * i;
        row_user[i] = q < nq ? q_user[q] : -1;
        ref[i] = neg_inf();
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) sh.o[(ty + 16 * i) * LDG + tx + 16 * j] = 0.0f;
    }
    FragC acc[D / 32];
    zero_all<D / 32>(acc);
    const int r0 = 16 * (warp / 2), d0 = (D / 2) * (warp % 2);
    for (int c0 = 0; c0 < nc; c0 += NCE_TILE) {
        __syncthreads();  // the previous tile's readers are done
        load_split<D>(sh.ch, sh.cl, c_hi, c_lo, c0);
        load_columns(info, c_user, c_row, log_q, c0, nc);
        if (threadIdx.x == 0) rescale = 0;
        __syncthreads();
        score_tile<D>(sh);
        __syncthreads();
        float s[4][4], scale[4];
        read_scores(s, sh.s, inv_tau);
        mask_scores(s, row_user, info, ban, words, c0);
        // Every lane of the warp takes the shuffles: the two half-warps hold different rows.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float top = half_max(fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3])));
            scale[i] = 1.0f;
            if (top == neg_inf() || top <= ref[i] + NCE_REF_SLACK) continue;
            // A row's first negatives set its reference (nothing of it is in O yet); a jump rescales.
            if (ref[i] != neg_inf()) {
                scale[i] = expf(ref[i] - top);
                rescale = 1;
            }
            ref[i] = top;
        }
        __syncthreads();  // the scores are read; `rescale` is the whole block's
        if (rescale) {  // the same for every thread
            add_into_o(sh, acc, scale);
            zero_all<D / 32>(acc);
        }
        // The weights against the reference, their row sums, and the tile of them for the products.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float p[4], part = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                p[j] = prob(s[i][j], ref[i]);
                part += p[j];
            }
            l[i] = l[i] * scale[i] + half_sum(part);
#pragma unroll
            for (int j = 0; j < 4; ++j) store_prob(sh, ty + 16 * i, tx + 16 * j, p[j]);
        }
        __syncthreads();
        half_products<NCE_TILE, D / 2>(acc, sh.p + r0 * NCE_LDP, NCE_LDP, sh.ch + d0, LDH);
    }
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    add_into_o(sh, acc, ones);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = first + ty + 16 * i;
        if (q >= nq) continue;
        const bool any = l[i] > 0.0f;  // false without negatives (and for padding): N = −∞, O = 0
        if (tx == 0) lse[q] = any ? ref[i] + logf(l[i]) : neg_inf();
        const float norm = any ? 1.0f / (l[i] * NCE_P_SCALE) : 0.0f;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            o[(index_t)q * D + tx + 16 * j] = sh.o[(ty + 16 * i) * LDG + tx + 16 * j] * norm;
        }
    }
}

// Pass 3 for one block of 64 columns: over every tile of queries, recompute the scores and
// g_q·exp(s − N_q), and add their product with the query tile into the block's Σ_q g_q·exp(s − N)·u_q,
// then w/τ times that into d_items, which holds the positives' part. The probability tile is stored
// transposed (columns as rows), the A operand of that product.
template <int D>
__device__ void dc_impl(float* __restrict__ d_items, const f16* __restrict__ q_hi, const f16* __restrict__ q_lo,
                        const f16* __restrict__ c_hi, const f16* __restrict__ c_lo, const float* __restrict__ log_q,
                        const int* __restrict__ q_user, const int* __restrict__ c_row, const int* __restrict__ c_user,
                        const unsigned* __restrict__ ban, const float* __restrict__ lse, const float* __restrict__ g,
                        const float* __restrict__ weights, int nq, int nc, int words, float inv_tau) {
    constexpr int LDH = NceShared<D>::LDH;
    const NceShared<D> sh = nce_shared<D, false>();
    __shared__ ColumnInfo info;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16, warp = threadIdx.x / 32;
    const int c0 = blockIdx.x * NCE_TILE;
    load_split<D>(sh.ch, sh.cl, c_hi, c_lo, c0);
    load_columns(info, c_user, c_row, log_q, c0, nc);
    FragC acc[D / 32];
    zero_all<D / 32>(acc);
    const int r0 = 16 * (warp / 2), d0 = (D / 2) * (warp % 2);
    for (int first = 0; first < nq; first += NCE_TILE) {
        __syncthreads();
        load_split<D>(sh.qh, sh.ql, q_hi, q_lo, first);
        __syncthreads();
        score_tile<D>(sh);
        int row_user[4];
        float row_lse[4], row_g[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            row_terms(first + ty + 16 * i, nq, q_user, lse, g, row_user[i], row_lse[i], row_g[i]);
        __syncthreads();
        float s[4][4];
        read_scores(s, sh.s, inv_tau);
        mask_scores(s, row_user, info, ban, words, c0);
        __syncthreads();  // the probabilities overwrite the scores
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                store_prob(sh, tx + 16 * j, ty + 16 * i, row_g[i] * prob(s[i][j], row_lse[i]));
        __syncthreads();
        half_products<NCE_TILE, D / 2>(acc, sh.p + r0 * NCE_LDP, NCE_LDP, sh.qh + d0, LDH);
    }
    stage_grads<D>(sh, acc);
    const float scale = weights[1] * inv_tau / NCE_P_SCALE;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i, c = c0 + r;
        if (c >= nc || c_user[c] < 0) continue;  // past the last column, or padding
        float* out = d_items + (index_t)c_row[c] * D;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) {
            const int k = tx + 16 * j;
            out[k] += scale * sh.grads[r * NceShared<D>::LDG + k];
        }
    }
}

// Pass 2, one block per user: its queries q (NCE_CHUNK at a time) against its own columns k, with
// σ_qk = σ(N_q − s_qk) and w_qk = σ_qk·w (weights = {1/P, w = S/P}):
//     loss_part[user] = Σ softplus(N_q − s_qk) / P,   g[q] = Σ_k σ_qk,
//     d_users[q] = (w·g_q·O_q − Σ_k w_qk·v_k) / τ  (∂L/∂u: the negatives' part from infonce_lse_dq's O),
//     d_items[k] = −Σ_q w_qk·q̃_q  (the positives' part of ∂L/∂v)
// The inner products are short (at most NCE_MAX_TARGETS by d), so they read the embeddings from memory
// (the cache holds a user's rows) rather than staging them, in plain fp32. blockDim.x is a multiple of 32.
extern "C" __global__ void infonce_pos(float* __restrict__ d_users, float* __restrict__ d_items, float* __restrict__ g,
                                       float* __restrict__ loss_part, const float* __restrict__ users,
                                       const float* __restrict__ items, const float* __restrict__ log_q,
                                       const int* __restrict__ q_row, const int* __restrict__ c_row,
                                       const int* __restrict__ q_start, const int* __restrict__ c_start,
                                       const float* __restrict__ lse, const float* __restrict__ o,
                                       const float* __restrict__ weights, int d, float inv_tau) {
    __shared__ float sig[NCE_CHUNK][NCE_MAX_TARGETS];
    __shared__ float chunk_g[NCE_CHUNK];
    __shared__ float scratch[32];
    const int user = blockIdx.x;
    const int q0 = q_start[user], q1 = q_start[user + 1];
    const int k0 = c_start[user], nt = c_start[user + 1] - k0;
    const float inv_pairs = weights[0], w = weights[1];
    float loss = 0.0f;
    for (int j0 = q0; j0 < q1; j0 += NCE_CHUNK) {
        const int nj = min(NCE_CHUNK, q1 - j0);
        for (int e = threadIdx.x; e < nj * nt; e += blockDim.x) {
            const int j = e / nt, k = e % nt;
            const float* u = users + (index_t)q_row[j0 + j] * d;
            const float* v = items + (index_t)c_row[k0 + k] * d;
            float s = 0.0f;
            for (int x = 0; x < d; ++x) s = fmaf(u[x] * inv_tau, v[x], s);
            if (log_q != nullptr) s -= log_q[c_row[k0 + k]];
            const float z = lse[j0 + j] - s;
            loss += softplus(z);
            sig[j][k] = sigmoid(z);
        }
        __syncthreads();
        for (int j = threadIdx.x; j < nj; j += blockDim.x) {
            float total = 0.0f;
            for (int k = 0; k < nt; ++k) total += sig[j][k];
            chunk_g[j] = g[j0 + j] = total;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < nj * d; e += blockDim.x) {
            const int j = e / d, x = e % d;
            float acc = 0.0f;
            for (int k = 0; k < nt; ++k) acc = fmaf(sig[j][k] * w, items[(index_t)c_row[k0 + k] * d + x], acc);
            const float negatives = w * chunk_g[j] * o[(index_t)(j0 + j) * d + x];
            d_users[(index_t)q_row[j0 + j] * d + x] = (negatives - acc) * inv_tau;
        }
        for (int e = threadIdx.x; e < nt * d; e += blockDim.x) {
            const int k = e / d, x = e % d;
            float acc = 0.0f;
            for (int j = 0; j < nj; ++j)
                acc = fmaf(sig[j][k] * w, users[(index_t)q_row[j0 + j] * d + x] * inv_tau, acc);
            float* out = d_items + (index_t)c_row[k0 + k] * d + x;
            *out = (j0 == q0 ? 0.0f : *out) - acc;
        }
        __syncthreads();  // sig and chunk_g are rewritten by the next chunk
    }
    loss = block_sum(loss, scratch);
    if (threadIdx.x == 0) loss_part[user] = loss * inv_pairs;
}

// The entry points, per embedding width (d_out).

extern "C" __global__ void __launch_bounds__(NCE_THREADS, NCE_MIN_BLOCKS)
    infonce_lse_dq_d32(float* lse, float* o, const f16* q_hi, const f16* q_lo, const f16* c_hi, const f16* c_lo,
                       const float* log_q, const int* q_user, const int* c_row, const int* c_user,
                       const unsigned* ban, int nq, int nc, int words, float inv_tau) {
    lse_dq_impl<32>(lse, o, q_hi, q_lo, c_hi, c_lo, log_q, q_user, c_row, c_user, ban, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS, NCE_MIN_BLOCKS)
    infonce_dc_d32(float* d_items, const f16* q_hi, const f16* q_lo, const f16* c_hi, const f16* c_lo,
                   const float* log_q, const int* q_user, const int* c_row, const int* c_user, const unsigned* ban,
                   const float* lse, const float* g, const float* weights, int nq, int nc, int words, float inv_tau) {
    dc_impl<32>(d_items, q_hi, q_lo, c_hi, c_lo, log_q, q_user, c_row, c_user, ban, lse, g, weights, nq, nc, words,
                inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS, NCE_MIN_BLOCKS)
    infonce_lse_dq_d64(float* lse, float* o, const f16* q_hi, const f16* q_lo, const f16* c_hi, const f16* c_lo,
                       const float* log_q, const int* q_user, const int* c_row, const int* c_user,
                       const unsigned* ban, int nq, int nc, int words, float inv_tau) {
    lse_dq_impl<64>(lse, o, q_hi, q_lo, c_hi, c_lo, log_q, q_user, c_row, c_user, ban, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS, NCE_MIN_BLOCKS)
    infonce_dc_d64(float* d_items, const f16* q_hi, const f16* q_lo, const f16* c_hi, const f16* c_lo,
                   const float* log_q, const int* q_user, const int* c_row, const int* c_user, const unsigned* ban,
                   const float* lse, const float* g, const float* weights, int nq, int nc, int words, float inv_tau) {
    dc_impl<64>(d_items, q_hi, q_lo, c_hi, c_lo, log_q, q_user, c_row, c_user, ban, lse, g, weights, nq, nc, words,
                inv_tau);
}
