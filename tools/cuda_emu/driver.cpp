// libcuda.so for a machine without a GPU: the part of the CUDA driver API the engine (through cudarc)
// uses, over host memory, with the kernels of kernels/*.cu compiled for the CPU (scheduler.cpp).
//
// Device addresses are host addresses. Each allocation ends at a guard page, so a kernel reading or
// writing past the end of a buffer faults (the fault handler names the kernel). Work on streams is queued
// and runs in issue order only when the host waits for it (emu.h), so a missing synchronisation reads
// stale results, and pinned host memory handed to an async copy is read when the copy runs, as on a GPU;
// pageable memory is copied at the call, as the real driver stages it. Stream capture records the queued
// operations, kernel arguments frozen at capture, and a graph launch queues them again. Kernels execute
// one block at a time, so the emulator checks logic and host code, not speed or inter-block races.
//
// The device it pretends to be: `LEARN_KERN_EMU_ARCH` (default 90; 70 for a V100's limits), 8
// multiprocessors, 80 GiB, `LEARN_KERN_EMU_DEVICES` devices (default 1).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

namespace {
enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
};

constexpr size_t TOTAL_MEMORY = 80ull << 30;
constexpr int MULTIPROCESSORS = 8;

std::recursive_mutex api_lock;
#define API std::lock_guard<std::recursive_mutex> guard(api_lock)

int env_int(const char* name, int fallback) {
    const char* v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}
int arch() { return env_int("LEARN_KERN_EMU_ARCH", 90); }
int device_count() { return env_int("LEARN_KERN_EMU_DEVICES", 1); }

// ---- memory ----
struct Allocation {
    char* mapping;
    size_t mapped;
    size_t bytes;
};
std::map<uintptr_t, Allocation> device_allocations;  // by start address
std::map<uintptr_t, size_t> pinned;                  // host allocations: start → bytes
size_t allocated = 0;
const size_t PAGE = (size_t)sysconf(_SC_PAGESIZE);

// A buffer placed so that it ends (rounded up to 256 bytes, the driver's granularity) at a guard page.
CUresult device_alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return INVALID_VALUE;
    const size_t rounded = (std::max<size_t>(bytes, 1) + 255) & ~size_t(255);
    if (allocated + rounded > TOTAL_MEMORY) return OUT_OF_MEMORY;
    const size_t body = (rounded + PAGE - 1) / PAGE * PAGE;
    void* p = mmap(nullptr, body + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return OUT_OF_MEMORY;
    char* mapping = static_cast<char*>(p);
    mprotect(mapping + body, PAGE, PROT_NONE);
    char* start = mapping + body - rounded;
    // New device memory is not zeroed on a GPU either.
    memset(start, 0xa5, rounded);
    device_allocations[reinterpret_cast<uintptr_t>(start)] = {mapping, body + PAGE, rounded};
    allocated += rounded;
    *out = reinterpret_cast<uintptr_t>(start);
    return SUCCESS;
}

bool is_pinned(const void* p, size_t bytes) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = pinned.upper_bound(a);
    if (it == pinned.begin()) return false;
    --it;
    return a >= it->first && a + bytes <= it->first + it->second;
}

// ---- streams, events, graphs ----
struct Graph {
    std::vector<emu::Op> ops;
};
struct Stream {
    Graph* capturing = nullptr;
    bool invalidated = false;
};
struct Event {
    bool recorded = false, completed = false;
    double ms = 0;
};
Stream null_stream;
std::deque<emu::Op> pending;
CUresult sticky = SUCCESS;

double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Stream* stream_of(void* s) { return s ? static_cast<Stream*>(s) : &null_stream; }

// An operation that must not happen while `s` captures (a synchronisation, a pageable copy) breaks the
// capture, as on a GPU.
CUresult refuse_if_capturing(Stream* s) {
    if (!s->capturing) return SUCCESS;
    s->invalidated = true;
    return CAPTURE_UNSUPPORTED;
}

int captures = 0;  // streams capturing now

// ---- contexts ----
struct Context {
    int device;
};
std::vector<Context> contexts(device_count());
thread_local Context* current = nullptr;

// ---- fault reporting ----
const char* running_kernel = nullptr;
void on_fault(int sig, siginfo_t* info, void*) {
    char line[256];
    const int n = snprintf(line, sizeof line, "cuda emulator: %s at address %p%s%s (outside every allocation)\n",
                           sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr,
                           running_kernel ? " in kernel " : "", running_kernel ? running_kernel : "");
    if (n > 0) (void)!write(2, line, (size_t)n);
    signal(sig, SIG_DFL);
    raise(sig);
}
struct InstallFaultHandler {
    InstallFaultHandler() {
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    }
} install_fault_handler;

struct KernelState {
    const emu::Kernel* kernel;
    int max_dynamic_shared = 48 << 10;
};
std::map<std::string, KernelState> functions;
int modules = 0;

int shared_optin() { return arch() >= 90 ? 227 << 10 : arch() >= 80 ? 163 << 10 : 96 << 10; }
}  // namespace

namespace emu {
namespace {
std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> kernels;
    return kernels;
}
}  // namespace
void add_kernel(const Kernel& kernel) { registry()[kernel.name] = kernel; }
const Kernel* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

int enqueue(void* s, Op op) {
    API;
    Stream* stream = stream_of(s);
    if (stream->capturing) {
        stream->capturing->ops.push_back(std::move(op));
    } else {
        pending.push_back(std::move(op));
    }
    return SUCCESS;
}

int drain() {
    API;
    while (!pending.empty()) {
        Op op = std::move(pending.front());
        pending.pop_front();
        if (sticky == SUCCESS) op();
    }
    return sticky;
}
}  // namespace emu

extern "C" {

CUresult cuInit(unsigned) { return SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 12080; return SUCCESS; }
CUresult cuDeviceGetCount(int* n) { *n = device_count(); return SUCCESS; }
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, int d) {
    snprintf(name, (size_t)len, "learn-kern CPU emulator %d (sm_%d)", d, arch());
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = TOTAL_MEMORY; return SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
        case 1: *v = 1024; break;                   // max threads per block
        case 2: *v = 1024; break;                   // max block dim x
        case 3: case 4: *v = attribute == 3 ? 1024 : 64; break;
        case 5: *v = 2147483647; break;             // max grid dim x
        case 6: case 7: *v = 65535; break;
        case 8: *v = 48 << 10; break;               // shared memory per block
        case 10: *v = 32; break;                    // warp size
        case 16: *v = MULTIPROCESSORS; break;
        case 75: *v = arch() / 10; break;           // compute capability major
        case 76: *v = arch() % 10; break;
        case 81: *v = shared_optin() + (1 << 10); break;  // shared memory per multiprocessor
        case 97: *v = shared_optin(); break;        // shared memory per block, opt-in
        default: *v = 0;
    }
    return SUCCESS;
}
CUresult cuDeviceComputeCapability(int* major, int* minor, int) {
    *major = arch() / 10;
    *minor = arch() % 10;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int d) {
    if (d < 0 || d >= device_count()) return INVALID_DEVICE;
    contexts[(size_t)d].device = d;
    *ctx = &contexts[(size_t)d];
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) { current = static_cast<Context*>(ctx); return SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = current; return SUCCESS; }
CUresult cuCtxPushCurrent_v2(void* ctx) { current = static_cast<Context*>(ctx); return SUCCESS; }
CUresult cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = current; return SUCCESS; }
CUresult cuCtxGetDevice(int* d) {
    if (!current) return INVALID_CONTEXT;
    *d = current->device;
    return SUCCESS;
}
CUresult cuCtxSynchronize() {
    API;
    if (captures > 0) return CAPTURE_UNSUPPORTED;
    return emu::drain();
}

const char* error_text(CUresult e) {
    switch (e) {
        case SUCCESS: return "no error";
        case INVALID_VALUE: return "invalid argument";
        case OUT_OF_MEMORY: return "out of memory";
        case LAUNCH_FAILED: return "unspecified launch failure (emulated kernel trapped)";
        case CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
        case CAPTURE_INVALIDATED: return "operation failed due to a previous error during capture";
        case NOT_FOUND: return "named symbol not found";
        case NOT_READY: return "device not ready";
        default: return "emulated driver error";
    }
}
CUresult cuGetErrorString(CUresult e, const char** s) { *s = error_text(e); return SUCCESS; }
CUresult cuGetErrorName(CUresult e, const char** s) { *s = error_text(e); return SUCCESS; }

