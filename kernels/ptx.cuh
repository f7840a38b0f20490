// Every inline PTX instruction the kernels use, and the two declarations whose CUDA spelling plain C++
// lacks. No CUDA header is included: NVRTC as the Python package index ships it (nvidia-cuda-nvrtc-cu12)
// comes without cuda_fp16.h or mma.h, and the kernels must compile with it alone. So half precision is
// plain 16-bit storage converted with single PTX instructions, and the tensor-core fragments are the PTX
// `wmma` instructions themselves, which also pins down exactly what runs on sm_70 (no bf16 arithmetic, no
// cp.async, no ldmatrix).
//
// tools/cuda_emu/ptx.cuh is this header for the CPU emulator: the same names, in plain C++. A function
// added here needs its emulated twin there.
#pragma once

// IEEE binary16 and bfloat16 bit patterns. Storage only: every kernel computes in fp32.
typedef unsigned short f16;
typedef unsigned short bf16;

// The block's dynamic shared memory, as `type* name`, 128-byte aligned.
#define DYNAMIC_SHARED(type, name)                                  \
    extern __shared__ __align__(128) unsigned char name##_bytes[]; \
    type* name = reinterpret_cast<type*>(name##_bytes)

// Bytes of dynamic shared memory the launch granted.
__device__ __forceinline__ unsigned dynamic_smem_size() {
    unsigned granted;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(granted));
    return granted;
}

__device__ __forceinline__ float f16_to_f32(f16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even; values beyond ±65504 become ±inf, as a PyTorch .half() does.
__device__ __forceinline__ f16 f32_to_f16(float f) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Tensor cores through the PTX wmma instructions (m16n16k16, fp16 inputs, fp32 accumulators), which sm_70
// has; the attention kernels (attention.cu, masked_attention.cu) use them.
// Fragments of one 16×16×16 product as the wmma instructions hold them: A and B as eight registers of two
// packed halves, the accumulator as eight floats. Which element a register holds is the hardware's
// business: kernels only zero, load, multiply and store fragments, through the functions below.
struct FragA { unsigned r[8]; };
struct FragB { unsigned r[8]; };
struct FragC { float r[8]; };

__device__ __forceinline__ void zero_c(FragC& c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c.r[e] = 0.0f;
}

// c += a·x element by element. Accumulator fragments of one shape hold their elements alike, so this needs
// no knowledge of which element a register holds.
__device__ __forceinline__ void axpy_c(FragC& c, float a, const FragC& x) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c.r[e] = fmaf(a, x.r[e], c.r[e]);
}

// Loads and stores take generic addresses (shared memory here), 32-byte aligned, with the leading
// dimension in elements (a multiple of 8 for fp16, of 4 for fp32). The "memory" clobber orders them with
// the ordinary shared-memory accesses around them.
__device__ __forceinline__ void load_a_row(FragA& a, const f16* p, int ld) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3]), "=r"(a.r[4]), "=r"(a.r[5]),
                   "=r"(a.r[6]), "=r"(a.r[7])
                 : "l"(p), "r"(ld)
                 : "memory");
}

__device__ __forceinline__ void load_b_col(FragB& b, const f16* p, int ld) {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : "=r"(b.r[0]), "=r"(b.r[1]), "=r"(b.r[2]), "=r"(b.r[3]), "=r"(b.r[4]), "=r"(b.r[5]),
                   "=r"(b.r[6]), "=r"(b.r[7])
                 : "l"(p), "r"(ld)
                 : "memory");
}

__device__ __forceinline__ void load_b_row(FragB& b, const f16* p, int ld) {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : "=r"(b.r[0]), "=r"(b.r[1]), "=r"(b.r[2]), "=r"(b.r[3]), "=r"(b.r[4]), "=r"(b.r[5]),
                   "=r"(b.r[6]), "=r"(b.r[7])
                 : "l"(p), "r"(ld)
                 : "memory");
}

__device__ __forceinline__ void load_c_row(FragC& c, const float* p, int ld) {
    asm volatile("wmma.load.c.sync.aligned.row.m16n16k16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : "=f"(c.r[0]), "=f"(c.r[1]), "=f"(c.r[2]), "=f"(c.r[3]), "=f"(c.r[4]), "=f"(c.r[5]),
                   "=f"(c.r[6]), "=f"(c.r[7])
                 : "l"(p), "r"(ld)
                 : "memory");
}

__device__ __forceinline__ void store_d_row(float* p, const FragC& d, int ld) {
    asm volatile("wmma.store.d.sync.aligned.row.m16n16k16.f32 [%0], {%1,%2,%3,%4,%5,%6,%7,%8}, %9;"
                 :
                 : "l"(p), "f"(d.r[0]), "f"(d.r[1]), "f"(d.r[2]), "f"(d.r[3]), "f"(d.r[4]), "f"(d.r[5]),
                   "f"(d.r[6]), "f"(d.r[7]), "r"(ld)
                 : "memory");
}

// c += a·b with A row-major and B column-major (S = Q·Kᵀ: K's rows are Bᵀ's columns).
__device__ __forceinline__ void mma_row_col(FragC& c, const FragA& a, const FragB& b) {
    asm volatile(
        "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
        "{%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19,%20,%21,%22,%23}, {%0,%1,%2,%3,%4,%5,%6,%7};"
        : "+f"(c.r[0]), "+f"(c.r[1]), "+f"(c.r[2]), "+f"(c.r[3]), "+f"(c.r[4]), "+f"(c.r[5]), "+f"(c.r[6]),
          "+f"(c.r[7])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(a.r[4]), "r"(a.r[5]), "r"(a.r[6]), "r"(a.r[7]),
          "r"(b.r[0]), "r"(b.r[1]), "r"(b.r[2]), "r"(b.r[3]), "r"(b.r[4]), "r"(b.r[5]), "r"(b.r[6]), "r"(b.r[7]));
}

// c += a·b with both row-major (O += P·V).
__device__ __forceinline__ void mma_row_row(FragC& c, const FragA& a, const FragB& b) {
    asm volatile(
        "wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
        "{%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19,%20,%21,%22,%23}, {%0,%1,%2,%3,%4,%5,%6,%7};"
        : "+f"(c.r[0]), "+f"(c.r[1]), "+f"(c.r[2]), "+f"(c.r[3]), "+f"(c.r[4]), "+f"(c.r[5]), "+f"(c.r[6]),
          "+f"(c.r[7])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(a.r[4]), "r"(a.r[5]), "r"(a.r[6]), "r"(a.r[7]),
          "r"(b.r[0]), "r"(b.r[1]), "r"(b.r[2]), "r"(b.r[3]), "r"(b.r[4]), "r"(b.r[5]), "r"(b.r[6]), "r"(b.r[7]));
}
