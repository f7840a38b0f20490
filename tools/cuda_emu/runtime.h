// The CUDA C++ a kernel file sees, for plain C++ on the CPU: thread and block indices, barriers, warp
// shuffles and votes, atomics, vector types and the intrinsics kernels/*.cu use. build.sh force-includes
// it in front of every kernel file.
//
// A block runs at a time. Its threads are fibers on one OS thread, switched only where CUDA makes threads
// wait for each other (block barriers, warp operations, tensor-core instructions), and in a fresh shuffled
// order at every round, so a missing barrier shows as a wrong result more often than not. Blocks run one
// after another, so static `__shared__` variables (function statics here) are the block's shared memory.
// What it cannot show: memory-ordering races between blocks and anything that needs two blocks at once.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __global__
#define __device__ static inline
#define __forceinline__
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3e { unsigned x, y, z; };
struct uint4 { unsigned x, y, z, w; } __attribute__((aligned(16)));
struct int2 { int x, y; } __attribute__((aligned(8)));
struct int4 { int x, y, z, w; } __attribute__((aligned(16)));
struct float2 { float x, y; } __attribute__((aligned(8)));
struct float4 { float x, y, z, w; } __attribute__((aligned(16)));
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

namespace emu {
// The running thread's coordinates, set by the scheduler at every switch (driver.cpp).
extern uint3e thread_idx, block_idx, block_dim, grid_dim;
extern unsigned char* dynamic_smem;
extern unsigned dynamic_smem_bytes;
// Waits at a barrier of the block (or of the calling thread's warp) until every thread still running has
// arrived; threads that have returned count as arrived, as on Volta and later.
int block_barrier(int predicate);
void warp_barrier();
// Publishes 8 bytes for the warp, waits for every lane, and returns lane `src`'s value (the caller's own
// when `src` is out of range).
unsigned long long warp_exchange(unsigned long long value, int src);
// The lanes' predicates, after a warp barrier.
unsigned warp_ballot(int predicate);
[[noreturn]] void trap(const char* why);
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier(0); }
inline int __syncthreads_or(int p) { return emu::block_barrier(p); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
[[noreturn]] inline void __trap() { emu::trap("__trap()"); }

template <class T>
inline T warp_move(T v, int src) {
    static_assert(sizeof(T) <= 8, "a warp shuffle moves 4 or 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = emu::warp_exchange(bits, src);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
inline int lane_id() { return (int)(threadIdx.x % 32); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    return warp_move(v, (lane_id() & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    const int src = lane_id() ^ mask;
    return warp_move(v, (src & ~(width - 1)) == (lane_id() & ~(width - 1)) ? src : lane_id());
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int within = lane_id() & (width - 1);
    return warp_move(v, within >= (int)delta ? lane_id() - (int)delta : lane_id());
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    const int within = lane_id() & (width - 1);
    return warp_move(v, within + (int)delta < width ? lane_id() + (int)delta : lane_id());
}
inline unsigned __ballot_sync(unsigned, int p) { return emu::warp_ballot(p); }
inline int __any_sync(unsigned, int p) { return emu::warp_ballot(p) != 0; }
inline int __all_sync(unsigned m, int p) { return emu::warp_ballot(!p) == 0; }

// Atomics: one OS thread runs every fiber and no fiber is switched inside one, so plain updates are atomic.
template <class T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { T old = *p; *p = std::max(old, v); return old; }
template <class T>
inline T atomicMin(T* p, T v) { T old = *p; *p = std::min(old, v); return old; }
template <class T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <class T>
inline T atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}

inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
// The _rn intrinsics: IEEE round-to-nearest operations the compiler may not contract into an FMA. C++
// never contracts across these calls (build.sh passes -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline void __sincosf(float a, float* s, float* c) { *s = std::sin(a); *c = std::cos(a); }
inline void sincosf(float a, float* s, float* c) { *s = std::sin(a); *c = std::cos(a); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;
