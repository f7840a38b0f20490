//! Criterion benchmarks of the training step's hot paths (SPEC §7). On the CPU, those outside the GEMMs at
//! pch-base's shapes for a batch of 30 users, H = 80, T = 40: the user tower's 2,400 rows through one
//! layer's LayerNorm, GELU and attention, the dense loss at B 30 and 256, and the optimiser over all 88 M
//! parameters (`examples/gemm_probe.rs` covers the products). When a GPU is present, every CUDA training
//! kernel at pch-base's shapes for a batch of 256 users, as `bench kernels --preset pch-base` runs them,
//! timed on the device with events.
//!
//! `cargo bench --bench train_kernels`; `RAYON_NUM_THREADS` sets the CPU threads.

mod support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use learn_kern::cpu::infonce::{InfoNceBatch, LossPositions, infonce};
use learn_kern::cpu::masked_attention::{self, Heads, MaskKind, Varlen};
use learn_kern::cpu::{gelu, layernorm};
use learn_kern::cuda::bench_train_kernels::{TrainKernelShape, train_kernels};
use learn_kern::pch::{PchConfig, parameter_count};
use learn_kern::train::optim::{Adam, AdamConfig, grad_norm};
use std::hint::black_box;
use std::time::Duration;

const USERS: usize = 30;
const HISTORY: usize = 80;
const TARGETS: usize = 40;

/// Rows of unit length, as the towers' outputs are.
fn unit_rows(n: usize, d: usize, seed: u32) -> Vec<f32> {
    let mut v = support::values(n * d, seed);
    for row in v.chunks_exact_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn layer_ops(c: &mut Criterion) {
    let cfg = PchConfig::base();
    let (rows, d, f) = (USERS * HISTORY, cfg.d_model, cfg.d_ff);
    let mut group = c.benchmark_group("cpu-train");
    group.sample_size(10).measurement_time(Duration::from_secs(3));

    let (x, w, b) = (support::values(rows * d, 1), support::values(d, 2), support::values(d, 3));
    let (mut y, mut xhat, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows]);
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * d], vec![0.0; d], vec![0.0; d]);
    let dy = support::values(rows * d, 4);
    group.throughput(Throughput::Bytes((rows * d * 4 * 4) as u64));
    group.bench_function("layernorm fwd", |bench| {
        bench.iter(|| layernorm::forward(&mut y, &mut xhat, &mut rstd, black_box(&x), &w, &b, rows, d, 1e-12))
    });
    group.throughput(Throughput::Bytes((rows * d * 4 * 4) as u64));
    group.bench_function("layernorm bwd", |bench| {
        bench.iter(|| layernorm::backward(&mut dx, &mut dw, &mut db, black_box(&dy), &xhat, &rstd, &w, rows, d))
    });

    let u = support::values(rows * f, 5);
    let mut g = vec![0.0; rows * f];
    group.throughput(Throughput::Bytes((rows * f * 8) as u64));
    group.bench_function("gelu fwd", |bench| bench.iter(|| gelu::forward(&mut g, black_box(&u))));
    group.bench_function("gelu bwd", |bench| bench.iter(|| gelu::backward_in_place(&mut g, black_box(&u))));

    let seqs = Varlen::new(&[HISTORY; USERS]);
    let hd = Heads { count: cfg.n_heads, dim: cfg.head_dim() };
    let (q, k, v) = (support::values(rows * d, 6), support::values(rows * d, 7), support::values(rows * d, 8));
    let (mut out, mut probs) = (vec![0.0; rows * d], vec![0.0; seqs.prob_len(hd.count)]);
    let (mut dq, mut dk, mut dv) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows * d]);
    let dout = support::values(rows * d, 9);
    // Forward: Q·Kᵀ and P·V over the full square (the mask is applied after the product).
    group.throughput(Throughput::Elements((4 * USERS * HISTORY * HISTORY * d) as u64));
    group.bench_function("causal attention fwd (flop)", |bench| {
        bench.iter(|| {
            masked_attention::forward(&mut out, &mut probs, black_box(&q), &k, &v, None, &seqs, hd, MaskKind::Causal)
        })
    });
    group.throughput(Throughput::Elements((8 * USERS * HISTORY * HISTORY * d) as u64));
    group.bench_function("causal attention bwd (flop)", |bench| {
        bench.iter(|| {
            masked_attention::backward(&mut dq, &mut dk, &mut dv, black_box(&dout), &q, &k, &v, &probs, None, &seqs, hd)
        })
    });
    group.finish();
}

fn loss(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu-train");
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    let d = PchConfig::base().d_out;
    for users in [USERS, 256] {
        let (u, v) = (unit_rows(users * HISTORY, d, 10), unit_rows(users * TARGETS, d, 11));
        let ids: Vec<u32> = (0..users * TARGETS).map(|i| (i as u32).wrapping_mul(2654435761) % 5000).collect();
        let (hist_len, tgt_len) = (vec![HISTORY; users], vec![TARGETS; users]);
        let batch = InfoNceBatch {
            users: &u,
            hist_len: &hist_len,
            items: &v,
            tgt_len: &tgt_len,
            target_ids: &ids,
            h: HISTORY,
            t: TARGETS,
            d,
            tau: 0.05,
            keep_false_negatives: false,
            positions: LossPositions::All,
            log_q: None,
        };
        let (mut du, mut dv) = (vec![0.0; u.len()], vec![0.0; v.len()]);
        // Scores: one product for the log-sum-exp pass and two for the gradient passes, each
        // (B·H)·(B·T)·d multiply-adds.
        group.throughput(Throughput::Elements((users * HISTORY * users * TARGETS) as u64));
        group.bench_function(format!("infonce B {users} (scores)"), |bench| {
            bench.iter(|| infonce(black_box(&batch), &mut du, &mut dv))
        });
    }
    group.finish();
}

fn optimiser(c: &mut Criterion) {
    let cfg = PchConfig::base().with_d_content(512);
    let n = parameter_count(&cfg);
    let mut group = c.benchmark_group("cpu-train");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    let mut params = support::values(n, 12);
    let grads = support::values(n, 13);
    let mut adam = Adam::new(AdamConfig::default(), &[n]);
    // Parameters, gradients and both moments read; parameters and moments written.
    group.throughput(Throughput::Bytes((n * 7 * 4) as u64));
    group.bench_function("adam (pch-base)", |bench| {
        bench.iter(|| adam.update(&mut [params.as_mut_slice()], &[black_box(grads.as_slice())], 1e-4))
    });
    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("grad norm (pch-base)", |bench| bench.iter(|| grad_norm(&[black_box(grads.as_slice())])));
    group.finish();
}

fn gpu_kernels(c: &mut Criterion) {
    let Some(gpu) = support::gpu() else { return };
    let shape = TrainKernelShape { batch_users: 256, history: HISTORY, targets: TARGETS, gallery: 100_000 };
    let mut kernels = train_kernels(&gpu, &PchConfig::base(), shape).unwrap();
    support::bench_kernel_set(c, &gpu, "cuda-train", &mut kernels);
}

criterion_group!(benches, layer_ops, loss, optimiser, gpu_kernels);
criterion_main!(benches);
