// The second pass of the deterministic reductions: kernels that reduce over rows (LayerNorm's weight and
// bias gradients, the bias gradients of GELU and of the L2-normalised head) write one partial sum per block
// of rows, and this adds the partials in block order. No floating-point atomics anywhere, so a training
// step repeats bit for bit on the same GPU and launch shape.
#include "common.cuh"

// out[j] += Σ_b partials[b·n + j] for b = 0 .. blocks-1, in that order. One thread per column: neighbouring
// threads read neighbouring columns of each partial row, so every read is coalesced.
extern "C" __global__ void column_sums(float* __restrict__ out, const float* __restrict__ partials, int blocks, int n) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < blocks; ++b) s += partials[(index_t)b * n + j];
        out[j] += s;
    }
}
