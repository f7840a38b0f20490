// Masked multi-head attention of the PCH model (SPEC §3), forward and backward, head size 64:
//   out = softmax(q·kᵀ / √64 + mask) · v   per (sequence, head),   fp16 in and out, fp32 softmax and sums.
//
// Layout: sequences packed without padding (sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1]), every
// tensor row-major as the GEMMs around the attention write and read it, so nothing is permuted between
// them. q, k and v are read in place from a QKV projection (rows ld_qkv halves apart; Q, K and V at
// columns 0, d and 2·d, d = heads·64, head h at column h·64 of each), and the fp32 QKV bias is added as a
// tile is loaded, rounded as a separate bias add would round it (fp16(x + b)), so the stored projection
// stays bias-free. out and dout hold head h at column h·64 of their rows (ld_out, ld_dout apart); dq, dk
// and dv are written into a dQKV buffer laid out as the projection (ld_dqkv), which the weight-gradient
// GEMMs read as it is. lse and delta (one fp32 per row and head) keep the head-major order of
// src/cpu/masked_attention.rs, entry start_b·heads + h·n_b + i: a step's 32 queries of one head are then 32
// consecutive floats. A packed batch has no padded rows: the padding mask is the sequence length, and
// nothing is computed or written past it, nor in any column outside the heads.
//
// Causal mask (the user tower, and the item tower's Variant 1) — flash-attention style, in three kernels,
// one block per (64-row tile of a sequence, head), tiles built on the host (ops.rs attention_tiles),
// grid = (tiles, heads); a tile whose sequence is −1 is empty and its blocks return at once (a training step
// replayed from a CUDA graph launches its shape bucket's largest tile count); four warps own 16 rows each
// and walk the other side in steps of 32 rows with the products on tensor cores (wmma, sm_70) and the
// element-wise softmax work on fp32 tiles in shared memory (a wmma accumulator's element-to-register
// mapping is unspecified):
//   fwd:  per query tile, an online softmax over the keys 0 .. its last row; keeps lse = log Σ e^(s/8) per
//         row for the backward (the probabilities are never stored).
//   dq:   per query tile: delta = rowsum(dout ∘ out) (written for dkdv), then over the same keys,
//         P = e^(s/8 − lse), dS = P ∘ (dout·vᵀ − delta) / 8, dq = dS·k.
//   dkdv: per key tile, over the queries from its first row to n: the same P and dS, dv = Pᵀ·dout,
//         dk = dSᵀ·q. With the warp owning keys, every product is warp-local (Sᵀ = k·qᵀ row by row).
// Two kernels instead of one with dq atomics: no floating-point atomics, so a step repeats bit for bit; the
// price is computing S and dP twice.
//
// Diagonal mask (`--item-tower self`, single items): each row's only key is itself, so p = 1 exactly and
// out = v (with its bias), dv = dout, dq = dk = 0 exactly, as in the CPU reference: one copy kernel, no lse.
#include "common.cuh"

#define MA_HD 64
#define MA_BM 64  // rows of a block's own tile: queries (fwd, dq) or keys (dkdv), 16 per warp
#define MA_BN 32  // rows of the other side per step
#define MA_THREADS 128
#define MA_LDH (MA_HD + 8)  // fp16 rows of 64 (padded 16 bytes: a fragment's rows start in different banks)
#define MA_LDS (MA_BN + 4)  // fp32 score rows
#define MA_LDP (MA_BN + 8)  // fp16 probability rows
#define MA_LDO (MA_HD + 4)  // fp32 rows of 64
#define MA_LN2 0.6931471805599453f
#define MA_LOG2E 1.4426950408889634f

// Where a block's tile lies: its sequence's length n (−1 for an empty tile), the first row of the tile within
// it, the head's first column (h·64), the sequence's first packed row, and the (sequence, head)'s first
// entry of lse and delta.
struct MaTile {
    int n, row0, col;
    index_t start, stat;
};

__device__ __forceinline__ MaTile ma_tile(const int* __restrict__ cu_seqlens, const int2* __restrict__ tiles,
                                          int heads) {
    const int2 tile = tiles[blockIdx.x];
    if (tile.x < 0) return MaTile{-1, 0, 0, 0, 0};
    const int start = cu_seqlens[tile.x];
    const int n = cu_seqlens[tile.x + 1] - start;
    const int h = blockIdx.y;
    return MaTile{n, tile.y, h * MA_HD, start, (index_t)start * heads + (index_t)h * n};
}

