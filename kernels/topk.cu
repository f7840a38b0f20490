// Gallery top-K for retrieval (SPEC §5): for every user, the K gallery rows of highest dot product with the
// user's embedding, in one pass over the gallery per block of users and without sorting anything but the
// running lists.
//
// A block owns TOPK_USERS users and streams the gallery in chunks of TOPK_ITEMS rows through shared memory.
// Each of its 256 threads computes an 8 × 4 tile of fp32 scores (users ty + 16i, items tx + 16j) with fmaf in
// column order k = 0, 1, …, d − 1. Every user has a running list of its best K so far, sorted best first, in
// `out` (global memory, cached in L2) and a threshold in shared memory: the K-th entry. Almost every score is
// turned away by one comparison with that threshold; the few that beat it (and are not in the user's
// exclusion list) go to a small per-user candidate buffer, which a warp then inserts into the user's list.
// After the first chunks the threshold is high and a chunk seldom has any candidate.
//
// Ranking is a strict total order encoded in one 64-bit key, larger is better: the high word is the score's
// bits made order-preserving as an unsigned integer (NaN lowest, −0 as +0), the low word 0xffffffff − row, so
// equal scores rank the lower row first, as src/eval/topk.rs does. Key 0 is "no entry": lists of users with
// fewer than K admissible rows end in zeros.
#include "common.cuh"

#define TOPK_THREADS 256
#define TOPK_USERS 128
#define TOPK_ITEMS 64
// Columns staged per pass (a slab); longer embeddings take several passes per chunk.
#define TOPK_DK 64
// Shared-memory row stride in floats: 17 float4s, odd, so that the 16 rows a warp reads at once fall in
// distinct bank groups.
#define TOPK_LD (TOPK_DK + 4)
// Candidates buffered per user between merges; more wait (in registers) for the next round.
#define TOPK_CAP 16
// Largest K: each lane of a warp holds K / 32 list entries in registers while merging.
#define TOPK_KMAX 256
#define TOPK_KREG (TOPK_KMAX / 32)

typedef unsigned long long rank_key;

// Bytes of dynamic shared memory topk_select needs (src/cuda/topk.rs mirrors it).
#define TOPK_SHARED_BYTES                                                                                      \
    ((TOPK_USERS + TOPK_ITEMS) * TOPK_LD * 4 + TOPK_USERS * TOPK_CAP * 8 + TOPK_USERS * (8 + 4 + 4))

__device__ __forceinline__ rank_key topk_key(float s, int row) {
    unsigned hi;
    if (s != s) {
        hi = 0u;
    } else {
        unsigned b = s == 0.0f ? 0u : __float_as_uint(s);
        hi = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    }
    return ((rank_key)hi << 32) | (rank_key)(0xffffffffu - (unsigned)row);
}

// The score of a key (NaN for key 0 and for NaN scores).
__device__ __forceinline__ float topk_key_score(rank_key key) {
    const unsigned hi = (unsigned)(key >> 32);
    if (hi == 0u) return nan_f32();
    return __uint_as_float((hi & 0x80000000u) ? (hi & 0x7fffffffu) : ~hi);
}

__device__ __forceinline__ rank_key shfl_key(rank_key v, int src) {
    const unsigned lo = __shfl_sync(0xffffffffu, (unsigned)v, src);
    const unsigned hi = __shfl_sync(0xffffffffu, (unsigned)(v >> 32), src);
    return ((rank_key)hi << 32) | lo;
}

__device__ __forceinline__ rank_key shfl_up_key(rank_key v) {
    const unsigned lo = __shfl_up_sync(0xffffffffu, (unsigned)v, 1);
    const unsigned hi = __shfl_up_sync(0xffffffffu, (unsigned)(v >> 32), 1);
    return ((rank_key)hi << 32) | lo;
}

// A warp's sorted list of k keys, entry g = 32·i + lane in e[i]: inserts x (distinct from every entry) where
// it ranks, dropping the last entry; false (and nothing changed) when x ranks past the k-th. Whole warp.
__device__ __forceinline__ bool list_insert(rank_key (&e)[TOPK_KREG], rank_key x, int k, int lane) {
    int pos = 0;
#pragma unroll
    for (int i = 0; i < TOPK_KREG; ++i) {
        if (i * 32 < k) pos += __popc(__ballot_sync(0xffffffffu, i * 32 + lane < k && e[i] > x));
    }
    if (pos >= k) return false;
    // From the last register down, so that each shift reads the previous register before it changes.
#pragma unroll
    for (int i = TOPK_KREG - 1; i >= 0; --i) {
        if (i * 32 >= k) continue;
        const rank_key up = shfl_up_key(e[i]);
        const rank_key carry = i > 0 ? shfl_key(e[i > 0 ? i - 1 : 0], 31) : 0ull;
        const int g = i * 32 + lane;
        const rank_key prev = lane == 0 ? carry : up;
        e[i] = g < pos ? e[i] : (g == pos ? x : prev);
    }
    return true;
}

__device__ __forceinline__ void list_load(rank_key (&e)[TOPK_KREG], const rank_key* list, int k, int lane) {
#pragma unroll
    for (int i = 0; i < TOPK_KREG; ++i) {
        const int g = i * 32 + lane;
        e[i] = g < k ? list[g] : 0ull;
    }
}

__device__ __forceinline__ void list_store(rank_key* list, const rank_key (&e)[TOPK_KREG], int k, int lane) {
#pragma unroll
    for (int i = 0; i < TOPK_KREG; ++i) {
        const int g = i * 32 + lane;
        if (g < k) list[g] = e[i];
    }
}

// Whether `row` is in the user's sorted exclusion list rows[offsets[user] .. offsets[user + 1]).
__device__ __forceinline__ bool excluded(const int* __restrict__ offsets, const int* __restrict__ rows, int user,
                                         int row) {
    if (offsets == nullptr) return false;
    int lo = offsets[user], hi = offsets[user + 1];
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        const int r = rows[mid];
        if (r == row) return true;
        if (r < row) lo = mid + 1;
        else hi = mid;
    }
    return false;
}

// Rows row0 .. row0 + rows of columns k0 .. k0 + kw (kw a multiple of 4) of a row-major [·, d] matrix into
// shared memory with stride TOPK_LD; rows at or past `end` are zeros. Coalesced 16-byte reads.
__device__ __forceinline__ void topk_stage(float* dst, const float* __restrict__ src, int row0, int end, int d,
                                           int k0, int kw, int rows) {
    const int quads = kw >> 2;
    for (int f = threadIdx.x; f < rows * quads; f += TOPK_THREADS) {
        const int r = f / quads, q = f - r * quads;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row0 + r < end) v = *reinterpret_cast<const float4*>(src + (index_t)(row0 + r) * d + k0 + 4 * q);
        *reinterpret_cast<float4*>(dst + r * TOPK_LD + 4 * q) = v;
    }
}

