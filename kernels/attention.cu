// Causal self-attention over packed variable-length sequences, on tensor cores (SPEC §2.2):
//     out = softmax(q·kᵀ / √dh + causal mask) · v,   per sequence and head.
//
// Layout: qkv is the [T, 3D] output of the W_pack GEMM (rows Q | K | V, head h at columns h·dh..(h+1)·dh of
// each part), RoPE already applied to Q and K; out is [T, D]. Sequence s owns rows
// cu_seqlens[s] .. cu_seqlens[s+1]: no padding anywhere.
//
// One block per (query tile of 64 rows, head): `tiles` lists (sequence, first row of the tile within it),
// built on the host; grid = (tiles, heads). Four warps, each owning 16 query rows, walk the keys 0 ..
// min(n, last row of the tile) in steps of 32 with an online softmax (flash-attention style): per step
// S = Q·Kᵀ on tensor cores, the running row maximum m and sum l are updated in fp32, the fp32 output rows
// are rescaled by e^(m_old − m_new), and O += P·V on tensor cores with P rounded to fp16.
//
// Tensor cores through the PTX wmma instructions (m16n16k16, fp16 inputs, fp32 accumulators), which sm_70
// has; nothing newer is used. A wmma accumulator's element-to-register mapping is unspecified, so the
// per-row rescaling happens on the output tile in shared memory (fp32): each step loads the warp's output
// fragments, multiplies P·V into them and stores them back.
//
// Shared memory per block (bytes), for head size HD (see AttnSmem): the Q tile (fp16), which once loaded
// into registers is reused for the step's scores S (fp32) and probabilities P (fp16); the K and V tiles
// (fp16); the output tile O (fp32); m and l. Rows are padded (by 16 bytes for fp16, 16 bytes for fp32) so
// the rows of a 16×16 fragment start in different banks. HD = 128 needs 69,120 bytes, so the host raises
// the kernel's dynamic shared-memory limit (the V100 allows 96 KB per block); the kernel checks it got
// enough and traps otherwise.
//
// Registers: the Q fragments of a 128-wide head take 64 per thread; `__launch_bounds__(128, 1)` lets ptxas
// keep them without spilling (168 registers on sm_70), and shared memory allows one block per V100 SM at
// that head size anyway.
//
// The softmax step runs two lanes per row over 16 rows; with the fp32 row stride a multiple of 4 words (as
// wmma requires), rows r and r + 8 share banks: a 2-way conflict in a part of the kernel that moves
// 2 × 16 × 32 floats per step, against the 2 × 16 × 32 × HD multiply-adds of the step's tensor-core work.
#include "common.cuh"

#define ATT_BM 64
#define ATT_BN 32
#define ATT_THREADS 128

// Shared-memory layout for head size HD. Every region size is a multiple of 32 bytes, so every region and
// every 16-row fragment pointer is 32-byte aligned. src/cuda/ops.rs mirrors TOTAL to size the launch.
template <int HD>
struct AttnSmem {
    static constexpr int LDH = HD + 8;      // fp16 Q, K, V rows
    static constexpr int LDS = ATT_BN + 4;  // fp32 scores
    static constexpr int LDP = ATT_BN + 8;  // fp16 probabilities
    static constexpr int LDO = HD + 4;      // fp32 output rows
    static constexpr int Q_BYTES = ATT_BM * LDH * 2;
    static constexpr int S_BYTES = ATT_BM * LDS * 4;
    static constexpr int P_BYTES = ATT_BM * LDP * 2;
    static constexpr int QSP_BYTES = Q_BYTES > S_BYTES + P_BYTES ? Q_BYTES : S_BYTES + P_BYTES;
    static constexpr int KV_BYTES = ATT_BN * LDH * 2;
    static constexpr int O_BYTES = ATT_BM * LDO * 4;
    static constexpr int TOTAL = QSP_BYTES + 2 * KV_BYTES + O_BYTES + 2 * ATT_BM * 4;
};

