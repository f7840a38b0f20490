// Helpers shared by every kernel file, written in CUDA C++ alone: every inline PTX instruction the kernels
// use is in ptx.cuh, the one header the CPU emulator of tools/cuda_emu replaces.
#pragma once

#include "ptx.cuh"

// bf16 is the top half of an fp32: widening is a shift, exact.
__device__ __forceinline__ float bf16_to_f32(bf16 b) { return __uint_as_float(((unsigned)b) << 16); }

__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
    return (unsigned)f32_to_f16(lo) | ((unsigned)f32_to_f16(hi) << 16);
}

// Eight consecutive halves through one 16-byte access; `p` must be 16-byte aligned.
__device__ __forceinline__ void load8_f16(const f16* p, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = f16_to_f32((f16)(w[k] & 0xffffu));
        v[2 * k + 1] = f16_to_f32((f16)(w[k] >> 16));
    }
}

__device__ __forceinline__ void store8_f16(f16* p, const float v[8]) {
    uint4 u;
    u.x = pack_f16x2(v[0], v[1]);
    u.y = pack_f16x2(v[2], v[3]);
    u.z = pack_f16x2(v[4], v[5]);
    u.w = pack_f16x2(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
}

// Eight consecutive floats through two 16-byte accesses; `p` must be 16-byte aligned.
__device__ __forceinline__ void load8_f32(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void store8_f32(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// The rows [first, last) of block blockIdx.x of a two-pass reduction over rows split in two parts, [0, split)
// and [split, rows), each in blocks of its own (per_a and per_b rows): the two towers of a training pass,
// so that padding either one moves no real row into another block. One part: split = rows.
__device__ __forceinline__ void reduction_rows(int rows, int split, int per_a, int per_b, int& first, int& last) {
    const int blocks_a = (split + per_a - 1) / per_a;
    const int x = blockIdx.x;
    if (x < blocks_a) {
        first = x * per_a;
        last = min(first + per_a, split);
    } else {
        first = split + (x - blocks_a) * per_b;
        last = min(first + per_b, rows);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block, returned to every thread, in a fixed order (so runs repeat bit for bit).
// blockDim.x must be a multiple of 32; `scratch` is 32 floats of shared memory. The leading barrier lets a
// block call this in a loop: no warp overwrites `scratch` while another still reads the previous sum.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

// A quiet NaN: what a kernel writes where its input is out of range, so a poisoned-output test or the
// host's finiteness check sees it instead of reading memory it must not.
__device__ __forceinline__ float nan_f32() { return __uint_as_float(0x7fc00000u); }

// Grid-stride loop index type: element counts of a batch exceed 2^31 (8192 tokens × 2 × 11008).
typedef long long index_t;

// Rows row0 .. row0 + ROWS of one head's HD columns, from rows of `stride` halves at `base`, into shared
// memory with leading dimension ld. Rows at or past n are zero-filled: a masked probability is exactly 0,
// but 0 · (a NaN left in shared memory) would still be NaN.
template <int ROWS, int HD>
__device__ __forceinline__ void load_tile(f16* dst, int ld, const f16* __restrict__ base, int stride, int row0,
                                          int n) {
    constexpr int CHUNKS = HD / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += blockDim.x) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < n) v = *reinterpret_cast<const uint4*>(base + (index_t)(row0 + r) * stride + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
}

