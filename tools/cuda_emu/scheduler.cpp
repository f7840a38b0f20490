// Runs a grid on the CPU: blocks one after another, each block's threads as fibers on the calling OS
// thread. A fiber runs until it waits (a barrier, a warp operation) or returns; the scheduler then resumes
// the others in a shuffled order, round after round, until every thread of the block has returned. A round
// in which nobody got past a barrier is a deadlock (threads waiting at different barriers), reported as a
// trap like a `__trap()` in the kernel.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "emu.h"
#include "runtime.h"

namespace emu {
uint3e thread_idx, block_idx, block_dim, grid_dim;
unsigned char* dynamic_smem;
unsigned dynamic_smem_bytes;

namespace {
// A fiber's stack: big enough for a kernel's per-thread arrays, with a guard page below it so an
// overflow faults instead of corrupting its neighbour.
constexpr size_t STACK_BYTES = 256 << 10;

extern "C" void emu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp, loads
// load_sp and restores the registers saved there (System V x86-64).
asm(R"(
    .text
    .p2align 4
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

struct Fiber {
    void* sp = nullptr;
    uint3e tid{};
    unsigned warp = 0, lane = 0;
    bool done = false;
};

struct Block {
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    int current = -1;
    const Kernel* kernel = nullptr;
    void* args = nullptr;
    int live = 0;
    // Block barrier, and the call site the waiting threads reached it from.
    int arrived = 0, accumulated = 0, result = 0;
    unsigned generation = 0;
    Site site{};
    // Warp barriers and the slots lanes exchange values through.
    std::vector<int> warp_live, warp_arrived;
    std::vector<unsigned> warp_generation;
    std::vector<Site> warp_site;
    std::vector<unsigned long long> slots;
    std::vector<unsigned> warp_led;  // the warp generation whose leader has been chosen, plus one
    std::vector<std::vector<unsigned char>> warp_buffers;
    unsigned long long progress = 0;
    bool trapped = false;
};

Block block;

// The static shared variables of every kernel (runtime.h puts them in this section; the linker names its
// bounds).
extern "C" unsigned char __start_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_shared[] __attribute__((weak));
std::mt19937 order(12345);
std::vector<char*> stack_pool;

char* stack_for(size_t index) {
    while (stack_pool.size() <= index) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("cuda emulator: mapping a fiber stack");
            abort();
        }
        mprotect(p, page, PROT_NONE);
        stack_pool.push_back(static_cast<char*>(p) + page);
    }
    return stack_pool[index];
}

Fiber& me() { return block.fibers[block.current]; }

void yield() { emu_switch(&me().sp, block.scheduler_sp); }

void release_block_barrier() {
    block.arrived = 0;
    block.result = block.accumulated;
    block.accumulated = 0;
    block.generation++;
    block.progress++;
}

void release_warp_barrier(unsigned w) {
    block.warp_arrived[w] = 0;
    block.warp_generation[w]++;
    block.progress++;
}

[[noreturn]] void fiber_main() {
    block.kernel->run(block.kernel->function, block.args);
    Fiber& f = me();
    f.done = true;
    block.live--;
    block.warp_live[f.warp]--;
    block.progress++;
    // A returned thread no longer holds anyone up.
    if (block.arrived > 0 && block.arrived == block.live) release_block_barrier();
    if (block.warp_arrived[f.warp] > 0 && block.warp_arrived[f.warp] == block.warp_live[f.warp])
        release_warp_barrier(f.warp);
    void* dead;
    emu_switch(&dead, block.scheduler_sp);
    __builtin_unreachable();
}

void start(Fiber& f, char* stack) {
    // The initial frame emu_switch pops: six registers, then fiber_main as the return address, above it a
    // null return address for fiber_main itself (which never returns), 16-byte aligned as a call leaves it.
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + STACK_BYTES) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;
    f.sp = sp;
}

bool same(const Site& a, const Site& b) {
    return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0);
}

// Threads that wait together must wait at the same place.
void check_site(Site& expected, const Site& site, int arrived, const char* what) {
    if (arrived == 0) {
        expected = site;
    } else if (!same(expected, site)) {
        char why[512];
        snprintf(why, sizeof why, "%s (%s:%d and %s:%d)", what, expected.file, expected.line, site.file, site.line);
        trap(why);
    }
}

void warp_arrive(const Site& site) {
    const unsigned w = me().warp, generation = block.warp_generation[w];
    check_site(block.warp_site[w], site, block.warp_arrived[w], "lanes of one warp wait at different operations");
    if (++block.warp_arrived[w] == block.warp_live[w]) {
        release_warp_barrier(w);
    } else {
        while (block.warp_generation[w] == generation) yield();
    }
}
}  // namespace

