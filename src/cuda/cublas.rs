//! cuBLAS for the linear layers: fp16 operands, fp32 accumulation, fp16 results (SPEC §6).
//!
//! Opened by [`super::libs`] like NVRTC, and for the same reason: cudarc only looks for the CUDA 12 (or
//! older) library names and panics without one, while CUDA 13 machines ship `libcublas.so.13`. The few
//! functions used have kept their C signatures since CUDA 11.

use super::libs;
use super::memory::Dev;
use super::profile::Profiler;
use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaStream};
use half::f16;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, OnceLock};

type Handle = *mut c_void;
type Status = c_int;

const OP_N: c_int = 0;
const OP_T: c_int = 1;
const R_32F: c_int = 0;
const R_16F: c_int = 2;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;

struct Api {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, cudarc::driver::sys::CUstream) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    get_version: unsafe extern "C" fn(Handle, *mut c_int) -> Status,
    #[allow(clippy::type_complexity)]
    gemm_ex: unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        *mut c_void,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
}

struct Library {
    api: Api,
    path: String,
    _loaded: libs::Loaded,
}

fn library() -> Result<&'static Library, String> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let loaded = libs::open("cublas")?;
            let (lib, path) = (&loaded.library, &loaded.path);
            macro_rules! symbol {
                ($name:literal) => {
                    // SAFETY: each field's type is the documented C signature of that cuBLAS function.
                    *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                        .map_err(|e| format!("{path}: has no {} ({e})", $name))?
                };
            }
            let api = Api {
                create: symbol!("cublasCreate_v2"),
                destroy: symbol!("cublasDestroy_v2"),
                set_stream: symbol!("cublasSetStream_v2"),
                set_workspace: symbol!("cublasSetWorkspace_v2"),
                get_version: symbol!("cublasGetVersion_v2"),
                gemm_ex: symbol!("cublasGemmEx"),
            };
            Ok(Library { api, path: loaded.path.clone(), _loaded: loaded })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether cuBLAS can be opened, and if not why: part of the probe before a command picks the GPU.
pub fn probe() -> Result<(), String> {
    library().map(|_| ())
}

/// A cuBLAS handle bound to one context and stream.
pub struct Blas {
    lib: &'static Library,
    handle: Handle,
    ctx: Arc<CudaContext>,
    /// The stream the handle enqueues on, and the GPU's launch timer, which times each GEMM there.
    stream: Arc<CudaStream>,
    profiler: Profiler,
    /// cuBLAS's version, e.g. 120903 for 12.9.3.
    pub version: i32,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it do not overlap; `Blas` is
// owned by one `Gpu`, whose methods take `&self` on the single thread that drives that GPU.
unsafe impl Send for Blas {}

impl Blas {
    /// A handle that enqueues on `stream` and uses `workspace` (no allocation of its own during GEMMs); its
    /// GEMMs are timed by `profiler` when that is on.
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        workspace: Dev<u8>,
        profiler: Profiler,
    ) -> Result<Self> {
        let lib = library().map_err(|why| anyhow!("cuBLAS is needed for the GEMMs: {why}"))?;
        ctx.bind_to_thread()?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the context is current.
        check(unsafe { (lib.api.create)(&mut handle) }, "cublasCreate")?;
        let mut blas = Blas { lib, handle, ctx: ctx.clone(), stream: stream.clone(), profiler, version: 0 };
        // SAFETY: a live handle, a stream of the current context and a workspace the caller keeps alive.
        check(unsafe { (lib.api.set_stream)(handle, stream.cu_stream()) }, "cublasSetStream")?;
        check(
            unsafe { (lib.api.set_workspace)(handle, workspace.ptr() as *mut c_void, workspace.len()) },
            "cublasSetWorkspace",
        )?;
        check(unsafe { (lib.api.get_version)(handle, &mut blas.version) }, "cublasGetVersion")?;
        Ok(blas)
    }

