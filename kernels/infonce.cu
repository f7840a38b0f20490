// The dense all-action InfoNCE loss of SPEC §4.2, fused, loss and gradients, as src/cpu/infonce.rs computes
// it (the derivation is there). Queries are the valid history positions (or the last one per user),
// columns the valid targets, both numbered user by user by the host (src/cuda/infonce.rs), which also
// gives each user a bitmask of the columns that are its false negatives. With q̃ = u/τ and
// s_qc = q̃·v_c − log q_c (the shift only when given):
//
//     infonce_lse      N_q = log Σ exp s_qc over q's negatives            (column tiles streamed, online)
//     infonce_pos      one block per user: its positive pairs, l = softplus(N_q − s_qk), the loss,
//                      g_q = Σ_k σ(N_q − s_qk)/P, and the positive parts of ∂L/∂q̃ and ∂L/∂v
//     infonce_dq       ∂L/∂q̃ += Σ_c g_q·exp(s_qc − N_q)·v_c, then ∂L/∂u = ∂L/∂q̃ / τ
//     infonce_dc       ∂L/∂v_c += Σ_q g_q·exp(s_qc − N_q)·q̃_q
//
// No [queries × columns] matrix exists anywhere: each block holds one 64 × 64 score tile in registers (and
// in shared memory for the gradient products) and recomputes it where it needs it, as flash attention
// does. Every sum has a fixed order and nothing is atomic, so the results repeat bit for bit.
//
// The gradients may carry a loss scale S (mixed-precision training): infonce_pos weighs the pairs by S/P
// instead of 1/P, and every gradient flows from those weights. With S a power of two the scaled gradients
// are the unscaled ones times S exactly; the loss itself is never scaled. Both weights are read from device
// memory, so a CUDA graph that captured the launch replays it with the next update's scale and pair count.
//
// Padding: a query or column whose row (and user) is −1 is padding, as one past the last: it loads as
// zeros, is masked out of every score, and nothing is written for it. A training step padded to a shape
// bucket (src/cuda/trainer) so fills whole tiles, and its results are those of the unpadded batch exactly.
//
// Scores are fp32 products of the fp32 embeddings: with τ = 0.05 they reach ±20, where fp16 inputs would
// move the loss by about 1e-2. Tiles are 64 queries × 64 columns for 256 threads as 16 × 16; thread
// (ty, tx) owns rows ty + 16i and columns tx + 16j (i, j < 4). Rows of the tiles in shared memory are
// padded to D + 1 floats: the 16 threads of a half-warp then read 16 different banks.
#include "common.cuh"

#define NCE_TILE 64
#define NCE_THREADS 256
// Queries per pass of infonce_pos, and the most targets a user may have there.
#define NCE_CHUNK 32
#define NCE_MAX_TARGETS 256

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

// Rows first .. first+63 of `src` (row r of the tile is src row idx[first + r]; zero past `total` and for
// padding, idx −1), times `scale`, into dst with rows of D + 1. Consecutive threads read consecutive floats
// of a row.
template <int D>
__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ src, const int* __restrict__ idx,
                                          int first, int total, float scale) {
    for (int e = threadIdx.x; e < NCE_TILE * D; e += NCE_THREADS) {
        const int r = e / D, k = e % D;
        const int row = first + r < total ? idx[first + r] : -1;
        dst[r * (D + 1) + k] = row >= 0 ? src[(index_t)row * D + k] * scale : 0.0f;
    }
}

// The thread's 4 × 4 scores q̃·v of the tiles in shared memory.
template <int D>
__device__ __forceinline__ void tile_products(float s[4][4], const float* qs, const float* cs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
#pragma unroll 8
    for (int k = 0; k < D; ++k) {
        float q[4], c[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) q[i] = qs[(ty + 16 * i) * (D + 1) + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) c[j] = cs[(tx + 16 * j) * (D + 1) + k];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) s[i][j] = fmaf(q[i], c[j], s[i][j]);
    }
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

