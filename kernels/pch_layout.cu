// Data movement of the PCH tower on the GPU (SPEC §3.1): packing the valid positions of a right-padded batch.
//
// Packed row r is position valid[r] of the padded [B, L] batch. Nothing else is moved: the masked attention
// reads and writes the row-major projections in place (masked_attention.cu).
#include "common.cuh"

// out[r, c] = fp16(src[valid[r], c]) for rows × cols (cols % 8 == 0): content rows gathered from the padded
// batch, in the precision the adaptor GEMM takes.
extern "C" __global__ void pack_rows_f32(f16* __restrict__ out, const float* __restrict__ src,
                                         const int* __restrict__ valid, int rows, int cols) {
    const int chunks = cols / 8;
    const index_t total = (index_t)rows * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total; j += (index_t)gridDim.x * blockDim.x) {
        const index_t r = j / chunks;
        const int c = (int)(j % chunks) * 8;
        float v[8];
        load8_f32(src + (index_t)valid[r] * cols + c, v);
        store8_f16(out + r * cols + c, v);
    }
}

extern "C" __global__ void pack_rows_f16(f16* __restrict__ out, const f16* __restrict__ src,
                                         const int* __restrict__ valid, int rows, int cols) {
    const int chunks = cols / 8;
    const index_t total = (index_t)rows * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total; j += (index_t)gridDim.x * blockDim.x) {
        const index_t r = j / chunks;
        const int c = (int)(j % chunks) * 8;
        *reinterpret_cast<uint4*>(out + r * cols + c) =
            *reinterpret_cast<const uint4*>(src + (index_t)valid[r] * cols + c);
    }
}
