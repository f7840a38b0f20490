// libcublas.so for the emulator: the handle calls and cublasGemmEx, queued on the handle's stream like a
// kernel (so captured into graphs too). Operands fp16 or fp32, accumulation in fp32 in k order, results
// rounded to the output type; beta = 0 never reads C, as cuBLAS promises.
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "emu.h"
#include "runtime.h"
#include "ptx.cuh"

namespace {
enum : int { SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum : int { R_32F = 0, R_16F = 2 };

struct Handle {
    void* stream = nullptr;
};

float load(const void* p, int type, size_t i) {
    return type == R_16F ? f16_to_f32(static_cast<const f16*>(p)[i]) : static_cast<const float*>(p)[i];
}
}  // namespace

extern "C" {
int cublasCreate_v2(void** h) { *h = new Handle; return SUCCESS; }
int cublasDestroy_v2(void* h) { emu::drain(); delete static_cast<Handle*>(h); return SUCCESS; }
int cublasSetStream_v2(void* h, void* s) { static_cast<Handle*>(h)->stream = s; return SUCCESS; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return SUCCESS; }
int cublasGetVersion_v2(void*, int* v) { *v = 120800; return SUCCESS; }

// C (m × n, column-major, ldc) = alpha · op(A) (m × k) · op(B) (k × n) + beta · C.
int cublasGemmEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int atype,
                 int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc,
                 int compute, int) {
    if (m < 0 || n < 0 || k < 0 || (transa != 0 && transa != 1) || (transb != 0 && transb != 1)) return INVALID_VALUE;
    for (int type : {atype, btype, ctype})
        if (type != R_16F && type != R_32F) return NOT_SUPPORTED;
    if (compute != 68 && compute != 74 && compute != 77) return NOT_SUPPORTED;  // the fp32 compute types
    if (lda < (transa ? k : m) || ldb < (transb ? n : k) || ldc < m) return INVALID_VALUE;
    const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
    return emu::enqueue(static_cast<Handle*>(h)->stream, [=] {
        // op(A)'s rows and op(B)'s columns as contiguous fp32, read when the GEMM runs.
        std::vector<float> rows((size_t)m * k), cols((size_t)n * k);
        for (int i = 0; i < m; ++i)
            for (int l = 0; l < k; ++l)
                rows[(size_t)i * k + l] = load(A, atype, transa ? (size_t)i * lda + l : (size_t)l * lda + i);
        for (int j = 0; j < n; ++j)
            for (int l = 0; l < k; ++l)
                cols[(size_t)j * k + l] = load(B, btype, transb ? (size_t)l * ldb + j : (size_t)j * ldb + l);
        for (int i = 0; i < m; ++i) {
            const float* row = &rows[(size_t)i * k];
            for (int j = 0; j < n; ++j) {
                const float* col = &cols[(size_t)j * k];
                float sum = 0.0f;
                for (int l = 0; l < k; ++l) sum = std::fma(row[l], col[l], sum);
                const size_t at = (size_t)j * ldc + i;
                float out = a * sum;
                if (b != 0.0f) out = std::fma(b, load(C, ctype, at), out);
                if (ctype == R_16F) static_cast<f16*>(C)[at] = f32_to_f16(out);
                else static_cast<float*>(C)[at] = out;
            }
        }
    });
}
}  // extern "C"