// ---- memory ----
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { API; return device_alloc(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    API;
    emu::drain();  // freeing waits for the device, as cudaFree does
    auto it = device_allocations.find((uintptr_t)p);
    if (it == device_allocations.end()) return INVALID_VALUE;
    allocated -= it->second.bytes;
    munmap(it->second.mapping, it->second.mapped);
    device_allocations.erase(it);
    return SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    API;
    *free_bytes = TOTAL_MEMORY - allocated;
    *total = TOTAL_MEMORY;
    return SUCCESS;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    API;
    *p = aligned_alloc(4096, (std::max<size_t>(bytes, 1) + 4095) & ~size_t(4095));
    if (!*p) return OUT_OF_MEMORY;
    pinned[reinterpret_cast<uintptr_t>(*p)] = bytes;
    return SUCCESS;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    API;
    emu::drain();
    pinned.erase(reinterpret_cast<uintptr_t>(p));
    free(p);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* s) {
    API;
    if (is_pinned(src, bytes)) {
        return emu::enqueue(s, [=] { memcpy(reinterpret_cast<void*>(dst), src, bytes); });
    }
    if (CUresult e = refuse_if_capturing(stream_of(s))) return e;
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
    return emu::enqueue(s, [=] { memcpy(reinterpret_cast<void*>(dst), staged->data(), bytes); });
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* s) {
    API;
    if (is_pinned(dst, bytes)) {
        return emu::enqueue(s, [=] { memcpy(dst, reinterpret_cast<const void*>(src), bytes); });
    }
    if (CUresult e = refuse_if_capturing(stream_of(s))) return e;
    // Pageable destination: the call returns once the copy is done.
    if (CUresult e = emu::drain()) return e;
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* s) {
    API;
    return emu::enqueue(s, [=] { memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes); });
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    API;
    if (CUresult e = emu::drain()) return e;
    memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    API;
    if (CUresult e = emu::drain()) return e;
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    API;
    if (CUresult e = emu::drain()) return e;
    memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t bytes, void* s) {
    API;
    return emu::enqueue(s, [=] { memset(reinterpret_cast<void*>(dst), value, bytes); });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t bytes) {
    API;
    if (CUresult e = emu::drain()) return e;
    memset(reinterpret_cast<void*>(dst), value, bytes);
    return SUCCESS;
}

// ---- streams and events ----
CUresult cuStreamCreate(void** s, unsigned) { *s = new Stream; return SUCCESS; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { *s = new Stream; return SUCCESS; }
CUresult cuStreamDestroy_v2(void* s) {
    API;
    emu::drain();
    delete static_cast<Stream*>(s);
    return SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
    API;
    if (CUresult e = refuse_if_capturing(stream_of(s))) return e;
    return emu::drain();
}
CUresult cuStreamQuery(void* s) { return cuStreamSynchronize(s); }
// Work runs in issue order, so a wait is already satisfied by the time anything after it runs.
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }

