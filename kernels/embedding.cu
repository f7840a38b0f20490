// Token embedding gather: the first activation of the forward pass (SPEC §2.2, x = E[t]).
#include "common.cuh"

// x[t, :] = table[ids[t], :] widened to fp32, for t < tokens. The residual stream stays in fp32 for the
// whole forward pass: every layer adds two fp16 GEMM outputs into it, and an fp16 running sum would lose
// low bits at each add.
//
// dim % 8 == 0 (checked on the host): each thread moves 8 halves in one 16-byte load and 8 floats in two
// 16-byte stores. An id outside the vocabulary (the host rejects those before upload) yields a NaN row
// rather than a read past the table.
extern "C" __global__ void embedding_gather(float* __restrict__ x, const f16* __restrict__ table,
                                            const unsigned* __restrict__ ids, int tokens, int dim,
                                            int vocab) {
    const int chunks = dim / 8;
    const index_t total = (index_t)tokens * chunks;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < total;
         i += (index_t)gridDim.x * blockDim.x) {
        const index_t t = i / chunks;
        const int c = (int)(i % chunks) * 8;
        const unsigned id = ids[t];
        float v[8];
        if (id < (unsigned)vocab) {
            load8_f16(table + (index_t)id * dim + c, v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = nan_f32();
        }
        store8_f32(x + t * dim + c, v);
    }
}