// Rows row0 .. row0 + ROWS of one head of Q, K or V (`src`: the head's first column in the sequence's first
// row, rows `ld` halves apart) into shared memory, fp16(x + bias[c]) when a bias (the head's 64 floats) is
// given. Rows at or past n are zeros, as load_tile leaves them.
template <int ROWS>
__device__ __forceinline__ void load_head(f16* dst, const f16* __restrict__ src, int ld, const float* __restrict__ bias,
                                          int row0, int n) {
    if (!bias) {
        load_tile<ROWS, MA_HD>(dst, MA_LDH, src, ld, row0, n);
        return;
    }
    constexpr int CHUNKS = MA_HD / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += blockDim.x) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (row0 + r < n) {
            float b[8];
            load8_f16(src + (index_t)(row0 + r) * ld + c, v);
            load8_f32(bias + c, b);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] += b[e];
        }
        store8_f16(dst + r * MA_LDH + c, v);
    }
}

// Part `part` (0 Q, 1 K, 2 V) of a QKV projection or its bias at head column `col`: null stays null.
template <class T>
__device__ __forceinline__ const T* qkv_part(const T* base, int part, int d, int col) {
    return base ? base + part * d + col : nullptr;
}

// dst (16 × cols fp32, leading dimension ldd) = a (16 rows of 64 halves, lda) · bᵀ (cols rows of 64, ldb).
template <int COLS>
__device__ __forceinline__ void rows_times_rows_t(float* dst, int ldd, const f16* a, int lda, const f16* b, int ldb) {
#pragma unroll
    for (int j = 0; j < COLS / 16; ++j) {
        FragC s;
        zero_c(s);
#pragma unroll
        for (int kk = 0; kk < MA_HD / 16; ++kk) {
            FragA fa;
            FragB fb;
            load_a_row(fa, a + kk * 16, lda);
            load_b_col(fb, b + j * 16 * ldb + kk * 16, ldb);
            mma_row_col(s, fa, fb);
        }
        store_d_row(dst + j * 16, s, ldd);
    }
}

// acc[j] += a (16 × 32 halves, lda) · b (32 rows of 64 halves, ldb), columns j·16 .. j·16 + 15.
__device__ __forceinline__ void accumulate(FragC acc[MA_HD / 16], const f16* a, int lda, const f16* b, int ldb) {
#pragma unroll
    for (int j = 0; j < MA_HD / 16; ++j) {
#pragma unroll
        for (int kk = 0; kk < MA_BN / 16; ++kk) {
            FragA fa;
            FragB fb;
            load_a_row(fa, a + kk * 16, lda);
            load_b_row(fb, b + kk * 16 * ldb + j * 16, ldb);
            mma_row_row(acc[j], fa, fb);
        }
    }
}

// Writes a warp's 16 accumulated rows to rows row0 + warp·16 .. of `dst` (rows `ld` halves apart), those
// below n, through the warp's rows of the fp32 staging tile.
__device__ __forceinline__ void store_rows(f16* __restrict__ dst, int ld, float* stage, const FragC acc[MA_HD / 16],
                                           int row0, int n) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* own = stage + warp * 16 * MA_LDO;
#pragma unroll
    for (int j = 0; j < MA_HD / 16; ++j) store_d_row(own + j * 16, acc[j], MA_LDO);
    __syncwarp();
    // Two lanes per row, 32 columns each, 8 at a time.
    const int r = lane >> 1, row = row0 + warp * 16 + r;
    if (row < n) {
        for (int c = (lane & 1) * 32; c < (lane & 1) * 32 + 32; c += 8) {
            float v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = own[r * MA_LDO + c + e];
            store8_f16(dst + (index_t)row * ld + c, v);
        }
    }
    __syncwarp();
}

