// Data movement of the PCH tower on the GPU (SPEC §3.1): packing the valid positions of a right-padded batch,
// and the permutes between row-major projections and the head-major layout of masked_attention.cu.
//
// Every kernel is driven by `valid` [rows]: packed row r is position valid[r] of the padded [B, L] batch, so
// it belongs to sequence b = valid[r] / L at position i = valid[r] % L, and its sequence starts at packed row
// r - i. Sequence b's head h lies at head-major rows (start_b · heads + h · n_b ..) with n_b read from
// cu_seqlens, as src/cpu/masked_attention.rs lays it out.
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

// The head-major row of packed row r's head h.
__device__ __forceinline__ index_t head_row(const int* valid, const int* cu_seqlens, int len, int heads, index_t r,
                                            int h) {
    const int b = valid[r] / len, i = valid[r] % len;
    const index_t start = r - i;
    const int n = cu_seqlens[b + 1] - cu_seqlens[b];
    return start * heads + (index_t)h * n + i;
}

// heads[head_row(r, h), c] = fp16(rows[r, col + h · 64 + c] + bias[h · 64 + c]) for 64-wide heads; bias may
// be null. `stride` is the row length of `rows` (3 · d_model for the QKV projection, with col selecting Q, K
// or V). The forward adds the QKV bias here, as nothing else touches the projection.
extern "C" __global__ void rows_to_heads(f16* __restrict__ heads, const f16* __restrict__ rows,
                                         const float* __restrict__ bias, const int* __restrict__ valid,
                                         const int* __restrict__ cu_seqlens, int n_rows, int n_heads, int len,
                                         int stride, int col) {
    const int chunks = n_heads * 8;
    const index_t total = (index_t)n_rows * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total; j += (index_t)gridDim.x * blockDim.x) {
        const index_t r = j / chunks;
        const int h = (int)(j % chunks) / 8, c = (int)(j % 8) * 8;
        float v[8];
        load8_f16(rows + r * stride + col + h * 64 + c, v);
        if (bias) {
            float b[8];
            load8_f32(bias + h * 64 + c, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += b[k];
        }
        store8_f16(heads + head_row(valid, cu_seqlens, len, n_heads, r, h) * 64 + c, v);
    }
}

// rows[r, col + h · 64 + c] = heads[head_row(r, h), c]: the inverse permute, without a bias.
extern "C" __global__ void heads_to_rows(f16* __restrict__ rows, const f16* __restrict__ heads,
                                         const int* __restrict__ valid, const int* __restrict__ cu_seqlens,
                                         int n_rows, int n_heads, int len, int stride, int col) {
    const int chunks = n_heads * 8;
    const index_t total = (index_t)n_rows * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total; j += (index_t)gridDim.x * blockDim.x) {
        const index_t r = j / chunks;
        const int h = (int)(j % chunks) / 8, c = (int)(j % 8) * 8;
        *reinterpret_cast<uint4*>(rows + r * stride + col + h * 64 + c) =
            *reinterpret_cast<const uint4*>(heads + head_row(valid, cu_seqlens, len, n_heads, r, h) * 64 + c);
    }
}
