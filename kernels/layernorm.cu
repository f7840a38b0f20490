// LayerNorm as BERT's post-LN blocks apply it (SPEC §3.1), `y = layernorm(x + delta + delta_bias) · w + b`,
// with the residual add and the bias of the projection before it fused in, forward and backward.
// Activations are fp16, every statistic and gradient fp32.
//
// The forward keeps what the backward needs as the CPU reference keeps it (src/cpu/layernorm.rs): the
// normalised input xhat (fp16, values of order 1, so its rounding is relative) and rstd (fp32). Keeping the
// pre-norm sum and the mean instead would recompute xhat as (sum − mean)·rstd from an fp16 sum, whose
// rounding error is relative to |sum| and is then multiplied by rstd: worse whenever the mean is large.
#include "common.cuh"

// One block per row; each thread owns 8 consecutive columns, so blockDim.x · 8 ≥ dim, dim % 8 == 0, and a
// row lives in registers between the passes. The variance is the mean of (v − mean)², two block sums,
// not E[v²] − mean², which cancels. 1 / sqrtf is correctly rounded (no fast math), as the reference's.
extern "C" __global__ void layernorm_fwd(f16* __restrict__ y, f16* __restrict__ xhat, float* __restrict__ rstd,
                                         const f16* __restrict__ x, const f16* __restrict__ delta,
                                         const float* __restrict__ delta_bias, const float* __restrict__ w,
                                         const float* __restrict__ b, int dim, float eps) {
    __shared__ float scratch[32];
    const index_t row = blockIdx.x;
    const int c = threadIdx.x * 8;
    const bool active = c < dim;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = 0.0f;
    if (active) {
        load8_f16(x + row * dim + c, v);
        if (delta != nullptr) {
            float d[8];
            load8_f16(delta + row * dim + c, d);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += d[k];
        }
        if (delta_bias != nullptr) {
            float d[8];
            load8_f32(delta_bias + c, d);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += d[k];
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += v[k];
    const float mean = block_sum(s, scratch) / (float)dim;
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += active ? (v[k] - mean) * (v[k] - mean) : 0.0f;
    const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    if (active) {
        float g[8], bb[8], h[8];
        load8_f32(w + c, g);
        load8_f32(b + c, bb);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            h[k] = (v[k] - mean) * r;
            v[k] = h[k] * g[k] + bb[k];
        }
        store8_f16(xhat + row * dim + c, h);
        store8_f16(y + row * dim + c, v);
    }
}

// Backward over the rows reduction_rows (common.cuh) gives block blockIdx.x, with dy = dy + dy2 when
// dy2 is given (the two branches that read a post-LN output: the next block's residual and its sublayer):
//     g = dy · w;   dx = rstd · (g − mean(g) − xhat · mean(g · xhat))          (fp16 out)
// and the block's partial sums, each [gridDim.x, dim] fp32, added in block order by column_sums (reduce.cu):
//     pw = Σ dy · xhat,   pb = Σ dy,   pd = Σ dx (the gradient of delta_bias; only when pd is given).
// Each thread owns 8 columns for all of the block's rows, so its partial sums stay in registers and the
// row order within a block is fixed: the result repeats bit for bit. Same block shape as layernorm_fwd.
extern "C" __global__ void layernorm_bwd(f16* __restrict__ dx, float* __restrict__ pw, float* __restrict__ pb,
                                         float* __restrict__ pd, const f16* __restrict__ dy,
                                         const f16* __restrict__ dy2, const f16* __restrict__ xhat,
                                         const float* __restrict__ rstd, const float* __restrict__ w, int rows,
                                         int dim, int split, int per_a, int per_b) {
    __shared__ float scratch[32];
    const int c = threadIdx.x * 8;
    const bool active = c < dim;
    float g_w[8], acc_w[8], acc_b[8], acc_d[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) g_w[k] = acc_w[k] = acc_b[k] = acc_d[k] = 0.0f;
    if (active) load8_f32(w + c, g_w);
    int first, last;
    reduction_rows(rows, split, per_a, per_b, first, last);
    const float inv_n = 1.0f / (float)dim;
    for (int row = first; row < last; ++row) {
        const index_t at = (index_t)row * dim + c;
        float d[8], h[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) d[k] = h[k] = 0.0f;
        if (active) {
            load8_f16(dy + at, d);
            if (dy2 != nullptr) {
                float d2[8];
                load8_f16(dy2 + at, d2);
#pragma unroll
                for (int k = 0; k < 8; ++k) d[k] += d2[k];
            }
            load8_f16(xhat + at, h);
        }
        float sg = 0.0f, sgh = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float g = d[k] * g_w[k];
            sg += g;
            sgh += g * h[k];
        }
        const float mean_g = block_sum(sg, scratch) * inv_n;
        const float mean_gh = block_sum(sgh, scratch) * inv_n;
        const float r = rstd[row];
        if (active) {
            float out[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                out[k] = r * (d[k] * g_w[k] - mean_g - h[k] * mean_gh);
                acc_w[k] += d[k] * h[k];
                acc_b[k] += d[k];
                acc_d[k] += out[k];
            }
            store8_f16(dx + at, out);
        }
    }
    if (active) {
        const index_t at = (index_t)blockIdx.x * dim + c;
        store8_f32(pw + at, acc_w);
        store8_f32(pb + at, acc_b);
        if (pd != nullptr) store8_f32(pd + at, acc_d);
    }
}
