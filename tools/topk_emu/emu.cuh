// CPU emulation of the CUDA built-ins kernels/topk.cu uses (tools/topk_emu/run.sh copies this file as
// common.cuh beside the kernel): one block at a time, its threads as cooperative fibers (ucontext), switched only
// at barriers and warp operations, in a shuffled order each round, so that a missing barrier can show as a wrong
// result.
#pragma once
#include <ucontext.h>
#include <vector>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <random>
#include <functional>
using std::min;
using std::max;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
struct dim3e { unsigned x = 0, y = 0, z = 0; };
struct float4 { float x, y, z, w; } __attribute__((aligned(16)));
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
typedef long long index_t;
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float nan_f32() { return __uint_as_float(0x7fc00000u); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

namespace emu {
struct Fiber { ucontext_t ctx; dim3e tid; bool done = false; std::vector<char> stack; };
inline std::vector<Fiber> fibers;
inline int cur = 0;
inline ucontext_t main_ctx;
inline dim3e block_idx, block_dim, grid_dim;
inline std::mt19937 order_rng(1);
inline std::function<void()> body;
inline int bar_count = 0, bar_gen = 0, bar_acc = 0, bar_result = 0;
inline int wbar_count[32], wbar_gen[32];
inline unsigned wslot[32][32];
inline std::vector<unsigned char> smem;
inline void yield() { swapcontext(&fibers[cur].ctx, &main_ctx); }
inline void entry() { body(); fibers[cur].done = true; }
inline int block_sync(int p) {
    int gen = bar_gen;
    if (p) bar_acc = 1;
    if (++bar_count == (int)block_dim.x) { bar_count = 0; bar_result = bar_acc; bar_acc = 0; bar_gen++; }
    else while (bar_gen == gen) yield();
    return bar_result;
}
inline void warp_sync() {
    int w = fibers[cur].tid.x / 32;
    int gen = wbar_gen[w];
    if (++wbar_count[w] == 32) { wbar_count[w] = 0; wbar_gen[w]++; }
    else while (wbar_gen[w] == gen) yield();
}
inline unsigned exchange(unsigned v, int src_of_lane_fn_src, bool valid) {
    int t = fibers[cur].tid.x, w = t / 32;
    wslot[w][t % 32] = v;
    warp_sync();
    unsigned r = valid ? wslot[w][src_of_lane_fn_src] : v;
    warp_sync();
    return r;
}
// Runs `kernel` over the grid, one block at a time.
inline void launch(dim3e grid, unsigned threads, size_t shared, std::function<void()> kernel) {
    grid_dim = grid; block_dim = {threads, 1, 1};
    smem.assign(shared + 64, 0xcd);
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = {bx, by, 0};
            body = kernel;
            fibers.assign(threads, Fiber{});
            for (unsigned t = 0; t < threads; ++t) {
                Fiber& f = fibers[t];
                f.tid = {t, 0, 0};
                f.stack.resize(256 * 1024);
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data();
                f.ctx.uc_stack.ss_size = f.stack.size();
                f.ctx.uc_link = &main_ctx;
                makecontext(&f.ctx, entry, 0);
            }
            std::vector<int> order(threads);
            for (unsigned t = 0; t < threads; ++t) order[t] = t;
            while (true) {
                std::shuffle(order.begin(), order.end(), order_rng);
                bool any = false;
                for (int t : order) {
                    if (fibers[t].done) continue;
                    any = true;
                    cur = t;
                    swapcontext(&main_ctx, &fibers[t].ctx);
                }
                if (!any) break;
            }
            if (bar_count != 0) { fprintf(stderr, "a barrier was left waiting\n"); abort(); }
        }
}
}  // namespace emu

#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::smem.data())
#define threadIdx (emu::fibers[emu::cur].tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
inline void __syncthreads() { emu::block_sync(0); }
inline int __syncthreads_or(int p) { return emu::block_sync(p); }
inline void __syncwarp() { emu::warp_sync(); }
inline unsigned __shfl_sync(unsigned, unsigned v, int src) { return emu::exchange(v, src & 31, true); }
inline unsigned __shfl_up_sync(unsigned, unsigned v, unsigned delta) {
    int lane = threadIdx.x % 32;
    return emu::exchange(v, lane - (int)delta, lane >= (int)delta);
}
inline unsigned __ballot_sync(unsigned, int p) {
    int t = threadIdx.x, w = t / 32;
    emu::wslot[w][t % 32] = p ? 1u : 0u;
    emu::warp_sync();
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= emu::wslot[w][l] << l;
    emu::warp_sync();
    return r;
}
inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }
