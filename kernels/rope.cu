// Rotary position embeddings, rotate-half style (Llama, Baichuan2): within a head of size dh, dimension
// i < dh/2 pairs with i + dh/2 and both turn by the angle pos · θ^(-2i/dh).
#include "common.cuh"

// table[p · half + i] = (cos, sin) of the angle of position p and pair i, for p < positions, i < half.
// The angle is formed in fp32 as the reference code forms it: inv_freq = 1 / θ^(2i/dh), then pos · inv_freq
// rounded to fp32. sincosf (not __sincosf) keeps the full-range accuracy that positions in the hundreds
// of radians need. Built once when a model is loaded.
extern "C" __global__ void rope_table(float2* __restrict__ table, int positions, int half, float theta) {
    const index_t total = (index_t)positions * half;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total;
         j += (index_t)gridDim.x * blockDim.x) {
        const int p = (int)(j / half), i = (int)(j % half);
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)(2 * half));
        const float angle = (float)p * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        table[j] = make_float2(c, s);
    }
}

// Rotates, in place, the first `heads` head-sized slices of every row of x (rows of row_len halves); row t
// is at position positions[t]. On the packed [T, 3D] Q | K | V matrix, heads = 2H turns Q and K in one
// pass and leaves V alone. Rotation in fp32, one rounding to fp16 per value.
//
// head_dim % 16 == 0 and row_len % 8 == 0: each thread turns 8 consecutive pairs, loading both halves of
// the pairs with 16-byte accesses. A position past the table yields NaN rather than an out-of-range read.
extern "C" __global__ void rope_apply(f16* __restrict__ x, const float2* __restrict__ table,
                                      const int* __restrict__ positions, int tokens, int heads, int head_dim,
                                      int row_len, int table_positions) {
    const int half = head_dim / 2, chunks = half / 8;
    const index_t total = (index_t)tokens * heads * chunks;
    for (index_t j = blockIdx.x * (index_t)blockDim.x + threadIdx.x; j < total;
         j += (index_t)gridDim.x * blockDim.x) {
        const index_t t = j / (heads * chunks);
        const int r = (int)(j % (heads * chunks));
        const int h = r / chunks, c = (r % chunks) * 8;
        f16* lo = x + t * row_len + h * head_dim + c;
        f16* hi = lo + half;
        float a[8], b[8];
        load8_f16(lo, a);
        load8_f16(hi, b);
        const int pos = positions[t];
        if (pos >= 0 && pos < table_positions) {
            const float2* cs = table + (index_t)pos * half + c;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float2 e = cs[k];
                const float x0 = a[k], x1 = b[k];
                a[k] = x0 * e.x - x1 * e.y;
                b[k] = x1 * e.x + x0 * e.y;
            }
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = b[k] = nan_f32();
        }
        store8_f16(lo, a);
        store8_f16(hi, b);
    }
}