// Pass 1: lse[q] = N_q, the log-sum-exp of query q's negatives (−∞ when it has none), over column tiles
// with a running maximum per row so that no exponent overflows. One block per 64 queries.
template <int D>
__device__ void lse_impl(float* __restrict__ lse, const float* __restrict__ users, const float* __restrict__ items,
                         const float* __restrict__ log_q, const int* __restrict__ q_row,
                         const int* __restrict__ q_user, const int* __restrict__ c_row, const int* __restrict__ c_user,
                         const unsigned* __restrict__ ban, int nq, int nc, int words, float inv_tau) {
    DYNAMIC_SHARED(float, smem);
    float* qs = smem;
    float* cs = smem + NCE_TILE * (D + 1);
    __shared__ ColumnInfo info;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int first = blockIdx.x * NCE_TILE;
    load_tile<D>(qs, users, q_row, first, nq, inv_tau);
    int row_user[4];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = first + ty + 16 * i;
        row_user[i] = q < nq ? q_user[q] : -1;
        m[i] = neg_inf();
        l[i] = 0.0f;
    }
    for (int c0 = 0; c0 < nc; c0 += NCE_TILE) {
        __syncthreads();  // the previous tile's readers are done
        load_tile<D>(cs, items, c_row, c0, nc, 1.0f);
        load_columns(info, c_user, c_row, log_q, c0, nc);
        __syncthreads();
        float s[4][4];
        tile_products<D>(s, qs, cs);
        mask_scores(s, row_user, info, ban, words, c0);
        // Every lane of the warp takes both shuffles: the two half-warps hold different rows, and a full-mask
        // shuffle that one half skips is undefined (the emulator reports it).
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float top = half_max(fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3])));
            const float new_m = fmaxf(m[i], top);
            float part = 0.0f;
            if (top != neg_inf()) {
#pragma unroll
                for (int j = 0; j < 4; ++j) part += expf(s[i][j] - new_m);
            }
            const float tile_sum = half_sum(part);
            if (top != neg_inf()) {  // a tile without negatives for this row changes nothing
                l[i] = l[i] * expf(m[i] - new_m) + tile_sum;
                m[i] = new_m;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = first + ty + 16 * i;
        if (tx == 0 && q < nq) lse[q] = m[i] == neg_inf() ? neg_inf() : m[i] + logf(l[i]);
    }
}