template <int HD>
__device__ __forceinline__ void attention_forward(const f16* __restrict__ qkv, f16* __restrict__ out,
                                                  const int* __restrict__ cu_seqlens, const int2* __restrict__ tiles,
                                                  int heads, float scale_log2) {
    typedef AttnSmem<HD> L;
    DYNAMIC_SHARED(unsigned char, smem);
    if (dynamic_smem_size() < (unsigned)L::TOTAL) __trap();
    f16* sQ = reinterpret_cast<f16*>(smem);
    float* sS = reinterpret_cast<float*>(smem);  // reuses the Q tile's bytes once Q is in registers
    f16* sP = reinterpret_cast<f16*>(smem + L::S_BYTES);
    f16* sK = reinterpret_cast<f16*>(smem + L::QSP_BYTES);
    f16* sV = reinterpret_cast<f16*>(smem + L::QSP_BYTES + L::KV_BYTES);
    float* sO = reinterpret_cast<float*>(smem + L::QSP_BYTES + 2 * L::KV_BYTES);
    float* sM = reinterpret_cast<float*>(smem + L::QSP_BYTES + 2 * L::KV_BYTES + L::O_BYTES);
    float* sL = sM + ATT_BM;

    const int2 tile = tiles[blockIdx.x];
    const int head = blockIdx.y;
    const int start = cu_seqlens[tile.x];
    const int n = cu_seqlens[tile.x + 1] - start;
    const int q0 = tile.y;
    const int dim = heads * HD, stride = 3 * dim;
    const f16* q_base = qkv + (index_t)start * stride + head * HD;
    const f16* k_base = q_base + dim;
    const f16* v_base = q_base + 2 * dim;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float neg_inf = __int_as_float(0xff800000);

    load_tile<ATT_BM, HD>(sQ, L::LDH, q_base, stride, q0, n);
    for (int i = threadIdx.x; i < ATT_BM * L::LDO; i += blockDim.x) sO[i] = 0.0f;
    for (int i = threadIdx.x; i < ATT_BM; i += blockDim.x) {
        sM[i] = neg_inf;
        sL[i] = 0.0f;
    }
    __syncthreads();
    FragA qa[HD / 16];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) load_a_row(qa[kk], sQ + warp * 16 * L::LDH + kk * 16, L::LDH);
    __syncthreads();  // every warp holds its Q rows: the tile's bytes become S and P

    // Keys past the tile's last query row are masked for every row of the tile.
    const int kv_end = min(n, q0 + ATT_BM);
    const int warp_last = q0 + warp * 16 + 15;
    const int r = lane >> 1, part = lane & 1;  // two lanes per query row in the softmax
    const int row = warp * 16 + r, qi = q0 + row;
    float* srow = sS + row * L::LDS;
    float* orow = sO + row * L::LDO;
    for (int k0 = 0; k0 < kv_end; k0 += ATT_BN) {
        load_tile<ATT_BN, HD>(sK, L::LDH, k_base, stride, k0, n);
        load_tile<ATT_BN, HD>(sV, L::LDH, v_base, stride, k0, n);
        __syncthreads();
        // Warp-uniform: when every key of the step lies after the warp's last row, the step changes none of
        // its rows (p = 0, alpha = 1) and is skipped. Step 0 is never skipped, and it holds key 0, which
        // every row sees: from then on each row's maximum is finite, so no e^(−inf − (−inf)) arises.
        if (k0 <= warp_last) {
#pragma unroll
            for (int j = 0; j < ATT_BN / 16; ++j) {
                FragC s;
                zero_c(s);
#pragma unroll
                for (int kk = 0; kk < HD / 16; ++kk) {
                    FragB kb;
                    load_b_col(kb, sK + j * 16 * L::LDH + kk * 16, L::LDH);
                    mma_row_col(s, qa[kk], kb);
                }
                store_d_row(sS + warp * 16 * L::LDS + j * 16, s, L::LDS);
            }
            __syncwarp();
            float mx = neg_inf;
            for (int c = part; c < ATT_BN; c += 2) {
                const int kj = k0 + c;
                const float v = (kj <= qi && kj < n) ? srow[c] * scale_log2 : neg_inf;
                srow[c] = v;
                mx = fmaxf(mx, v);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_old = sM[row];
            const float m_new = fmaxf(m_old, mx);
            const float alpha = exp2f(m_old - m_new);
            float sum = 0.0f;
            for (int c = part; c < ATT_BN; c += 2) {
                const float p = exp2f(srow[c] - m_new);
                sum += p;
                sP[row * L::LDP + c] = f32_to_f16(p);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            __syncwarp();  // both lanes of a row have read m_old before one of them replaces it
            if (part == 0) {
                sM[row] = m_new;
                sL[row] = sL[row] * alpha + sum;
            }
            for (int c = part; c < HD; c += 2) orow[c] *= alpha;
            __syncwarp();  // P and the rescaled O rows are in place before the tensor cores read them
#pragma unroll
            for (int j = 0; j < HD / 16; ++j) {
                FragC o;
                load_c_row(o, sO + warp * 16 * L::LDO + j * 16, L::LDO);
#pragma unroll
                for (int kk = 0; kk < ATT_BN / 16; ++kk) {
                    FragA pa;
                    FragB vb;
                    load_a_row(pa, sP + warp * 16 * L::LDP + kk * 16, L::LDP);
                    load_b_row(vb, sV + kk * 16 * L::LDH + j * 16, L::LDH);
                    mma_row_row(o, pa, vb);
                }
                store_d_row(sO + warp * 16 * L::LDO + j * 16, o, L::LDO);
            }
        }
        __syncthreads();  // every warp is done with this step's K and V before the next step replaces them
    }
    if (qi < n) {
        const float inv_l = 1.0f / sL[row];
        f16* dst = out + (index_t)(start + qi) * dim + head * HD;
        for (int c = part * 8; c < HD; c += 16) {
            float v[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = orow[c + k] * inv_l;
            store8_f16(dst + c, v);
        }
    }
}

// Head size 16 serves the small test models (the golden fixtures); the others, real ones.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_hd16(const f16* __restrict__ qkv, f16* __restrict__ out, const int* __restrict__ cu_seqlens,
                       const int2* __restrict__ tiles, int heads, float scale_log2) {
    attention_forward<16>(qkv, out, cu_seqlens, tiles, heads, scale_log2);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_hd32(const f16* __restrict__ qkv, f16* __restrict__ out, const int* __restrict__ cu_seqlens,
                       const int2* __restrict__ tiles, int heads, float scale_log2) {
    attention_forward<32>(qkv, out, cu_seqlens, tiles, heads, scale_log2);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_hd64(const f16* __restrict__ qkv, f16* __restrict__ out, const int* __restrict__ cu_seqlens,
                       const int2* __restrict__ tiles, int heads, float scale_log2) {
    attention_forward<64>(qkv, out, cu_seqlens, tiles, heads, scale_log2);
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_hd128(const f16* __restrict__ qkv, f16* __restrict__ out, const int* __restrict__ cu_seqlens,
                        const int2* __restrict__ tiles, int heads, float scale_log2) {
    attention_forward<128>(qkv, out, cu_seqlens, tiles, heads, scale_log2);
}
