// The emulator's own checks (tools/cuda_emu/selftest.sh, run by tests/cuda_emulator.rs): that it finds the
// mistakes it exists to find, and that its arithmetic is the GPU's.
//   - a missing barrier gives a wrong result, the barrier a right one;
//   - lanes of a warp at different shuffles, and a __trap(), fail the launch;
//   - threads that returned do not hold up a barrier;
//   - reading past the end of an allocation faults;
//   - a copy into pinned memory lands when the host waits, not before;
//   - half conversions agree with the compiler's _Float16 (round to nearest even), the tensor-core product
//     with a double-precision one.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ptx.cuh"
#include "registry.h"

extern "C" {
int cuMemAlloc_v2(unsigned long long*, size_t);
int cuMemHostAlloc(void**, size_t, unsigned);
int cuMemcpyDtoHAsync_v2(void*, unsigned long long, size_t, void*);
int cuMemsetD8Async(unsigned long long, unsigned char, size_t, void*);
int cuStreamSynchronize(void*);
}

static int failures = 0;
#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            fprintf(stderr, "selftest: FAILED: " __VA_ARGS__); \
            fprintf(stderr, "\n");                        \
            failures++;                                   \
        }                                                 \
    } while (0)

extern "C" __global__ void neighbour(int* out, int barrier) {
    __shared__ int s[256];
    s[threadIdx.x] = threadIdx.x;
    if (barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % 256];
}

// Half the warp at one shuffle, the other half at another: what infonce_lse once did.
extern "C" __global__ void half_warp_shuffle(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    v = __shfl_xor_sync(0xffffffffu, v, 2);
    out[threadIdx.x] = v;
}

extern "C" __global__ void early_exit(int* out) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    if (threadIdx.x >= 100) return;
    atomicAdd(&count, 1);
    __syncthreads();
    out[threadIdx.x] = count;
}

extern "C" __global__ void traps(int* out) {
    if (threadIdx.x == 7) __trap();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void read_past(float* out, const float* in, int n) { out[0] = in[n]; }

extern "C" __global__ void one_mma(float* out, const f16* a, const f16* b) {
    FragA fa;
    FragB fb;
    FragC fc;
    zero_c(fc);
    load_a_row(fa, a, 16);
    load_b_col(fb, b, 16);
    mma_row_col(fc, fa, fb);
    store_d_row(out, fc, 16);
}

EMU_REGISTER(neighbour)
EMU_REGISTER(half_warp_shuffle)
EMU_REGISTER(early_exit)
EMU_REGISTER(traps)
EMU_REGISTER(read_past)
EMU_REGISTER(one_mma)

template <class... A>
static bool launch(const char* name, unsigned threads, A... args) {
    const emu::Kernel* k = emu::find_kernel(name);
    void* params[] = {&args...};
    void* captured = k->capture(params);
    const emu::Grid grid{{1, 1, 1}, {threads, 1, 1}, 0};
    const bool ok = emu::run_grid(*k, grid, captured);
    k->release(captured);
    return ok;
}

int main() {
    std::vector<int> out(256);
    CHECK(launch("neighbour", 256, out.data(), 1), "neighbour with a barrier failed to run");
    bool right = true;
    for (int t = 0; t < 256; ++t) right &= out[t] == (t + 1) % 256;
    CHECK(right, "a barrier did not order shared memory");
    launch("neighbour", 256, out.data(), 0);
    right = true;
    for (int t = 0; t < 256; ++t) right &= out[t] == (t + 1) % 256;
    CHECK(!right, "a missing barrier went unnoticed");

    std::vector<float> f(64);
    CHECK(!launch("half_warp_shuffle", 64, f.data()), "a shuffle half a warp skipped was not reported");
    std::vector<int> counts(128, -1);
    CHECK(launch("early_exit", 128, counts.data()), "threads that returned held up a barrier");
    CHECK(counts[0] == 100 && counts[99] == 100, "early exit counted %d", counts[0]);
    CHECK(!launch("traps", 32, counts.data()), "a __trap() was not reported");

    // Past the end of a 1000-float allocation (rounded to 4096 bytes: the guard page follows) faults.
    const pid_t child = fork();
    if (child == 0) {
        unsigned long long in;
        cuMemAlloc_v2(&in, 1024 * sizeof(float));
        float result;
        launch("read_past", 1, &result, reinterpret_cast<const float*>(in), 1024);
        _exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV, "reading past an allocation did not fault");

    // Work waits for the host to wait.
    unsigned long long dev;
    void* host;
    cuMemAlloc_v2(&dev, 64);
    cuMemHostAlloc(&host, 64, 0);
    memset(host, 0, 64);
    cuMemsetD8Async(dev, 7, 64, nullptr);
    cuMemcpyDtoHAsync_v2(host, dev, 64, nullptr);
    CHECK(static_cast<unsigned char*>(host)[0] == 0, "an async copy landed before the host waited");
    cuStreamSynchronize(nullptr);
    CHECK(static_cast<unsigned char*>(host)[0] == 7, "an async copy did not land when the host waited");

    // Conversions against the compiler's binary16 (GCC 12 and later on x86-64 have it).
#ifdef __FLT16_MAX__
    for (unsigned h = 0; h < 65536; ++h) {
        _Float16 x;
        const unsigned short bits = (unsigned short)h;
        memcpy(&x, &bits, 2);
        const float want = (float)x, got = f16_to_f32(bits);
        CHECK(memcmp(&want, &got, 4) == 0 || (std::isnan(want) && std::isnan(got)), "f16_to_f32(%04x)", h);
    }
    std::mt19937 bits_rng(5);
    for (long i = 0; i < (1l << 24); ++i) {
        // A sweep from below binary16's smallest subnormal to past its largest finite value (every
        // exponent, subnormals and overflow included), then random bit patterns of either sign.
        const unsigned bits = i < (1 << 16) ? 0x33000000u + (unsigned)i * 0x1480u : (unsigned)bits_rng();
        const float x = __uint_as_float(bits);
        if (std::isnan(x)) continue;
        const _Float16 want = (_Float16)x;
        unsigned short want_bits;
        memcpy(&want_bits, &want, 2);
        const unsigned short got = f32_to_f16(x);
        CHECK(got == want_bits, "f32_to_f16(%a) = %04x, want %04x", x, got, want_bits);
        if (failures > 10) break;
    }

#else
    fprintf(stderr, "selftest: this compiler has no _Float16; half conversions not checked\n");
#endif
    std::mt19937 rng(5);
    std::vector<f16> a(256), b(256);
    std::uniform_real_distribution<float> uni(-2, 2);
    for (auto& v : a) v = f32_to_f16(uni(rng));
    for (auto& v : b) v = f32_to_f16(uni(rng));
    std::vector<float> d(256);
    CHECK(launch("one_mma", 32, d.data(), (const f16*)a.data(), (const f16*)b.data()), "mma failed");
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
            double want = 0;  // B column-major: column j is b[j·16 ..]
            for (int k = 0; k < 16; ++k) want += (double)f16_to_f32(a[i * 16 + k]) * f16_to_f32(b[j * 16 + k]);
            CHECK(std::fabs(d[i * 16 + j] - want) <= 1e-5 * (1 + std::fabs(want)), "mma (%d, %d)", i, j);
        }

    if (failures) return 1;
    printf("selftest: ok\n");
    return 0;
}
