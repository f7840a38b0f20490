//! The CUDA engine (SPEC §6): hand-written kernels (`kernels/*.cu`) and cuBLAS GEMMs launched through
//! cudarc, held to the CPU reference in `crate::cpu` by the tests in `tests/cuda_*.rs`.
//!
//! Nothing here needs a GPU or a CUDA toolkit to build: the driver, NVRTC and cuBLAS are opened at run
//! time, after [`crate::device::probe_cuda`] has made sure a driver and a device are there.

pub mod attention_train;
pub mod bucket;
pub mod cublas;
pub mod gpu;
pub mod infonce;
pub mod kernels;
pub mod libs;
pub mod memory;
pub mod nvrtc;
pub mod ops;
pub mod pch;
pub mod profile;
pub mod topk;
pub mod towers;
pub mod train_ops;
pub mod trainer;

pub use gpu::Gpu;
pub mod encoder;
pub mod model;

/// Whether the CUDA engine can run here: a driver with a device (probed without letting cudarc panic),
/// cuBLAS, and a way to get the kernels (PTX built in, or NVRTC). The number of devices, or why not.
pub fn probe() -> Result<usize, String> {
    let count = crate::device::probe_cuda()?;
    cublas::probe()?;
    if kernels::PTX_ARCH.is_none() {
        nvrtc::get().map_err(|why| format!("the kernels need NVRTC: {why}"))?;
    }
    Ok(count)
}
pub mod bench;
pub mod bench_kernels;
pub mod bench_train;
pub mod bench_train_kernels;
