// The end of the PCH towers (SPEC §3.1): the head's bias and the L2 normalisation of every output row,
// e = z / max(‖z‖, eps) with z = head GEMM output + bias, eps = 1e-12 as torch.nn.functional.normalize.
// Rows are short (d_out = 64): one warp per row, each lane holding up to L2_MAX_PER_LANE columns, so
// dim ≤ 32 · L2_MAX_PER_LANE. The embeddings stay fp32: the loss multiplies their products by 1/τ = 20.
#include "common.cuh"

#define L2_MAX_PER_LANE 8
#define L2_WARPS 8

// Warp w of block x takes rows x · L2_WARPS + w; y[row] fp32, norms[row] = ‖z‖ (before the clamp).
extern "C" __global__ void l2norm_fwd(float* __restrict__ y, float* __restrict__ norms, const f16* __restrict__ z,
                                      const float* __restrict__ bias, int rows, int dim, float eps) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * L2_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    float v[L2_MAX_PER_LANE];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < L2_MAX_PER_LANE; ++k) {
        const int c = lane + 32 * k;
        v[k] = 0.0f;
        if (c < dim) {
            v[k] = f16_to_f32(z[(index_t)row * dim + c]) + (bias != nullptr ? bias[c] : 0.0f);
            ss += v[k] * v[k];
        }
    }
    const float norm = sqrtf(warp_sum(ss));
    const float inv = 1.0f / fmaxf(norm, eps);
    if (lane == 0) norms[row] = norm;
#pragma unroll
    for (int k = 0; k < L2_MAX_PER_LANE; ++k) {
        const int c = lane + 32 * k;
        if (c < dim) y[(index_t)row * dim + c] = v[k] * inv;
    }
}

// dz = (dy − y · (y·dy)) / ‖z‖ where ‖z‖ ≥ eps, else dy / eps (the clamp is a constant there), as fp16 for
// the head's GEMMs; with partials given, the block's bias gradient Σ dz (unrounded) over its rows
// reduction_rows(x) (common.cuh) goes to partials[x, dim] for column_sums (reduce.cu). Each warp sums
// its own rows in registers and the warps' sums are added in warp order: deterministic.
// blockDim.x == 32 · L2_WARPS.
extern "C" __global__ void l2norm_bwd(f16* __restrict__ dz, float* __restrict__ partials, const float* __restrict__ dy,
                                      const float* __restrict__ y, const float* __restrict__ norms, int rows, int dim,
                                      int split, int per_a, int per_b, float eps) {
    __shared__ float sums[L2_WARPS][32 * L2_MAX_PER_LANE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[L2_MAX_PER_LANE];
#pragma unroll
    for (int k = 0; k < L2_MAX_PER_LANE; ++k) acc[k] = 0.0f;
    int first, last;
    reduction_rows(rows, split, per_a, per_b, first, last);
    for (int row = first + warp; row < last; row += L2_WARPS) {
        const index_t at = (index_t)row * dim;
        float g[L2_MAX_PER_LANE], e[L2_MAX_PER_LANE];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < L2_MAX_PER_LANE; ++k) {
            const int c = lane + 32 * k;
            g[k] = e[k] = 0.0f;
            if (c < dim) {
                g[k] = dy[at + c];
                e[k] = y[at + c];
                dot += g[k] * e[k];
            }
        }
        dot = warp_sum(dot);
        const float norm = norms[row];
        const bool clamped = !(norm >= eps);
        const float inv = 1.0f / (clamped ? eps : norm);
#pragma unroll
        for (int k = 0; k < L2_MAX_PER_LANE; ++k) {
            const int c = lane + 32 * k;
            const float d = (clamped ? g[k] : g[k] - e[k] * dot) * inv;
            acc[k] += d;
            if (c < dim) dz[at + c] = f32_to_f16(d);
        }
    }
    if (partials == nullptr) return;
#pragma unroll
    for (int k = 0; k < L2_MAX_PER_LANE; ++k) sums[warp][lane + 32 * k] = acc[k];
    __syncthreads();
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < L2_WARPS; ++w) s += sums[w][c];
        partials[(index_t)blockIdx.x * dim + c] = s;
    }
}
