//! What the criterion benches share: deterministic inputs for the CPU paths, and the timing of a GPU
//! kernel set case by case.

use criterion::{Criterion, Throughput};
use learn_kern::cuda::Gpu;
use learn_kern::cuda::bench::time_launches;
use learn_kern::cuda::bench_kernels::KernelSet;
use std::time::Duration;

/// `n` values in [-1, 1], spread by a multiplicative hash of the index and `seed`: no generator to seed.
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// The GPU to time kernels on: cuda:0, or None, with the reason printed, when there is no usable GPU or it
/// is the emulator (tools/cuda_emu), whose times mean nothing.
pub fn gpu() -> Option<Gpu> {
    let why = match learn_kern::cuda::probe().and_then(|_| Gpu::open(0).map_err(|e| format!("{e:#}"))) {
        Ok(gpu) if !gpu.is_emulated() => return Some(gpu),
        Ok(gpu) => format!("{} runs kernels but times nothing meaningful", gpu.name),
        Err(why) => why,
    };
    eprintln!("skipping the GPU kernels: {why}");
    None
}

/// Benchmarks each kernel of `set` in the group `group`, timed on the device between two events; the
/// throughput is its operations where they bound it on every GPU (named "(flop)"), else its bytes.
pub fn bench_kernel_set(c: &mut Criterion, gpu: &Gpu, group: &str, set: &mut KernelSet) {
    let mut group = c.benchmark_group(format!("{group} {}", gpu.name));
    group.sample_size(20);
    for case in &mut set.cases {
        let name = if case.work.compute_bound() {
            group.throughput(Throughput::Elements(case.work.flops as u64));
            format!("{} (flop)", case.name)
        } else {
            group.throughput(Throughput::Bytes(case.work.bytes as u64));
            case.name.to_owned()
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                Duration::from_secs_f64(time_launches(gpu, iters as usize, &mut case.launch).unwrap())
            })
        });
    }
    group.finish();
}
