// The feed-forward activation of the PCH blocks (SPEC §3.1): the up projection's bias and exact GELU,
// gelu(p) = p · Φ(p) = p/2 · (1 + erf(p/√2)), forward and backward. fp16 storage, fp32 math.
#include "common.cuh"

// Φ(p) as erfc(−p/√2) / 2: for p < 0, 1 + erf(p/√2) would cancel away the digits erfc keeps (at p = −3.4,
// a relative error of 1e-4, more than an fp16 rounding of the result).
__device__ __forceinline__ float normal_cdf(float p) { return 0.5f * erfcf(p * -0.70710678118654752f); }

__device__ __forceinline__ float gelu(float p) { return p * normal_cdf(p); }

// d gelu / dp = Φ(p) + p · φ(p).
__device__ __forceinline__ float gelu_slope(float p) {
    return normal_cdf(p) + p * expf(-0.5f * p * p) * 0.39894228040143268f;
}

// act[t, j] = fp16(gelu(fp16(pre[t, j] + bias[j]))). pre stays the bias-free GEMM output: the backward adds
// the bias again with the same rounding, so it differentiates exactly the function applied here, and the
// forward does not write pre back (a third of its bytes). cols % 8 == 0; 8 columns per thread, 16-byte
// accesses.
__device__ __forceinline__ void add_bias_rounded(float p[8], const float b[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = f16_to_f32(f32_to_f16(p[k] + b[k]));
}

extern "C" __global__ void gelu_bias_fwd(f16* __restrict__ act, const f16* __restrict__ pre,
                                         const float* __restrict__ bias, int rows, int cols) {
    const int chunks = cols / 8;
    const index_t total = (index_t)rows * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total; j += (index_t)gridDim.x * blockDim.x) {
        const index_t at = j / chunks * cols + (int)(j % chunks) * 8;
        float p[8], b[8];
        load8_f16(pre + at, p);
        load8_f32(bias + (int)(j % chunks) * 8, b);
        add_bias_rounded(p, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) p[k] = gelu(p[k]);
        store8_f16(act + at, p);
    }
}

// dpre = fp16(dact · gelu'(fp16(pre + bias))); dpre may be dact itself (in place). Block (x, y) covers rows
// reduction_rows(x) (common.cuh) and columns [y · blockDim.x · 8, +blockDim.x · 8); each thread owns 8
// columns over those rows and writes its partial bias gradient Σ dpre (unrounded) to
// partials[x, cols], which column_sums (reduce.cu) adds in block order.
extern "C" __global__ void gelu_bias_bwd(f16* dpre, float* __restrict__ partials, const f16* dact,
                                         const f16* __restrict__ pre, const float* __restrict__ bias, int rows,
                                         int cols, int split, int per_a, int per_b) {
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (c >= cols) return;
    float acc[8], b[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
    load8_f32(bias + c, b);
    int first, last;
    reduction_rows(rows, split, per_a, per_b, first, last);
    for (int row = first; row < last; ++row) {
        const index_t at = (index_t)row * cols + c;
        float d[8], p[8];
        load8_f16(dact + at, d);
        load8_f16(pre + at, p);
        add_bias_rounded(p, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            d[k] *= gelu_slope(p[k]);
            acc[k] += d[k];
        }
        store8_f16(dpre + at, d);
    }
    store8_f32(partials + (index_t)blockIdx.x * cols + c, acc);
}