int block_barrier(int predicate, Site site) {
    const unsigned generation = block.generation;
    check_site(block.site, site, block.arrived, "threads of one block wait at different __syncthreads");
    if (predicate) block.accumulated = 1;
    if (++block.arrived == block.live) {
        release_block_barrier();
    } else {
        while (block.generation == generation) yield();
    }
    return block.result;
}

void warp_barrier(Site site) { warp_arrive(site); }

unsigned long long warp_exchange(unsigned long long value, int src, Site site) {
    const unsigned w = me().warp;
    block.slots[w * 32 + me().lane] = value;
    warp_arrive(site);
    const unsigned long long out = src >= 0 && src < 32 ? block.slots[w * 32 + src] : value;
    warp_arrive(site);
    return out;
}

unsigned warp_ballot(int predicate, Site site) {
    const unsigned w = me().warp;
    block.slots[w * 32 + me().lane] = predicate ? 1 : 0;
    warp_arrive(site);
    unsigned bits = 0;
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned t = w * 32 + lane;
        if (t < block.fibers.size() && !block.fibers[t].done && block.slots[t]) bits |= 1u << lane;
    }
    warp_arrive(site);
    return bits;
}

bool warp_leader() {
    const unsigned w = me().warp;
    if (block.warp_led[w] == block.warp_generation[w] + 1) return false;
    block.warp_led[w] = block.warp_generation[w] + 1;
    return true;
}

void* warp_scratch(size_t bytes) {
    std::vector<unsigned char>& buffer = block.warp_buffers[me().warp];
    if (buffer.size() < bytes) buffer.resize(bytes);
    return buffer.data();
}

[[noreturn]] void trap(const char* why) {
    fprintf(stderr, "cuda emulator: %s in kernel %s, block (%u, %u, %u), thread (%u, %u, %u)\n", why,
            block.kernel->name, block_idx.x, block_idx.y, block_idx.z, thread_idx.x, thread_idx.y, thread_idx.z);
    block.trapped = true;
    void* dead;
    emu_switch(&dead, block.scheduler_sp);
    __builtin_unreachable();
}

bool run_grid(const Kernel& kernel, const Grid& g, void* args) {
    const unsigned threads = g.block[0] * g.block[1] * g.block[2];
    const unsigned warps = (threads + 31) / 32;
    std::vector<unsigned char> shared(g.shared + 128);
    unsigned char* aligned = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared.data()) + 127) & ~uintptr_t(127));
    grid_dim = {g.grid[0], g.grid[1], g.grid[2]};
    block_dim = {g.block[0], g.block[1], g.block[2]};
    block.kernel = &kernel;
    block.args = args;
    std::vector<unsigned> schedule(threads);
    for (unsigned bz = 0; bz < g.grid[2]; ++bz)
        for (unsigned by = 0; by < g.grid[1]; ++by)
            for (unsigned bx = 0; bx < g.grid[0]; ++bx) {
                block_idx = {bx, by, bz};
                // Shared memory starts as garbage on a GPU: NaN bytes here, so reading it unwritten shows.
                memset(aligned, 0xff, g.shared);
                if (__start_emu_shared != nullptr) memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
                dynamic_smem = aligned;
                dynamic_smem_bytes = g.shared;
                block.fibers.assign(threads, Fiber{});
                block.live = (int)threads;
                block.arrived = block.accumulated = block.result = 0;
                block.warp_live.assign(warps, 0);
                block.warp_arrived.assign(warps, 0);
                block.warp_generation.assign(warps, 0);
                block.warp_site.assign(warps, Site{});
                block.slots.assign(warps * 32, 0);
                block.warp_led.assign(warps, 0);
                block.warp_buffers.resize(warps);
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = block.fibers[t];
                    f.tid = {t % g.block[0], (t / g.block[0]) % g.block[1], t / (g.block[0] * g.block[1])};
                    f.warp = t / 32;
                    f.lane = t % 32;
                    block.warp_live[f.warp]++;
                    start(f, stack_for(t));
                    schedule[t] = t;
                }
                while (block.live > 0) {
                    std::shuffle(schedule.begin(), schedule.end(), order);
                    const unsigned long long before = block.progress;
                    for (unsigned t : schedule) {
                        if (block.fibers[t].done) continue;
                        block.current = (int)t;
                        thread_idx = block.fibers[t].tid;
                        emu_switch(&block.scheduler_sp, block.fibers[t].sp);
                        if (block.trapped) {
                            block.trapped = false;
                            return false;
                        }
                    }
                    if (block.live > 0 && block.progress == before) {
                        fprintf(stderr,
                                "cuda emulator: deadlock in kernel %s, block (%u, %u, %u): %d threads wait at "
                                "different barriers\n",
                                kernel.name, bx, by, bz, block.live);
                        return false;
                    }
                }
            }
    return true;
}
}  // namespace emu
