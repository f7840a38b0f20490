// Weights on load: checkpoints hold bf16 (Baichuan2 ships bf16), f16 or f32; the engine computes with fp16
// (the V100 has no bf16). Also the random weights `bench` makes on the device.
#include "common.cuh"

// out[i] = fp16(in[i]). A finite value that rounds to ±inf (|x| > 65504) sets *overflow, so the loader can
// name the tensor instead of running a model with infinities in it.
extern "C" __global__ void convert_bf16_f16(f16* __restrict__ out, const bf16* __restrict__ in, index_t n,
                                            unsigned* __restrict__ overflow) {
    bool over = false;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const float v = bf16_to_f32(in[i]);
        const f16 h = f32_to_f16(v);
        over |= (h & 0x7fffu) == 0x7c00u && fabsf(v) <= 3.4028235e38f;
        out[i] = h;
    }
    if (over) atomicOr(overflow, 1u);
}

extern "C" __global__ void convert_f32_f16(f16* __restrict__ out, const float* __restrict__ in, index_t n,
                                           unsigned* __restrict__ overflow) {
    bool over = false;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const float v = in[i];
        const f16 h = f32_to_f16(v);
        over |= (h & 0x7fffu) == 0x7c00u && fabsf(v) <= 3.4028235e38f;
        out[i] = h;
    }
    if (over) atomicOr(overflow, 1u);
}

// SplitMix64: a counter-based generator, so element i's value depends only on (seed, i), whatever the grid.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// out[i] = fp16(centre + spread · u), u uniform in [-0.5, 0.5): random weights made on the device, so a 7B
// benchmark needs no 14 GB file.
extern "C" __global__ void fill_uniform_f16(f16* __restrict__ out, index_t n, unsigned long long seed, float centre,
                                            float spread) {
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const unsigned long long r = splitmix64(seed ^ splitmix64((unsigned long long)i));
        const float u = (float)(r >> 40) * (1.0f / 16777216.0f) - 0.5f;
        out[i] = f32_to_f16(centre + spread * u);
    }
}

// The same generator into fp32 (norm weights stay fp32 on the device).
extern "C" __global__ void fill_uniform_f32(float* __restrict__ out, index_t n, unsigned long long seed, float centre,
                                            float spread) {
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const unsigned long long r = splitmix64(seed ^ splitmix64((unsigned long long)i));
        out[i] = centre + spread * ((float)(r >> 40) * (1.0f / 16777216.0f) - 0.5f);
    }
}
