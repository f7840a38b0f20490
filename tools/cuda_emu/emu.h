// What the emulator's parts share: the kernel registry (filled by the kernel files, read by the driver),
// the block scheduler, and the device work queue that driver.cpp and cublas.cpp put work on.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>

namespace emu {

// A kernel as the driver launches it: `capture` copies the arguments out of cuLaunchKernel's `void**`
// (by the kernel's own parameter types), `run` calls the kernel with them in the current thread.
struct Kernel {
    const char* name;
    void* function;
    void* (*capture)(void** params);
    void (*run)(void* function, void* args);
    void (*release)(void* args);
};
void add_kernel(const Kernel& kernel);
const Kernel* find_kernel(const char* name);

struct Grid {
    unsigned grid[3], block[3];
    unsigned shared;
};
// Runs every block of `grid` with `args`; false when a thread trapped (the message is printed).
bool run_grid(const Kernel& kernel, const Grid& grid, void* args);

// Device work: runs in issue order when something waits for it (a stream or event synchronisation, a
// blocking copy), never at the call that queues it, so host code that forgets to wait reads stale data.
using Op = std::function<void()>;
// Queues `op` on `stream`, or adds it to the graph `stream` is capturing. Returns a CUresult.
int enqueue(void* stream, Op op);
// Runs everything queued. Returns a CUresult: the sticky error of a trapped kernel, if any.
int drain();

}  // namespace emu
