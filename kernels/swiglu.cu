// The gated feed-forward activation of Llama and Baichuan2: silu(gate) · up.
#include "common.cuh"

// act[t, j] = silu(g) · u with g = gate_up[t, j], u = gate_up[t, F + j]: each row of gate_up holds the gate
// projection then the up projection, the output of one GEMM against the stacked [2F, D] weights.
// silu(g) = g / (1 + e^-g) in fp32: a large negative g gives -0 (g / inf), never NaN.
//
// ffn % 8 == 0: each thread handles 8 consecutive columns with 16-byte accesses.
extern "C" __global__ void swiglu(f16* __restrict__ act, const f16* __restrict__ gate_up, int tokens, int ffn) {
    const int chunks = ffn / 8;
    const index_t total = (index_t)tokens * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total;
         j += (index_t)gridDim.x * blockDim.x) {
        const index_t t = j / chunks;
        const int c = (int)(j % chunks) * 8;
        float g[8], u[8];
        load8_f16(gate_up + t * 2 * ffn + c, g);
        load8_f16(gate_up + t * 2 * ffn + ffn + c, u);
#pragma unroll
        for (int k = 0; k < 8; ++k) g[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
        store8_f16(act + t * ffn + c, g);
    }
}