// Block (x, y): users x·TOPK_USERS … (+TOPK_USERS) against gallery rows [y·span, min((y + 1)·span, n_gallery)),
// their lists written to out[y][user][0 .. k) ([gridDim.y, n_users, k] keys, best first). users [n_users, d]
// and gallery [n_gallery, d] fp32 row-major, d a multiple of 4; excl_offsets [n_users + 1] and excl_rows (each
// user's rows ascending), or both null. 1 ≤ k ≤ TOPK_KMAX; blockDim.x == TOPK_THREADS; TOPK_SHARED_BYTES of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS, 2)
    topk_select(rank_key* __restrict__ out, const float* __restrict__ users, const float* __restrict__ gallery,
                const int* __restrict__ excl_offsets, const int* __restrict__ excl_rows, int n_users, int n_gallery,
                int d, int k, int span) {
    DYNAMIC_SHARED(unsigned char, topk_smem);
    float* us = reinterpret_cast<float*>(topk_smem);
    float* gs = us + TOPK_USERS * TOPK_LD;
    rank_key* cand = reinterpret_cast<rank_key*>(gs + TOPK_ITEMS * TOPK_LD);
    rank_key* thr_key = cand + TOPK_USERS * TOPK_CAP;
    float* thr_score = reinterpret_cast<float*>(thr_key + TOPK_USERS);
    int* count = reinterpret_cast<int*>(thr_score + TOPK_USERS);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tx = tid & 15, ty = tid >> 4;
    const int user0 = blockIdx.x * TOPK_USERS;
    const int here = min(TOPK_USERS, n_users - user0);
    const int g_begin = blockIdx.y * span;
    const int g_end = min(n_gallery, g_begin + span);
    out += (index_t)blockIdx.y * n_users * k;

    const float neg_inf = __uint_as_float(0xff800000u);
    for (int u = tid; u < TOPK_USERS; u += TOPK_THREADS) {
        thr_key[u] = 0ull;
        thr_score[u] = neg_inf;
        count[u] = 0;
    }
    for (index_t i = tid; i < (index_t)here * k; i += TOPK_THREADS) out[(index_t)user0 * k + i] = 0ull;
    __syncthreads();

    const int slabs = (d + TOPK_DK - 1) / TOPK_DK;
    for (int g0 = g_begin; g0 < g_end; g0 += TOPK_ITEMS) {
        float acc[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
        }
        for (int s = 0; s < slabs; ++s) {
            const int k0 = s * TOPK_DK, kw = min(TOPK_DK, d - k0);
            if (slabs > 1 || g0 == g_begin) topk_stage(us, users, user0, n_users, d, k0, kw, TOPK_USERS);
            topk_stage(gs, gallery, g0, g_end, d, k0, kw, TOPK_ITEMS);
            __syncthreads();
            for (int kk = 0; kk < kw; kk += 4) {
                float4 b[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(gs + (tx + 16 * j) * TOPK_LD + kk);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 a = *reinterpret_cast<const float4*>(us + (ty + 16 * i) * TOPK_LD + kk);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        float c = acc[i][j];
                        c = fmaf(a.x, b[j].x, c);
                        c = fmaf(a.y, b[j].y, c);
                        c = fmaf(a.z, b[j].z, c);
                        c = fmaf(a.w, b[j].w, c);
                        acc[i][j] = c;
                    }
                }
            }
            __syncthreads();
        }

        // Selection: bit 4i + j of `pending` is score (i, j) still to offer.
        unsigned pending = 0u;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (ty + 16 * i < here && g0 + tx + 16 * j < g_end) pending |= 1u << (4 * i + j);
            }
        }
        while (true) {
            int offered = 0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int u = ty + 16 * i;
                const float t = thr_score[u];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const unsigned bit = 1u << (4 * i + j);
                    if (!(pending & bit)) continue;
                    bool done = true;
                    const float sc = acc[i][j];
                    // Below the K-th score: out at once (NaN and ties go the exact way).
                    if (!(sc < t)) {
                        const int row = g0 + tx + 16 * j;
                        const rank_key key = topk_key(sc, row);
                        if (key > thr_key[u] && !excluded(excl_offsets, excl_rows, user0 + u, row)) {
                            const int slot = atomicAdd(&count[u], 1);
                            offered = 1;
                            if (slot < TOPK_CAP) cand[u * TOPK_CAP + slot] = key;
                            else done = false;
                        }
                    }
                    if (done) pending &= ~bit;
                }
            }
            if (!__syncthreads_or(offered)) break;
            // Merge: warp w inserts the candidates of users w, w + 8, … into their lists.
            for (int u = warp; u < TOPK_USERS; u += TOPK_THREADS / 32) {
                const int c = count[u];
                if (c == 0) continue;
                rank_key* list = out + (index_t)(user0 + u) * k;
                rank_key e[TOPK_KREG];
                list_load(e, list, k, lane);
                const int n = min(c, TOPK_CAP);
                for (int t = 0; t < n; ++t) list_insert(e, cand[u * TOPK_CAP + t], k, lane);
                list_store(list, e, k, lane);
                // The new K-th entry from memory: picking it out of e[(k − 1) / 32] would index the registers
                // at run time and move the list to local memory.
                __syncwarp();
                if (lane == 0) {
                    const rank_key last = list[k - 1];
                    thr_key[u] = last;
                    thr_score[u] = last == 0ull ? neg_inf : topk_key_score(last);
                    count[u] = 0;
                }
            }
            if (!__syncthreads_or(pending != 0u)) break;
        }
    }
}

// The lists of `splits` gallery parts ([splits, n_users, k], as topk_select writes them for gridDim.y =
// splits) merged into out [n_users, k]: one warp per user, 8 warps a block. Each part is sorted, so its
// entries are inserted in order until one no longer enters.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_merge(rank_key* __restrict__ out, const rank_key* __restrict__ parts, int n_users, int k, int splits) {
    const int lane = threadIdx.x & 31;
    const int user = blockIdx.x * (TOPK_THREADS / 32) + (threadIdx.x >> 5);
    if (user >= n_users) return;
    rank_key e[TOPK_KREG];
    list_load(e, parts + (index_t)user * k, k, lane);
    for (int s = 1; s < splits; ++s) {
        const rank_key* list = parts + ((index_t)s * n_users + user) * k;
        for (int t = 0; t < k; ++t) {
            const rank_key x = list[t];
            if (x == 0ull || !list_insert(e, x, k, lane)) break;
        }
    }
    list_store(out + (index_t)user * k, e, k, lane);
}
