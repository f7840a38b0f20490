//! One GPU: its context, compute stream, loaded kernels and cuBLAS handle, and the few memory operations
//! everything else builds on.
//!
//! A `Gpu` is driven from one thread at a time (it is `Send`, not shared): the job gives each device its own
//! consumer thread. Every entry point binds the context to the calling thread first, so a `Gpu` created on
//! one thread works on another.

use super::cublas::Blas;
use super::kernels::Kernels;
use super::memory::{Dev, DeviceBuffer, is_out_of_memory};
use super::profile::Profiler;
use anyhow::{Context, Result, anyhow};
use cudarc::driver::{CudaContext, CudaStream, result, sys};
use std::ffi::c_void;
use std::sync::Arc;

/// Bytes of cuBLAS workspace, given up front so that GEMMs never allocate: NVIDIA's recommendation for
/// Hopper, and more than other GPUs use.
const BLAS_WORKSPACE: usize = 32 << 20;

/// The device ran out of memory: what was being allocated, how much, and what was free.
#[derive(Debug)]
pub struct OutOfMemory {
    pub what: String,
    pub bytes: usize,
    pub free: usize,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of device memory allocating {} ({} needed, {} free)", self.what, gib(self.bytes), gib(self.free))
    }
}

impl std::error::Error for OutOfMemory {}

/// A byte count as GiB with two decimals.
pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A kernel argument, by the C type the kernel declares.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (any pointer parameter).
    Ptr(u64),
    I32(i32),
    F32(f32),
    /// `long long` / `unsigned long long` (element counts, seeds).
    I64(i64),
    U64(u64),
}

pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: usize,
    /// Shared memory one block may opt in to.
    pub max_shared_per_block: usize,
    pub kernels: Kernels,
    /// Times each launch and GEMM on the compute stream when started (`bench train|embed --profile`).
    pub profiler: Profiler,
    // Field order is drop order: the handle before its workspace, both before the stream and context.
    pub blas: Blas,
    _blas_workspace: DeviceBuffer,
    pub stream: Arc<CudaStream>,
    pub ctx: Arc<CudaContext>,
}

impl Gpu {
    /// Opens device `ordinal`: probes the driver first (cudarc panics without one), then creates the context
    /// and the compute stream, loads the kernels (compiling them if needed) and opens cuBLAS.
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = crate::device::probe_cuda().map_err(|why| anyhow!("cuda:{ordinal}: {why}"))?;
        if ordinal >= count {
            return Err(crate::error::input(format!("there is no cuda:{ordinal} ({count} device(s) found)")));
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cuda:{ordinal}: cannot create a context"))?;
        // SAFETY: the engine orders its streams with explicit events and keeps raw device addresses (see
        // memory.rs); cudarc's per-slice event tracking would only add work.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let attribute = |a| ctx.attribute(a).map(|v| v.max(0) as usize);
        let multiprocessors = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let max_shared_per_block =
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let kernels = Kernels::load(&ctx).with_context(|| format!("cuda:{ordinal}: loading the kernels"))?;
        let blas_workspace = DeviceBuffer::new(&ctx, BLAS_WORKSPACE)?;
        let profiler = Profiler::default();
        let blas = Blas::new(&ctx, &stream, blas_workspace.all(), profiler.clone())?;
        let gpu = Gpu {
            ordinal,
            name: ctx.name()?,
            arch: ctx.compute_capability()?,
            total_memory: ctx.total_mem()?,
            multiprocessors,
            max_shared_per_block,
            kernels,
            profiler,
            blas,
            _blas_workspace: blas_workspace,
            stream,
            ctx,
        };
        gpu.configure_attention()?;
        gpu.configure_infonce()?;
        Ok(gpu)
    }

