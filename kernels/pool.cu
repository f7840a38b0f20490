// The end of the forward pass, fused: last residual add, final RMSNorm, mean over the sequence's tokens and
// L2 normalisation (SPEC §2.2, §2.3). The [T, D] final hidden states never reach device memory: each
// sequence's mean is accumulated in registers as its rows are normalised.
#include "common.cuh"

// One block per sequence s, rows cu_seqlens[s] .. cu_seqlens[s+1] of x:
//     y[t] = w · v · rsqrt(mean(v²) + eps),  v = x[t] + delta[t] (delta may be null)
//     m = (Σ_t y[t]) / n;   out[s] = m / max(‖m‖, 1e-12)            (fp32 sums, fp32 output)
// Each thread owns 8 consecutive columns: blockDim.x · 8 ≥ dim, blockDim.x a multiple of 32, dim % 8 == 0.
// Sequences are packed varlen, so every row is a real token and the mask is the sequence's row range. An
// empty sequence (the host rejects those) gives NaN, 0/0, rather than a silent zero.
extern "C" __global__ void final_norm_pool(float* __restrict__ out, const float* __restrict__ x,
                                           const f16* __restrict__ delta, const float* __restrict__ w,
                                           const int* __restrict__ cu_seqlens, int dim, float eps) {
    __shared__ float scratch[32];
    const int s = blockIdx.x;
    const int start = cu_seqlens[s], end = cu_seqlens[s + 1];
    const int c = threadIdx.x * 8;
    const bool active = c < dim;
    float g[8], acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] = acc[k] = 0.0f;
    if (active) load8_f32(w + c, g);
    for (int t = start; t < end; ++t) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = 0.0f;
        if (active) {
            load8_f32(x + (index_t)t * dim + c, v);
            if (delta != nullptr) {
                float d[8];
                load8_f16(delta + (index_t)t * dim + c, d);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] += d[k];
            }
        }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
        const float inv_rms = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += g[k] * (v[k] * inv_rms);
    }
    const float inv_n = 1.0f / (float)(end - start);
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        acc[k] *= inv_n;
        ss += acc[k] * acc[k];
    }
    const float norm = fmaxf(sqrtf(block_sum(ss, scratch)), 1e-12f);
    if (active) {
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] /= norm;
        store8_f32(out + (index_t)s * dim + c, acc);
    }
}
