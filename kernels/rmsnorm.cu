// RMSNorm as Llama and Baichuan2 apply it, with the residual add of the layer before fused in.
#include "common.cuh"

// For every row t (one block per row):
//     if delta: x[t] += delta[t]                       (the residual add, fp32)
//     out[t] = fp16( w · x[t] · rsqrt(mean(x[t]²) + eps) )
// Fusing the add saves one full read and write of the fp32 residual stream per norm: x is read once,
// written once (only with delta), and the statistics come from the values already in registers.
//
// dim % 8 == 0; blockDim.x is a multiple of 32. Each thread handles 8 consecutive columns per step. The
// second pass re-reads x[t] (a 16 KB row for D = 4096, still in L1) rather than keeping a per-thread array
// whose size would depend on dim. A thread reads back only what it wrote itself, so no barrier is needed
// between the passes beyond the one inside block_sum.
extern "C" __global__ void rmsnorm_residual(float* __restrict__ x, const f16* __restrict__ delta,
                                            const float* __restrict__ w, f16* __restrict__ out, int dim,
                                            float eps) {
    __shared__ float scratch[32];
    const index_t row = blockIdx.x;
    float* xr = x + row * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
        float v[8];
        load8_f32(xr + c, v);
        if (delta != nullptr) {
            float d[8];
            load8_f16(delta + row * dim + c, d);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += d[k];
            store8_f32(xr + c, v);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
    }
    const float inv_rms = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
    for (int c = threadIdx.x * 8; c < dim; c += blockDim.x * 8) {
        float v[8], g[8];
        load8_f32(xr + c, v);
        load8_f32(w + c, g);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = g[k] * (v[k] * inv_rms);
        store8_f16(out + row * dim + c, v);
    }
}
