// The second pass of the deterministic reductions: kernels that reduce over rows (LayerNorm's weight and
// bias gradients, the bias gradients of GELU and of the L2-normalised head) write one partial sum per block
// of rows, and this adds the partials in block order. No floating-point atomics anywhere, so a training
// step repeats bit for bit on the same GPU and launch shape.
#include "common.cuh"

// out_p[j] = Σ_b partials[(p·blocks + b)·n + j] for b = 0 .. blocks-1, in that order, for each of `parts`
// (at most 3) partial arrays laid one after the other, each into its own output: one launch for all the
// sums one backward kernel leaves (LayerNorm's weight, bias and delta-bias gradients). One thread per column
// of a part: neighbouring threads read neighbouring columns of each partial row, so every read is coalesced.
extern "C" __global__ void column_sums(float* __restrict__ out0, float* __restrict__ out1, float* __restrict__ out2,
                                       const float* __restrict__ partials, int parts, int blocks, int n) {
    const index_t total = (index_t)parts * n;
    for (index_t e = blockIdx.x * (index_t)blockDim.x + threadIdx.x; e < total; e += (index_t)gridDim.x * blockDim.x) {
        const int p = (int)(e / n), j = (int)(e % n);
        const float* part = partials + (index_t)p * blocks * n;
        float s = 0.0f;
        for (int b = 0; b < blocks; ++b) s += part[(index_t)b * n + j];
        float* out = p == 0 ? out0 : p == 1 ? out1 : out2;
        out[j] = s;
    }
}