    /// Where the library was found.
    pub fn path(&self) -> &str {
        &self.lib.path
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` (+ `y` when `accumulate`), row-major, as `x · Wᵀ` with PyTorch's
    /// `[out, in]` weights: fp16 operands and result, fp32 accumulation, tensor cores where the GPU has them.
    #[allow(clippy::too_many_arguments)]
    pub fn a_bt(
        &self,
        y: Dev<f16>,
        x: Dev<f16>,
        w: Dev<f16>,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(y.len() >= m * n && x.len() >= m * k && w.len() >= n * k, "gemm {m}×{n}×{k}: operands too small");
        // Column-major cuBLAS sees the row-major y[m, n] as yᵀ[n, m] = W · xᵀ: A = W stored as Wᵀ[k, n]
        // (transposed, lda = k), B = xᵀ[k, m] (as is, ldb = k), C = yᵀ (ldc = n).
        let (a, b) = (Operand { ptr: w.ptr(), op: OP_T, ld: k }, Operand { ptr: x.ptr(), op: OP_N, ld: k });
        self.gemm("a_bt", [m, n, k], a, b, (y.ptr(), R_16F), accumulate)
    }

    /// `y[m, n] = x[m, k] · w[k, n]` (+ `y` when `accumulate`), row-major, fp16 result: the input gradient
    /// `dY · W` of a linear layer with `[out, in]` weights.
    #[allow(clippy::too_many_arguments)]
    pub fn a_b(
        &self,
        y: Dev<f16>,
        x: Dev<f16>,
        w: Dev<f16>,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(y.len() >= m * n && x.len() >= m * k && w.len() >= k * n, "gemm {m}×{n}×{k}: operands too small");
        // yᵀ[n, m] = wᵀ[n, k] · xᵀ[k, m]: the row-major w[k, n] is the column-major wᵀ (lda = n).
        let (a, b) = (Operand { ptr: w.ptr(), op: OP_N, ld: n }, Operand { ptr: x.ptr(), op: OP_N, ld: k });
        self.gemm("a_b", [m, n, k], a, b, (y.ptr(), R_16F), accumulate)
    }

    /// `y[m, n] = a[k, m]ᵀ · b[k, n]` in fp32, row-major: the weight gradient `dYᵀ · X` of a linear layer
    /// summed over k rows (and, with `a` a column of ones, its bias gradient). It overwrites `y` (β = 0), so
    /// cuBLAS neither reads the gradient nor needs it zeroed first.
    pub fn at_b(&self, y: Dev<f32>, a: Dev<f16>, b: Dev<f16>, m: usize, n: usize, k: usize) -> Result<()> {
        ensure!(y.len() >= m * n && a.len() >= k * m && b.len() >= k * n, "gemm {m}×{n}×{k}: operands too small");
        // yᵀ[n, m] = bᵀ[n, k] · a[k, m]: b[k, n] row-major is the column-major bᵀ (ldb = n); a[k, m] row-major
        // is the column-major aᵀ[m, k] (ld = m), transposed back.
        let (a, b) = (Operand { ptr: b.ptr(), op: OP_N, ld: n }, Operand { ptr: a.ptr(), op: OP_T, ld: m });
        self.gemm("at_b", [m, n, k], a, b, (y.ptr(), R_32F), false)
    }

    /// The column-major product `C[n, m] = op(A)[n, k] · op(B)[k, m]` (+ C) that each row-major layout above
    /// maps onto: fp16 operands, fp32 accumulation, C of type `c.1`. `what` names the layout in a profile.
    fn gemm(
        &self,
        what: &str,
        [m, n, k]: [usize; 3],
        a: Operand,
        b: Operand,
        c: (u64, c_int),
        accumulate: bool,
    ) -> Result<()> {
        let dims = [m, n, k, a.ld, b.ld].map(c_int::try_from);
        let [Ok(mi), Ok(ni), Ok(ki), Ok(lda), Ok(ldb)] = dims else {
            bail!("gemm {m}×{n}×{k}: a dimension exceeds cuBLAS's int range")
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        self.ctx.bind_to_thread()?;
        let label = || format!("gemm {what} {m}×{n}×{k}");
        self.profiler.time(&self.stream, label, 2.0 * (m * n * k) as f64, || {
            // SAFETY: every operand holds the elements the dimensions reach (checked by the callers) and belongs
            // to this handle's context; alpha and beta are f32 as COMPUTE_32F requires.
            let status = unsafe {
                (self.lib.api.gemm_ex)(
                    self.handle,
                    a.op,
                    b.op,
                    ni,
                    mi,
                    ki,
                    (&alpha as *const f32).cast(),
                    a.ptr as *const c_void,
                    R_16F,
                    lda,
                    b.ptr as *const c_void,
                    R_16F,
                    ldb,
                    (&beta as *const f32).cast(),
                    c.0 as *mut c_void,
                    c.1,
                    ni,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                )
            };
            check(status, "cublasGemmEx")
        })
    }
}

/// One fp16 operand of [`Blas::gemm`]: its address, whether cuBLAS transposes it, its leading dimension.
struct Operand {
    ptr: u64,
    op: c_int,
    ld: usize,
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created in new() and destroyed once.
        let _ = unsafe { (self.lib.api.destroy)(self.handle) };
    }
}

fn check(status: Status, what: &str) -> Result<()> {
    let name = match status {
        0 => return Ok(()),
        1 => "NOT_INITIALIZED",
        3 => "ALLOC_FAILED",
        7 => "INVALID_VALUE",
        8 => "ARCH_MISMATCH",
        11 => "MAPPING_ERROR",
        13 => "EXECUTION_FAILED",
        14 => "INTERNAL_ERROR",
        15 => "NOT_SUPPORTED",
        _ => "error",
    };
    Err(anyhow!("{what} failed: CUBLAS_STATUS_{name} ({status})"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn opening_cublas_never_panics_and_names_what_it_looked_for() {
        // Runs where no GPU is: opening the library needs no device.
        match super::probe() {
            Ok(()) => eprintln!("cuBLAS: {}", super::library().map(|l| l.path.as_str()).unwrap_or("?")),
            Err(why) => assert!(why.contains("libcublas"), "{why}"),
        }
    }
}