// Pass 3 for one block of 64 queries: recompute each score tile, turn it into ∂L/∂s = g_q·exp(s − N_q)
// (0 for non-negatives), and add its product with the column tile into the block's ∂L/∂q̃; then add the
// positives' part (infonce_pos left it in d_users) and divide by τ.
template <int D>
__device__ void dq_impl(float* __restrict__ d_users, const float* __restrict__ users, const float* __restrict__ items,
                        const float* __restrict__ log_q, const int* __restrict__ q_row, const int* __restrict__ q_user,
                        const int* __restrict__ c_row, const int* __restrict__ c_user,
                        const unsigned* __restrict__ ban, const float* __restrict__ lse, const float* __restrict__ g,
                        int nq, int nc, int words, float inv_tau) {
    DYNAMIC_SHARED(float, smem);
    float* qs = smem;
    float* cs = qs + NCE_TILE * (D + 1);
    float* ps = cs + NCE_TILE * (D + 1);
    __shared__ ColumnInfo info;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int first = blockIdx.x * NCE_TILE;
    load_tile<D>(qs, users, q_row, first, nq, inv_tau);
    int row_user[4];
    float row_lse[4], row_g[4], acc[4][D / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = first + ty + 16 * i;
        row_user[i] = q < nq ? q_user[q] : -1;
        row_lse[i] = row_user[i] >= 0 ? lse[q] : neg_inf();
        row_g[i] = row_user[i] >= 0 ? g[q] : 0.0f;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) acc[i][j] = 0.0f;
    }
    for (int c0 = 0; c0 < nc; c0 += NCE_TILE) {
        __syncthreads();
        load_tile<D>(cs, items, c_row, c0, nc, 1.0f);
        load_columns(info, c_user, c_row, log_q, c0, nc);
        __syncthreads();
        float s[4][4];
        tile_products<D>(s, qs, cs);
        mask_scores(s, row_user, info, ban, words, c0);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                // g = 0 also covers N = −∞ (no negatives at all), where exp(s − N) would be ∞·0.
                const float p = s[i][j] == neg_inf() || row_g[i] == 0.0f ? 0.0f : row_g[i] * expf(s[i][j] - row_lse[i]);
                ps[(ty + 16 * i) * (NCE_TILE + 1) + tx + 16 * j] = p;
            }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < NCE_TILE; ++c) {
            float v[D / 16];
#pragma unroll
            for (int j = 0; j < D / 16; ++j) v[j] = cs[c * (D + 1) + tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = ps[(ty + 16 * i) * (NCE_TILE + 1) + c];
#pragma unroll
                for (int j = 0; j < D / 16; ++j) acc[i][j] = fmaf(p, v[j], acc[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (row_user[i] < 0) continue;  // past the last query, or padding
        float* out = d_users + (index_t)q_row[first + ty + 16 * i] * D;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) out[tx + 16 * j] = (out[tx + 16 * j] + acc[i][j]) * inv_tau;
    }
}

// Pass 4 for one block of 64 columns: over every tile of queries, recompute the scores and ∂L/∂s, and add
// their product with the (scaled) query tile into the block's ∂L/∂v, then into d_items, which holds the
// positives' part. Here thread (ty, tx) owns columns ty + 16i and elements tx + 16j of the result.
template <int D>
__device__ void dc_impl(float* __restrict__ d_items, const float* __restrict__ users, const float* __restrict__ items,
                        const float* __restrict__ log_q, const int* __restrict__ q_row, const int* __restrict__ q_user,
                        const int* __restrict__ c_row, const int* __restrict__ c_user,
                        const unsigned* __restrict__ ban, const float* __restrict__ lse, const float* __restrict__ g,
                        int nq, int nc, int words, float inv_tau) {
    DYNAMIC_SHARED(float, smem);
    float* qs = smem;
    float* cs = qs + NCE_TILE * (D + 1);
    float* ps = cs + NCE_TILE * (D + 1);
    __shared__ ColumnInfo info;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int c0 = blockIdx.x * NCE_TILE;
    load_tile<D>(cs, items, c_row, c0, nc, 1.0f);
    load_columns(info, c_user, c_row, log_q, c0, nc);
    float acc[4][D / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < D / 16; ++j) acc[i][j] = 0.0f;
    for (int first = 0; first < nq; first += NCE_TILE) {
        __syncthreads();
        load_tile<D>(qs, users, q_row, first, nq, inv_tau);
        __syncthreads();
        int row_user[4];
        float row_lse[4], row_g[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int q = first + ty + 16 * i;
            row_user[i] = q < nq ? q_user[q] : -1;
            row_lse[i] = row_user[i] >= 0 ? lse[q] : neg_inf();
            row_g[i] = row_user[i] >= 0 ? g[q] : 0.0f;
        }
        float s[4][4];
        tile_products<D>(s, qs, cs);
        mask_scores(s, row_user, info, ban, words, c0);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float p = s[i][j] == neg_inf() || row_g[i] == 0.0f ? 0.0f : row_g[i] * expf(s[i][j] - row_lse[i]);
                ps[(ty + 16 * i) * (NCE_TILE + 1) + tx + 16 * j] = p;
            }
        __syncthreads();
#pragma unroll 4
        for (int r = 0; r < NCE_TILE; ++r) {
            float q[D / 16];
#pragma unroll
            for (int j = 0; j < D / 16; ++j) q[j] = qs[r * (D + 1) + tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float p = ps[r * (NCE_TILE + 1) + ty + 16 * i];
#pragma unroll
                for (int j = 0; j < D / 16; ++j) acc[i][j] = fmaf(p, q[j], acc[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = c0 + ty + 16 * i;
        if (c >= nc || c_user[c] < 0) continue;  // past the last column, or padding
        float* out = d_items + (index_t)c_row[c] * D;
#pragma unroll
        for (int j = 0; j < D / 16; ++j) out[tx + 16 * j] += acc[i][j];
    }
}

// Pass 2, one block per user: its queries q (NCE_CHUNK at a time) against its own columns k, with
// w_qk = σ(N_q − s_qk)·S/P (weights = {1/P, S/P}):
//     loss_part[user] = Σ softplus(N_q − s_qk) / P,   g[q] = Σ_k w_qk,
//     d_users[q] = −Σ_k w_qk·v_k  (∂L/∂q̃, positives only),   d_items[k] = −Σ_q w_qk·q̃_q
// The inner products are short (at most NCE_MAX_TARGETS by d), so they read the embeddings from memory
// (the cache holds a user's rows) rather than staging them. blockDim.x is a multiple of 32.
extern "C" __global__ void infonce_pos(float* __restrict__ d_users, float* __restrict__ d_items, float* __restrict__ g,
                                       float* __restrict__ loss_part, const float* __restrict__ users,
                                       const float* __restrict__ items, const float* __restrict__ log_q,
                                       const int* __restrict__ q_row, const int* __restrict__ c_row,
                                       const int* __restrict__ q_start, const int* __restrict__ c_start,
                                       const float* __restrict__ lse, const float* __restrict__ weights, int d,
                                       float inv_tau) {
    __shared__ float w[NCE_CHUNK][NCE_MAX_TARGETS];
    __shared__ float scratch[32];
    const int user = blockIdx.x;
    const int q0 = q_start[user], q1 = q_start[user + 1];
    const int k0 = c_start[user], nt = c_start[user + 1] - k0;
    const float inv_pairs = weights[0], grad_weight = weights[1];
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
            w[j][k] = sigmoid(z) * grad_weight;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < nj * d; e += blockDim.x) {
            const int j = e / d, x = e % d;
            float acc = 0.0f;
            for (int k = 0; k < nt; ++k) acc = fmaf(w[j][k], items[(index_t)c_row[k0 + k] * d + x], acc);
            d_users[(index_t)q_row[j0 + j] * d + x] = -acc;
            if (x == 0) {
                float total = 0.0f;
                for (int k = 0; k < nt; ++k) total += w[j][k];
                g[j0 + j] = total;
            }
        }
        for (int e = threadIdx.x; e < nt * d; e += blockDim.x) {
            const int k = e / d, x = e % d;
            float acc = 0.0f;
            for (int j = 0; j < nj; ++j) acc = fmaf(w[j][k], users[(index_t)q_row[j0 + j] * d + x] * inv_tau, acc);
            float* out = d_items + (index_t)c_row[k0 + k] * d + x;
            *out = (j0 == q0 ? 0.0f : *out) - acc;
        }
        __syncthreads();  // w is rewritten by the next chunk
    }
    loss = block_sum(loss, scratch);
    if (threadIdx.x == 0) loss_part[user] = loss * inv_pairs;
}

// The entry points, per embedding width (d_out).
extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_lse_d32(float* lse, const float* users, const float* items, const float* log_q, const int* q_row,
                    const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, int nq, int nc,
                    int words, float inv_tau) {
    lse_impl<32>(lse, users, items, log_q, q_row, q_user, c_row, c_user, ban, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_dq_d32(float* d_users, const float* users, const float* items, const float* log_q, const int* q_row,
                   const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, const float* lse,
                   const float* g, int nq, int nc, int words, float inv_tau) {
    dq_impl<32>(d_users, users, items, log_q, q_row, q_user, c_row, c_user, ban, lse, g, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_dc_d32(float* d_items, const float* users, const float* items, const float* log_q, const int* q_row,
                   const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, const float* lse,
                   const float* g, int nq, int nc, int words, float inv_tau) {
    dc_impl<32>(d_items, users, items, log_q, q_row, q_user, c_row, c_user, ban, lse, g, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_lse_d64(float* lse, const float* users, const float* items, const float* log_q, const int* q_row,
                    const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, int nq, int nc,
                    int words, float inv_tau) {
    lse_impl<64>(lse, users, items, log_q, q_row, q_user, c_row, c_user, ban, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_dq_d64(float* d_users, const float* users, const float* items, const float* log_q, const int* q_row,
                   const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, const float* lse,
                   const float* g, int nq, int nc, int words, float inv_tau) {
    dq_impl<64>(d_users, users, items, log_q, q_row, q_user, c_row, c_user, ban, lse, g, nq, nc, words, inv_tau);
}

extern "C" __global__ void __launch_bounds__(NCE_THREADS)
    infonce_dc_d64(float* d_items, const float* users, const float* items, const float* log_q, const int* q_row,
                   const int* q_user, const int* c_row, const int* c_user, const unsigned* ban, const float* lse,
                   const float* g, int nq, int nc, int words, float inv_tau) {
    dc_impl<64>(d_items, users, items, log_q, q_row, q_user, c_row, c_user, ban, lse, g, nq, nc, words, inv_tau);
}
