//! GFLOP/s of the CPU GEMM wrapper for every product a pch-base linear layer runs (forward, input gradient,
//! weight gradient; the FFN's up and down shapes) at 2,400 rows: `cargo run --release --example gemm_probe`,
//! RAYON_NUM_THREADS sets the threads. Each figure is the median of 5 after a warm-up. docs/perf.md sets
//! these beside PyTorch's for the same shapes.

use learn_kern::cpu::gemm::{a_b, a_bt, at_b};
use std::time::Instant;

fn time(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[2]
}

fn main() {
    let (m, d, f) = (2400usize, 768usize, 3072usize);
    let big: Vec<f32> = (0..m * f).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let small: Vec<f32> = (0..m * d).map(|i| ((i * 7907) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..f * d).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut c_big = vec![0f32; m * f];
    let mut c_small = vec![0f32; m * d];
    let mut c_w = vec![0f32; f * d];
    let fl = 2.0 * (m * d * f) as f64;
    let r = |t: f64| fl / t / 1e9;
    println!("fwd up    a_bt x[m,d]·W[f,d]ᵀ   {:.1}", r(time(&mut || a_bt(&mut c_big, &small, &w, m, f, d, false))));
    println!("fwd down  a_bt h[m,f]·W[d,f]ᵀ   {:.1}", r(time(&mut || a_bt(&mut c_small, &big, &w, m, d, f, false))));
    println!("bwd dx up a_b  dy[m,f]·W[f,d]   {:.1}", r(time(&mut || a_b(&mut c_small, &big, &w, m, d, f, false))));
    println!("bwd dx dn a_b  dy[m,d]·W[d,f]   {:.1}", r(time(&mut || a_b(&mut c_big, &small, &w, m, f, d, false))));
    println!("bwd dW up at_b dy[m,f]ᵀ·x[m,d]  {:.1}", r(time(&mut || at_b(&mut c_w, &big, &small, f, d, m, true))));
    println!("bwd dW dn at_b dy[m,d]ᵀ·h[m,f]  {:.1}", r(time(&mut || at_b(&mut c_w, &small, &big, d, f, m, true))));
}