// Forward shared memory: the Q tile, whose bytes hold the step's scores once Q is in registers, then the
// probabilities, K and V steps, the fp32 output tile, and the running maximum and sum per row.
#define MAF_Q_BYTES (MA_BM * MA_LDH * 2)
#define MAF_P_OFF MAF_Q_BYTES
#define MAF_K_OFF (MAF_P_OFF + MA_BM * MA_LDP * 2)
#define MAF_V_OFF (MAF_K_OFF + MA_BN * MA_LDH * 2)
#define MAF_O_OFF (MAF_V_OFF + MA_BN * MA_LDH * 2)
#define MAF_M_OFF (MAF_O_OFF + MA_BM * MA_LDO * 4)
#define MAF_BYTES (MAF_M_OFF + 2 * MA_BM * 4)

extern "C" __global__ void __launch_bounds__(MA_THREADS)
    masked_attention_fwd(f16* __restrict__ out, int ld_out, float* __restrict__ lse, const f16* __restrict__ qkv,
                         int ld_qkv, const float* __restrict__ bias, const int* __restrict__ cu_seqlens,
                         const int2* __restrict__ tiles, int heads, float scale_log2) {
    static_assert(MA_BM * MA_LDS * 4 <= MAF_Q_BYTES, "the scores fit in the Q tile's bytes");
    __shared__ __align__(128) unsigned char smem[MAF_BYTES];
    f16* sQ = reinterpret_cast<f16*>(smem);
    float* sS = reinterpret_cast<float*>(smem);
    f16* sP = reinterpret_cast<f16*>(smem + MAF_P_OFF);
    f16* sK = reinterpret_cast<f16*>(smem + MAF_K_OFF);
    f16* sV = reinterpret_cast<f16*>(smem + MAF_V_OFF);
    float* sO = reinterpret_cast<float*>(smem + MAF_O_OFF);
    float* sM = reinterpret_cast<float*>(smem + MAF_M_OFF);
    float* sL = sM + MA_BM;

    const MaTile t = ma_tile(cu_seqlens, tiles, heads);
    if (t.n < 0) return;  // an empty tile: the whole block leaves before any barrier
    const int n = t.n, q0 = t.row0, d = heads * MA_HD;
    const f16* rows = qkv + t.start * ld_qkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float neg_inf = __int_as_float(0xff800000);

    load_head<MA_BM>(sQ, qkv_part(rows, 0, d, t.col), ld_qkv, qkv_part(bias, 0, d, t.col), q0, n);
    for (int i = threadIdx.x; i < MA_BM * MA_LDO; i += blockDim.x) sO[i] = 0.0f;
    for (int i = threadIdx.x; i < MA_BM; i += blockDim.x) {
        sM[i] = neg_inf;
        sL[i] = 0.0f;
    }
    __syncthreads();
    FragA qa[MA_HD / 16];
#pragma unroll
    for (int kk = 0; kk < MA_HD / 16; ++kk) load_a_row(qa[kk], sQ + warp * 16 * MA_LDH + kk * 16, MA_LDH);
    __syncthreads();  // every warp holds its Q rows: the tile's bytes become the scores

    const int kv_end = min(n, q0 + MA_BM);
    const int warp_last = q0 + warp * 16 + 15;
    const int r = lane >> 1, part = lane & 1;  // two lanes per query row in the softmax
    const int row = warp * 16 + r, qi = q0 + row;
    float* srow = sS + row * MA_LDS;
    float* orow = sO + row * MA_LDO;
    for (int k0 = 0; k0 < kv_end; k0 += MA_BN) {
        load_head<MA_BN>(sK, qkv_part(rows, 1, d, t.col), ld_qkv, qkv_part(bias, 1, d, t.col), k0, n);
        load_head<MA_BN>(sV, qkv_part(rows, 2, d, t.col), ld_qkv, qkv_part(bias, 2, d, t.col), k0, n);
        __syncthreads();
        // Warp-uniform: a step whose keys all lie after the warp's last row changes none of its rows. Step 0
        // holds key 0, which every row sees, so each row's maximum is finite from then on.
        if (k0 <= warp_last) {
#pragma unroll
            for (int j = 0; j < MA_BN / 16; ++j) {
                FragC s;
                zero_c(s);
#pragma unroll
                for (int kk = 0; kk < MA_HD / 16; ++kk) {
                    FragB kb;
                    load_b_col(kb, sK + j * 16 * MA_LDH + kk * 16, MA_LDH);
                    mma_row_col(s, qa[kk], kb);
                }
                store_d_row(sS + warp * 16 * MA_LDS + j * 16, s, MA_LDS);
            }
            __syncwarp();
            float mx = neg_inf;
            for (int c = part; c < MA_BN; c += 2) {
                const int kj = k0 + c;
                const float s = (kj <= qi && kj < n) ? srow[c] * scale_log2 : neg_inf;
                srow[c] = s;
                mx = fmaxf(mx, s);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_old = sM[row];
            const float m_new = fmaxf(m_old, mx);
            const float alpha = exp2f(m_old - m_new);
            float sum = 0.0f;
            for (int c = part; c < MA_BN; c += 2) {
                const float p = exp2f(srow[c] - m_new);
                sum += p;
                sP[row * MA_LDP + c] = f32_to_f16(p);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            __syncwarp();  // both lanes of a row have read m_old before one of them replaces it
            if (part == 0) {
                sM[row] = m_new;
                sL[row] = sL[row] * alpha + sum;
            }
            for (int c = part; c < MA_HD; c += 2) orow[c] *= alpha;
            __syncwarp();  // P and the rescaled O rows are in place before the tensor cores read them
#pragma unroll
            for (int j = 0; j < MA_HD / 16; ++j) {
                FragC o;
                load_c_row(o, sO + warp * 16 * MA_LDO + j * 16, MA_LDO);
#pragma unroll
                for (int kk = 0; kk < MA_BN / 16; ++kk) {
                    FragA pa;
                    FragB vb;
                    load_a_row(pa, sP + warp * 16 * MA_LDP + kk * 16, MA_LDP);
                    load_b_row(vb, sV + kk * 16 * MA_LDH + j * 16, MA_LDH);
                    mma_row_row(o, pa, vb);
                }
                store_d_row(sO + warp * 16 * MA_LDO + j * 16, o, MA_LDO);
            }
        }
        __syncthreads();  // every warp is done with this step's K and V before the next step replaces them
    }
    if (qi < n) {
        const float inv_l = 1.0f / sL[row];
        f16* dst = out + (t.start + qi) * ld_out + t.col;
        for (int c = part * 8; c < MA_HD; c += 16) {
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) o[e] = orow[c + e] * inv_l;
            store8_f16(dst + c, o);
        }
        // sM is in log2 units of the scaled score: lse = ln 2 · (m + log2 l).
        if (part == 0) lse[t.stat + qi] = MA_LN2 * (sM[row] + log2f(sL[row]));
    }
}

// dq shared memory: the Q and dout tiles (their bytes are the fp32 staging of dq at the end), a K and V
// step, the step's fp32 scores (then dP), dS, and lse (log2 units) and delta per row.
#define MAQ_Q_OFF 0
#define MAQ_DO_OFF (MA_BM * MA_LDH * 2)
#define MAQ_K_OFF (2 * MA_BM * MA_LDH * 2)
#define MAQ_V_OFF (MAQ_K_OFF + MA_BN * MA_LDH * 2)
#define MAQ_S_OFF (MAQ_V_OFF + MA_BN * MA_LDH * 2)
#define MAQ_DS_OFF (MAQ_S_OFF + MA_BM * MA_LDS * 4)
#define MAQ_LSE_OFF (MAQ_DS_OFF + MA_BM * MA_LDP * 2)
#define MAQ_BYTES (MAQ_LSE_OFF + 2 * MA_BM * 4)

extern "C" __global__ void __launch_bounds__(MA_THREADS)
    masked_attention_bwd_dq(f16* __restrict__ dqkv, int ld_dqkv, float* __restrict__ delta,
                            const f16* __restrict__ dout, int ld_dout, const f16* __restrict__ out, int ld_out,
                            const f16* __restrict__ qkv, int ld_qkv, const float* __restrict__ bias,
                            const float* __restrict__ lse, const int* __restrict__ cu_seqlens,
                            const int2* __restrict__ tiles, int heads, float scale_log2, float scale) {
    static_assert(MA_BM * MA_LDO * 4 <= MAQ_K_OFF, "the dq staging fits in the Q and dout tiles' bytes");
    __shared__ __align__(128) unsigned char smem[MAQ_BYTES];
    f16* sQ = reinterpret_cast<f16*>(smem + MAQ_Q_OFF);
    f16* sDO = reinterpret_cast<f16*>(smem + MAQ_DO_OFF);
    f16* sK = reinterpret_cast<f16*>(smem + MAQ_K_OFF);
    f16* sV = reinterpret_cast<f16*>(smem + MAQ_V_OFF);
    float* sS = reinterpret_cast<float*>(smem + MAQ_S_OFF);
    f16* sDS = reinterpret_cast<f16*>(smem + MAQ_DS_OFF);
    float* sLse = reinterpret_cast<float*>(smem + MAQ_LSE_OFF);
    float* sD = sLse + MA_BM;

    const MaTile t = ma_tile(cu_seqlens, tiles, heads);
    if (t.n < 0) return;  // an empty tile: the whole block leaves before any barrier
    const int n = t.n, q0 = t.row0, d = heads * MA_HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 1, part = lane & 1;  // two lanes per query row
    const int row = warp * 16 + r, qi = q0 + row;
    const f16* rows = qkv + t.start * ld_qkv;
    const f16* dout_rows = dout + t.start * ld_dout + t.col;

    load_head<MA_BM>(sQ, qkv_part(rows, 0, d, t.col), ld_qkv, qkv_part(bias, 0, d, t.col), q0, n);
    load_tile<MA_BM, MA_HD>(sDO, MA_LDH, dout_rows, ld_dout, q0, n);
    // delta = dout · out per row, fp32; the two lanes of a row take 32 columns each.
    float dsum = 0.0f;
    if (qi < n) {
        const f16* o_row = out + (t.start + qi) * ld_out + t.col;
        const f16* g_row = dout_rows + (index_t)qi * ld_dout;
        for (int c = part * 32; c < part * 32 + 32; c += 8) {
            float o[8], g[8];
            load8_f16(o_row + c, o);
            load8_f16(g_row + c, g);
#pragma unroll
            for (int e = 0; e < 8; ++e) dsum += o[e] * g[e];
        }
    }
    dsum += __shfl_xor_sync(0xffffffffu, dsum, 1);
    if (part == 0) {
        sD[row] = dsum;
        sLse[row] = qi < n ? lse[t.stat + qi] * MA_LOG2E : 0.0f;
        if (qi < n) delta[t.stat + qi] = dsum;
    }

    FragC acc[MA_HD / 16];
#pragma unroll
    for (int j = 0; j < MA_HD / 16; ++j) zero_c(acc[j]);
    const int kv_end = min(n, q0 + MA_BM);
    const int warp_last = q0 + warp * 16 + 15;
    float* srow = sS + row * MA_LDS;
    for (int k0 = 0; k0 < kv_end; k0 += MA_BN) {
        load_head<MA_BN>(sK, qkv_part(rows, 1, d, t.col), ld_qkv, qkv_part(bias, 1, d, t.col), k0, n);
        load_head<MA_BN>(sV, qkv_part(rows, 2, d, t.col), ld_qkv, qkv_part(bias, 2, d, t.col), k0, n);
        __syncthreads();
        if (k0 <= warp_last) {  // warp-uniform: later keys are masked for all of the warp's rows
            rows_times_rows_t<MA_BN>(sS + warp * 16 * MA_LDS, MA_LDS, sQ + warp * 16 * MA_LDH, MA_LDH, sK, MA_LDH);
            __syncwarp();
            float p[MA_BN / 2];
#pragma unroll
            for (int e = 0; e < MA_BN / 2; ++e) {
                const int kj = k0 + part + 2 * e;
                p[e] = (kj <= qi && kj < n && qi < n) ? exp2f(srow[part + 2 * e] * scale_log2 - sLse[row]) : 0.0f;
            }
            __syncwarp();  // the scores are read before dP replaces them
            rows_times_rows_t<MA_BN>(sS + warp * 16 * MA_LDS, MA_LDS, sDO + warp * 16 * MA_LDH, MA_LDH, sV, MA_LDH);
            __syncwarp();
#pragma unroll
            for (int e = 0; e < MA_BN / 2; ++e) {
                const int c = part + 2 * e;
                sDS[row * MA_LDP + c] = f32_to_f16(p[e] * (srow[c] - sD[row]) * scale);
            }
            __syncwarp();
            accumulate(acc, sDS + warp * 16 * MA_LDP, MA_LDP, sK, MA_LDH);
        }
        __syncthreads();  // every warp is done with this step's K and V before the next step replaces them
    }
    store_rows(dqkv + t.start * ld_dqkv + t.col, ld_dqkv, reinterpret_cast<float*>(smem), acc, q0, n);
}

// dkdv shared memory: the block's K and V tiles, a Q and dout step (their bytes and the scores' are the fp32
// staging of dk and dv at the end), the step's fp32 scores (then dP), P and dS, and lse (log2 units) and
// delta per query of the step.
#define MAK_K_OFF 0
#define MAK_V_OFF (MA_BM * MA_LDH * 2)
#define MAK_Q_OFF (2 * MA_BM * MA_LDH * 2)
#define MAK_DO_OFF (MAK_Q_OFF + MA_BN * MA_LDH * 2)
#define MAK_S_OFF (MAK_DO_OFF + MA_BN * MA_LDH * 2)
#define MAK_P_OFF (MAK_S_OFF + MA_BM * MA_LDS * 4)
#define MAK_DS_OFF (MAK_P_OFF + MA_BM * MA_LDP * 2)
#define MAK_LSE_OFF (MAK_DS_OFF + MA_BM * MA_LDP * 2)
#define MAK_BYTES (MAK_LSE_OFF + 2 * MA_BN * 4)

extern "C" __global__ void __launch_bounds__(MA_THREADS)
    masked_attention_bwd_dkdv(f16* __restrict__ dqkv, int ld_dqkv, const f16* __restrict__ dout, int ld_dout,
                              const f16* __restrict__ qkv, int ld_qkv, const float* __restrict__ bias,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              const int* __restrict__ cu_seqlens, const int2* __restrict__ tiles, int heads,
                              float scale_log2, float scale) {
    static_assert(MA_BM * MA_LDO * 4 <= MAK_P_OFF - MAK_Q_OFF, "the dk/dv staging fits past the K and V tiles");
    __shared__ __align__(128) unsigned char smem[MAK_BYTES];
    f16* sK = reinterpret_cast<f16*>(smem + MAK_K_OFF);
    f16* sV = reinterpret_cast<f16*>(smem + MAK_V_OFF);
    f16* sQ = reinterpret_cast<f16*>(smem + MAK_Q_OFF);
    f16* sDO = reinterpret_cast<f16*>(smem + MAK_DO_OFF);
    float* sS = reinterpret_cast<float*>(smem + MAK_S_OFF);
    f16* sP = reinterpret_cast<f16*>(smem + MAK_P_OFF);
    f16* sDS = reinterpret_cast<f16*>(smem + MAK_DS_OFF);
    float* sLse = reinterpret_cast<float*>(smem + MAK_LSE_OFF);
    float* sD = sLse + MA_BN;

    const MaTile t = ma_tile(cu_seqlens, tiles, heads);
    if (t.n < 0) return;  // an empty tile: the whole block leaves before any barrier
    const int n = t.n, k0 = t.row0, d = heads * MA_HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = lane >> 1, part = lane & 1;  // two lanes per key row
    const int row = warp * 16 + r, kj = k0 + row;
    const f16* rows = qkv + t.start * ld_qkv;
    const f16* dout_rows = dout + t.start * ld_dout + t.col;

    load_head<MA_BM>(sK, qkv_part(rows, 1, d, t.col), ld_qkv, qkv_part(bias, 1, d, t.col), k0, n);
    load_head<MA_BM>(sV, qkv_part(rows, 2, d, t.col), ld_qkv, qkv_part(bias, 2, d, t.col), k0, n);
    FragC dk_acc[MA_HD / 16], dv_acc[MA_HD / 16];
#pragma unroll
    for (int j = 0; j < MA_HD / 16; ++j) {
        zero_c(dk_acc[j]);
        zero_c(dv_acc[j]);
    }
    const int warp_first = k0 + warp * 16;
    float* srow = sS + row * MA_LDS;
    // Queries before the tile's first key see none of its keys.
    for (int q0 = k0; q0 < n; q0 += MA_BN) {
        load_head<MA_BN>(sQ, qkv_part(rows, 0, d, t.col), ld_qkv, qkv_part(bias, 0, d, t.col), q0, n);
        load_tile<MA_BN, MA_HD>(sDO, MA_LDH, dout_rows, ld_dout, q0, n);
        for (int i = threadIdx.x; i < MA_BN; i += blockDim.x) {
            const bool valid = q0 + i < n;
            sLse[i] = valid ? lse[t.stat + q0 + i] * MA_LOG2E : 0.0f;
            sD[i] = valid ? delta[t.stat + q0 + i] : 0.0f;
        }
        __syncthreads();
        if (warp_first < q0 + MA_BN) {  // warp-uniform: otherwise every query of the step precedes its keys
            // Sᵀ (keys × queries) for the warp's keys.
            rows_times_rows_t<MA_BN>(sS + warp * 16 * MA_LDS, MA_LDS, sK + warp * 16 * MA_LDH, MA_LDH, sQ, MA_LDH);
            __syncwarp();
            float p[MA_BN / 2];
#pragma unroll
            for (int e = 0; e < MA_BN / 2; ++e) {
                const int c = part + 2 * e, qi = q0 + c;
                p[e] = (kj <= qi && qi < n && kj < n) ? exp2f(srow[c] * scale_log2 - sLse[c]) : 0.0f;
                sP[row * MA_LDP + c] = f32_to_f16(p[e]);
            }
            __syncwarp();  // the scores are read before dPᵀ replaces them
            rows_times_rows_t<MA_BN>(sS + warp * 16 * MA_LDS, MA_LDS, sV + warp * 16 * MA_LDH, MA_LDH, sDO, MA_LDH);
            __syncwarp();
#pragma unroll
            for (int e = 0; e < MA_BN / 2; ++e) {
                const int c = part + 2 * e;
                sDS[row * MA_LDP + c] = f32_to_f16(p[e] * (srow[c] - sD[c]) * scale);
            }
            __syncwarp();
            accumulate(dv_acc, sP + warp * 16 * MA_LDP, MA_LDP, sDO, MA_LDH);
            accumulate(dk_acc, sDS + warp * 16 * MA_LDP, MA_LDP, sQ, MA_LDH);
        }
        __syncthreads();  // every warp is done with this step's Q and dout before the next step replaces them
    }
    float* stage = reinterpret_cast<float*>(smem + MAK_Q_OFF);
    f16* head = dqkv + t.start * ld_dqkv + t.col;  // the head's dq columns; its dk and dv lie d and 2·d on
    store_rows(head + 2 * d, ld_dqkv, stage, dv_acc, k0, n);
    store_rows(head + d, ld_dqkv, stage, dk_acc, k0, n);
}

// Diagonal mask over `rows` rows of `width` halves (a multiple of 8): dst = src (+ bias, rounded as the
// causal kernels round it) — out = v forward, dv = dout backward — and, when given, zero1 = zero2 = 0 (dq
// and dk backward). dst, zero1 and zero2 are rows ld_dst halves apart, src rows ld_src apart.
extern "C" __global__ void masked_attention_diag(f16* __restrict__ dst, f16* __restrict__ zero1,
                                                 f16* __restrict__ zero2, int ld_dst, const f16* __restrict__ src,
                                                 int ld_src, const float* __restrict__ bias, int rows, int width) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    const int chunks = width / 8;
    const index_t total = (index_t)rows * chunks;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < total; i += (index_t)gridDim.x * blockDim.x) {
        const index_t r = i / chunks;
        const int c = (int)(i % chunks) * 8;
        const index_t at = r * ld_dst + c;
        const f16* from = src + r * ld_src + c;
        if (bias) {
            float v[8], b[8];
            load8_f16(from, v);
            load8_f32(bias + c, b);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] += b[e];
            store8_f16(dst + at, v);
        } else {
            *reinterpret_cast<uint4*>(dst + at) = *reinterpret_cast<const uint4*>(from);
        }
        if (zero1) *reinterpret_cast<uint4*>(zero1 + at) = z;
        if (zero2) *reinterpret_cast<uint4*>(zero2 + at) = z;
    }
}