CUresult cuEventCreate(void** e, unsigned) { *e = new Event; return SUCCESS; }
CUresult cuEventDestroy_v2(void* e) {
    API;
    emu::drain();
    delete static_cast<Event*>(e);
    return SUCCESS;
}
CUresult cuEventRecord(void* e, void* s) {
    API;
    Event* event = static_cast<Event*>(e);
    event->recorded = true;
    event->completed = false;
    return emu::enqueue(s, [event] {
        event->ms = now_ms();
        event->completed = true;
    });
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
    API;
    (void)e;
    return emu::drain();
}
CUresult cuEventQuery(void* e) {
    API;
    return static_cast<Event*>(e)->completed || !static_cast<Event*>(e)->recorded ? SUCCESS : NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    API;
    const Event* a = static_cast<Event*>(start);
    const Event* b = static_cast<Event*>(end);
    if (!a->recorded || !b->recorded) return INVALID_HANDLE;
    if (!a->completed || !b->completed) return NOT_READY;
    *ms = (float)(b->ms - a->ms);
    return SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ---- graphs ----
CUresult cuStreamBeginCapture_v2(void* s, int) {
    API;
    Stream* stream = stream_of(s);
    if (!s || stream->capturing) return INVALID_VALUE;
    stream->capturing = new Graph;
    stream->invalidated = false;
    captures++;
    return SUCCESS;
}
CUresult cuStreamEndCapture(void* s, void** graph) {
    API;
    Stream* stream = stream_of(s);
    if (!stream->capturing) return INVALID_VALUE;
    Graph* g = stream->capturing;
    stream->capturing = nullptr;
    captures--;
    if (stream->invalidated) {
        delete g;
        *graph = nullptr;
        return CAPTURE_INVALIDATED;
    }
    *graph = g;
    return SUCCESS;
}
CUresult cuStreamIsCapturing(void* s, int* status) {
    Stream* stream = stream_of(s);
    *status = stream->capturing ? (stream->invalidated ? 2 : 1) : 0;
    return SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    API;
    *exec = new Graph(*static_cast<Graph*>(graph));
    return SUCCESS;
}
CUresult cuGraphLaunch(void* exec, void* s) {
    API;
    if (stream_of(s)->capturing) return NOT_SUPPORTED;
    for (const emu::Op& op : static_cast<Graph*>(exec)->ops) emu::enqueue(s, op);
    return SUCCESS;
}
CUresult cuGraphExecDestroy(void* exec) { API; emu::drain(); delete static_cast<Graph*>(exec); return SUCCESS; }
CUresult cuGraphDestroy(void* graph) { API; delete static_cast<Graph*>(graph); return SUCCESS; }

// ---- modules and launches ----
// Every kernel is compiled in; a module is only a name space to look them up in.
CUresult cuModuleLoadData(void** module, const void*) { API; *module = reinterpret_cast<void*>(uintptr_t(++modules)); return SUCCESS; }
CUresult cuModuleLoadDataEx(void** module, const void* image, unsigned, void*, void*) { return cuModuleLoadData(module, image); }
CUresult cuModuleUnload(void*) { return SUCCESS; }
CUresult cuModuleGetFunction(void** function, void*, const char* name) {
    API;
    const emu::Kernel* kernel = emu::find_kernel(name);
    if (!kernel) return NOT_FOUND;
    KernelState& state = functions[name];
    state.kernel = kernel;
    *function = &state;
    return SUCCESS;
}
CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
    API;
    KernelState* state = static_cast<KernelState*>(function);
    if (attribute == 8) {  // max dynamic shared memory
        if (value < 0 || value > shared_optin()) return INVALID_VALUE;
        state->max_dynamic_shared = value;
    }
    return SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attribute, void* function) {
    const KernelState* state = static_cast<KernelState*>(function);
    switch (attribute) {
        case 0: *v = 1024; break;  // max threads per block
        case 4: *v = 32; break;    // registers
        case 8: *v = state->max_dynamic_shared; break;
        default: *v = 0;
    }
    return SUCCESS;
}
CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* s, void** params, void** extra) {
    API;
    const KernelState* state = static_cast<KernelState*>(function);
    if (!state || extra) return INVALID_VALUE;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || threads > 1024 || gy > 65535 || gz > 65535 || by > 1024 ||
        bz > 64)
        return INVALID_VALUE;
    if ((int)shared > state->max_dynamic_shared) {
        fprintf(stderr, "cuda emulator: %s launched with %u bytes of dynamic shared memory, over its limit %d\n",
                state->kernel->name, shared, state->max_dynamic_shared);
        return INVALID_VALUE;
    }
    const emu::Kernel* kernel = state->kernel;
    std::shared_ptr<void> args(kernel->capture(params), kernel->release);
    const emu::Grid grid{{gx, gy, gz}, {bx, by, bz}, shared};
    return emu::enqueue(s, [kernel, args, grid] {
        running_kernel = kernel->name;
        if (!emu::run_grid(*kernel, grid, args.get())) sticky = LAUNCH_FAILED;
        running_kernel = nullptr;
    });
}

}  // extern "C"
