// The optimiser step of mixed-precision training (SPEC §4.3), over every parameter at once: one flat fp32
// buffer of master weights with its fp32 moments m and v and fp32 gradients (of the loss times the loss
// scale), and the fp16 copy of the weights the next forward reads.
//
//     grad_sumsq       pass 1: Σ g² per block, in f64                          → partials[gridDim.x]
//     grad_norm_finish pass 2: one block; the unscaled global norm, whether the step overflowed, and the
//                      clipping factor                                       → stats[3]
//     adam_update      the update of src/train/optim.rs, skipped entirely when stats says so
//
// stats stays on the device, so a whole step can be captured in a CUDA graph with no host round trip; the
// host reads it with the loss, to log the norm and to grow or back off the loss scale. The scalars that
// change from one update to the next (the loss scale, the learning rate, the bias corrections) are read from
// `step` in device memory, not passed as arguments, which a graph would freeze at its capture.
#include "common.cuh"

#define ADAM_NORM_THREADS 256

// Where the optimiser's per-step figures live in `stats`.
#define STAT_NORM 0
#define STAT_COEF 1
#define STAT_SKIP 2

// Where the update's scalars live in `step` (the host forms them: src/cuda/train_ops.rs AdamStep::scalars).
#define STEP_INV_SCALE 0
#define STEP_DECAY 1
#define STEP_NEG_STEP 2
#define STEP_BC2_SQRT 3

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Block sum in a fixed order, to thread 0. blockDim.x == ADAM_NORM_THREADS.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double scratch[ADAM_NORM_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < ADAM_NORM_THREADS / 32; ++w) s += scratch[w];
    return s;
}

// Squares summed in f64: exact for every fp32 product, so the only rounding is the order of the sums, and a
// gradient too large for fp16 or fp32 squares still gives a finite sum unless it is inf or NaN itself.
extern "C" __global__ void __launch_bounds__(ADAM_NORM_THREADS)
    grad_sumsq(double* __restrict__ partials, const float* __restrict__ grads, index_t n) {
    double s = 0.0;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const double g = grads[i];
        s += g * g;
    }
    s = block_sum_f64(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block of ADAM_NORM_THREADS. norm = √(Σ partials) · inv_scale (exact when the loss scale is a power of
// two, whose inverse fp32 holds exactly); the step is skipped when the norm is not finite (an fp16 overflow somewhere in the backward). With
// max_norm > 0 the factor is clip_grad_norm_'s, formed in fp32 as src/train/optim.rs forms it:
// (1 / (norm + 1e-6)) · max_norm, applied only when below 1.
extern "C" __global__ void __launch_bounds__(ADAM_NORM_THREADS)
    grad_norm_finish(float* __restrict__ stats, const double* __restrict__ partials, int blocks,
                     const float* __restrict__ step, float max_norm) {
    double s = 0.0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[b];
    s = block_sum_f64(s);
    if (threadIdx.x != 0) return;
    const float norm = (float)(sqrt(s) * (double)step[STEP_INV_SCALE]);
    const bool finite = isfinite(norm);
    float coef = 1.0f;
    if (finite && max_norm > 0.0f) {
        const float c = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(norm, 1e-6f)), max_norm);
        if (c < 1.0f) coef = c;
    }
    stats[STAT_NORM] = norm;
    stats[STAT_COEF] = coef;
    stats[STAT_SKIP] = finite ? 0.0f : 1.0f;
}

// Per element, in the order of src/train/optim.rs (the host forms the scalars in f64 and rounds them to
// fp32 as it does; inv_scale, decay, neg_step and bc2_sqrt come from `step`), with every operation rounded where the reference rounds it: no contraction into fused
// multiply-adds other than the two the reference fuses, so the result is the CPU's bit for bit.
//     g  = (grad · inv_scale) · coef
//     p  = p · decay                              decay = 1 − lr·wd
//     m  = fma(w1, g − m, m)   or fma(w1 − 1, g − m, g) when w1 ≥ 0.5
//     v  = fma(w2 · g, g, v · beta2)
//     p  = p + neg_step · m / (√v / bc2_sqrt + eps),   p16 = fp16(p)
extern "C" __global__ void adam_update(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                       f16* __restrict__ p16, const float* __restrict__ grads,
                                       const float* __restrict__ stats, const float* __restrict__ step, index_t n,
                                       float w1, float beta2, float w2, float eps) {
    if (stats[STAT_SKIP] != 0.0f) return;
    const float coef = stats[STAT_COEF];
    const float inv_scale = step[STEP_INV_SCALE], decay = step[STEP_DECAY];
    const float neg_step = step[STEP_NEG_STEP], bc2_sqrt = step[STEP_BC2_SQRT];
    const bool small_w1 = w1 < 0.5f;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += (index_t)gridDim.x * blockDim.x) {
        const float g = __fmul_rn(__fmul_rn(grads[i], inv_scale), coef);
        float pi = __fmul_rn(p[i], decay);
        float mi = m[i];
        const float diff = __fsub_rn(g, mi);
        mi = small_w1 ? __fmaf_rn(w1, diff, mi) : __fmaf_rn(w1 - 1.0f, diff, g);
        const float vi = __fmaf_rn(__fmul_rn(w2, g), g, __fmul_rn(v[i], beta2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        p16[i] = f32_to_f16(pi);
    }
}