    /// One line for logs: device, architecture, memory, and where kernels and cuBLAS came from.
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} {} (sm_{}{}, {}, kernels: {}, cuBLAS {})",
            self.ordinal,
            self.name,
            self.arch.0,
            self.arch.1,
            gib(self.total_memory),
            self.kernels.origin,
            self.blas.version
        )
    }

    /// Whether this is the CPU emulator of tools/cuda_emu (which names its devices so) rather than a GPU:
    /// right answers, meaningless timings.
    pub fn is_emulated(&self) -> bool {
        self.name.starts_with("learn-kern CPU emulator")
    }

    /// `bytes` of device memory for `what`; running out is an [`OutOfMemory`] error.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        DeviceBuffer::new(&self.ctx, bytes).map_err(|err| {
            if is_out_of_memory(&err) {
                let free = self.memory().map(|(free, _)| free).unwrap_or(0);
                anyhow::Error::new(OutOfMemory { what: what.to_owned(), bytes, free })
            } else {
                anyhow!("cuda:{}: allocating {} for {what}: {err}", self.ordinal, gib(bytes))
            }
        })
    }

    /// (free, total) device memory as the driver reports it.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread()?;
        Ok(result::mem_get_info()?)
    }

    /// Copies `src` into the start of `dst`, ordered on the compute stream. `src` may be dropped on return
    /// (the driver stages pageable memory before returning).
    pub fn upload<T: bytemuck::Pod>(&self, dst: Dev<T>, src: &[T]) -> Result<()> {
        anyhow::ensure!(src.len() <= dst.len(), "upload of {} elements into {dst:?}", src.len());
        self.ctx.bind_to_thread()?;
        // SAFETY: in bounds (checked); pageable source memory is copied out before the call returns.
        unsafe { result::memcpy_htod_async(dst.ptr(), src, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// The contents of `src`, after everything queued on the compute stream.
    pub fn download<T: bytemuck::Pod>(&self, src: Dev<T>) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); src.len()];
        self.ctx.bind_to_thread()?;
        // SAFETY: `out` holds exactly src.len() elements; the stream is synchronised before `out` is read.
        unsafe { result::memcpy_dtoh_async(&mut out, src.ptr(), self.stream.cu_stream()) }?;
        self.sync()?;
        Ok(out)
    }

    /// Sets every byte of `dst` to `byte` on the compute stream (0xff makes fp32 and fp16 NaNs: poison).
    pub fn fill_bytes<T>(&self, dst: Dev<T>, byte: u8) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: exactly the bytes of `dst`.
        unsafe { result::memset_d8_async(dst.ptr(), byte, dst.bytes(), self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Waits for the compute stream; a failed kernel surfaces here.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().with_context(|| format!("cuda:{}: a queued GPU operation failed", self.ordinal))
    }

    /// Launches kernel `name` on the compute stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every address must cover what the
    /// kernel reaches for this grid: the typed launchers in ops.rs check both before calling this.
    pub(crate) unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let function = self.kernels.get(name)?;
        // One 8-byte slot per argument; the driver copies as many bytes as the parameter's C type has from
        // the slot's start: on the little-endian hosts CUDA runs on, that is the value for 4-byte types too.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|arg| match *arg {
                Arg::Ptr(p) | Arg::U64(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::I64(v) => v as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        self.ctx.bind_to_thread()?;
        self.profiler.time(
            &self.stream,
            || name.to_owned(),
            0.0,
            || {
                // SAFETY: the caller's contract; `slots` outlives the call, which copies the parameters.
                unsafe {
                    result::launch_kernel(
                        function.cu_function(),
                        (grid.0, grid.1, 1),
                        (block, 1, 1),
                        shared,
                        self.stream.cu_stream(),
                        &mut params,
                    )
                }
                .with_context(|| format!("cuda:{}: launching {name}", self.ordinal))
            },
        )
    }

    /// Blocks for a grid-stride loop over `work` items of 256 threads: enough to fill the GPU, no more.
    pub(crate) fn grid_for(&self, work: usize) -> u32 {
        work.div_ceil(256).clamp(1, self.multiprocessors.max(1) * 16) as u32
    }
}
