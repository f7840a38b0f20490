//! Shared by the GPU tests (`tests/cuda_*.rs`): opening the device or skipping with the reason, fresh
//! random inputs with a printed seed, device buffers poisoned before a kernel writes them, and tolerance
//! checks that name the first element out of bounds.
#![allow(dead_code)]

use half::f16;
use learn_kern::cuda::Gpu;
use learn_kern::cuda::memory::{Dev, DeviceBuffer};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Elements after every output buffer that must still hold the poison after a kernel ran.
pub const GUARD: usize = 64;

/// Device 0, or `None` after saying why the test skips. A machine with a device that fails to open (no
/// cuBLAS, no NVRTC) fails the test: that is a broken installation, not a missing GPU.
pub fn gpu() -> Option<Gpu> {
    match learn_kern::device::probe_cuda() {
        Err(why) => {
            // Once per test binary and past the harness's capture (which hides a passing test's output), so
            // that a run without a GPU says what it did not check.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "GPU tests skip themselves: no CUDA device ({why})");
            });
            None
        }
        Ok(_) => {
            let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("a CUDA device is present but unusable: {e:#}"));
            // Says which device ran them: a GPU, or the CPU emulator of tools/cuda_emu.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "GPU tests run on {}", gpu.describe());
            });
            Some(gpu)
        }
    }
}

/// Device 0 when it is a real GPU, for tests that measure speed or work at full scale (`what`): on the CPU
/// emulator (tools/cuda_emu) the first means nothing and the second takes hours, so they skip, saying so.
pub fn real_gpu(what: &str) -> Option<Gpu> {
    let gpu = gpu()?;
    if gpu.is_emulated() {
        eprintln!("skipping {what}: {} is the CPU emulator", gpu.name);
        return None;
    }
    Some(gpu)
}

/// A generator from `LEARN_KERN_TEST_SEED`, or a fresh seed each run; the seed is printed to rerun a failure.
pub fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("LEARN_KERN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{test}: LEARN_KERN_TEST_SEED={seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// `data` on the device.
pub fn upload<T: bytemuck::Pod>(gpu: &Gpu, data: &[T]) -> (DeviceBuffer, Dev<T>) {
    let buffer = gpu.alloc(std::mem::size_of_val(data).max(1), "test input").unwrap();
    let view = buffer.view::<T>(0, data.len());
    gpu.upload(view, data).unwrap();
    (buffer, view)
}

/// An output of `len` elements followed by [`GUARD`] more, all bytes 0xff (NaN as fp32 and as fp16). The
/// view covers the `len` elements only.
pub fn poisoned<T>(gpu: &Gpu, len: usize) -> (DeviceBuffer, Dev<T>) {
    let buffer = gpu.alloc((len + GUARD) * std::mem::size_of::<T>(), "test output").unwrap();
    gpu.fill_bytes(buffer.all::<u8>(), 0xff).unwrap();
    let view = buffer.view::<T>(0, len);
    (buffer, view)
}

/// The output's elements, after checking that the guard after them still holds the poison.
pub fn read<T: bytemuck::Pod>(gpu: &Gpu, buffer: &DeviceBuffer, view: Dev<T>, what: &str) -> Vec<T> {
    let all = gpu.download(buffer.all::<u8>()).unwrap();
    let end = view.bytes();
    assert!(all[end..].iter().all(|&b| b == 0xff), "{what}: a kernel wrote past the end of its output");
    gpu.download(view).unwrap()
}

/// Asserts |got − want| ≤ tol(want) for every element (NaN never passes), naming the first failure.
pub fn assert_close(got: &[f32], want: &[f64], tol: impl Fn(f64) -> f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= tol(w), "{what}: element {i}: got {g}, want {w} (error {err:e}, tolerance {:e})", tol(w));
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: {} elements, worst error {:e} at {}", got.len(), worst.0, worst.1);
}

/// Half an fp16 ulp relative (2^-11), the rounding of one fp16 store.
pub const F16_HALF_ULP: f64 = 1.0 / 2048.0;

/// Smallest fp16 subnormal step over two: the absolute rounding error near zero.
pub const F16_TINY: f64 = 1.0 / (1u64 << 25) as f64;

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn f16s(values: &[f32]) -> Vec<f16> {
    values.iter().map(|&v| f16::from_f32(v)).collect()
}

pub fn widen(values: &[f16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

/// `n` values uniform in [-scale, scale).
pub fn uniform(rng: &mut impl RngExt, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect()
}

/// fp16 rounding of the result plus a relative allowance for fp32 work done in another order.
pub fn f16_tol(rel: f64) -> impl Fn(f64) -> f64 {
    move |w: f64| w.abs() * (F16_HALF_ULP + rel) + F16_TINY
}

/// Per tensor: the relative L2 error within `rel`, and every element within 5·rel of the tensor's largest.
pub fn assert_rel(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zeros, which checks nothing");
    let mut err2 = 0.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        assert!(e <= 5.0 * rel * scale, "{what}: element {i}: got {g}, want {w} (largest {scale:e})");
        err2 += e * e;
    }
    let relative = err2.sqrt() / norm;
    assert!(relative <= rel, "{what}: relative L2 error {relative:e} above {rel:e}");
    eprintln!("{what}: {} values, relative L2 error {relative:.2e}", got.len());
}

/// The learn-kern binary: `LEARN_KERN_BIN` when run from a copy, else the one cargo built with these tests.
pub fn binary() -> std::path::PathBuf {
    std::env::var_os("LEARN_KERN_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_learn-kern")))
}

/// Rows of a `bench kernels` set run once: the kernels `names` in order, each with a positive, finite time,
/// rate and floor, and a TFLOP/s exactly where the kernel has products (`with_products`).
pub fn assert_kernel_rows(rows: &[serde_json::Value], names: &[&str], with_products: &[&str]) {
    let got: Vec<&str> = rows.iter().map(|r| r["kernel"].as_str().unwrap_or("?")).collect();
    assert_eq!(got, names);
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
    for row in rows {
        for key in ["us", "gbps", "floor_us", "fraction_of_floor"] {
            assert!(positive(&row[key]), "{key}: {row}");
        }
        let products = with_products.contains(&row["kernel"].as_str().unwrap_or("?"));
        assert_eq!(row.get("tflops").is_some_and(positive), products, "{row}");
    }
}
