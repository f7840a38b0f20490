//! Criterion benchmarks of the embedding hot paths (SPEC §7): the CPU reference operations at the `small`
//! preset's shapes, and, when a GPU is present, the CUDA kernels at Baichuan2-7B's shapes for a batch of
//! 4096 tokens, as `bench kernels` builds them (timed on the device: a batch of launches between two events).
//!
//! `cargo bench --bench embed_kernels`; without a GPU only the CPU group runs (the reason is printed).

mod support;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use learn_kern::cpu;
use learn_kern::cuda::bench_kernels::embed_kernels;
use learn_kern::llm::LlmConfig;
use std::hint::black_box;
use std::time::Duration;

/// Packed sequences of lengths cycling through 16..=128 (the bench embed default mix) up to `tokens`.
fn offsets(tokens: usize) -> Vec<usize> {
    let mut offsets = vec![0];
    let mut len = 16;
    while offsets[offsets.len() - 1] + len <= tokens {
        offsets.push(offsets[offsets.len() - 1] + len);
        len = 16 + (len * 37 + 11) % 113;
    }
    offsets
}

fn cpu_reference(c: &mut Criterion) {
    let config = LlmConfig::preset("small").unwrap();
    let (d, f, heads, dh) =
        (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim());
    let offsets = offsets(1024);
    let t = offsets[offsets.len() - 1];
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10).measurement_time(Duration::from_secs(3));

    let x = support::values(t * d, 1);
    let w = support::values(d, 2);
    let mut out = vec![0.0; t * d];
    group.throughput(Throughput::Bytes((t * d * 8) as u64));
    group.bench_function("rmsnorm", |b| b.iter(|| cpu::rmsnorm::rmsnorm(&mut out, black_box(&x), &w, 1e-6)));

    let mut qkv = support::values(t * 3 * d, 3);
    let positions: Vec<usize> = offsets.windows(2).flat_map(|w| 0..w[1] - w[0]).collect();
    let table = cpu::rope::RopeTable::new(dh, 10000.0, 512);
    group.throughput(Throughput::Bytes((t * 2 * d * 8) as u64));
    group.bench_function("rope", |b| b.iter(|| cpu::rope::rope(&mut qkv, 3 * d, 2 * heads, &positions, &table)));

    let pairs: usize = offsets.windows(2).map(|w| (w[1] - w[0]) * (w[1] - w[0] + 1) / 2).sum();
    group.throughput(Throughput::Elements((4 * d * pairs) as u64));
    group.bench_function("causal_attention (flop)", |b| {
        b.iter(|| cpu::causal_attention::causal_attention(&mut out, black_box(&qkv), &offsets, heads, dh))
    });

    let gate_up = support::values(t * 2 * f, 4);
    let mut act = vec![0.0; t * f];
    group.throughput(Throughput::Bytes((t * 3 * f * 4) as u64));
    group.bench_function("swiglu", |b| b.iter(|| cpu::swiglu::swiglu(&mut act, black_box(&gate_up), f)));

    let mut pooled = vec![0.0; (offsets.len() - 1) * d];
    group.throughput(Throughput::Bytes((t * d * 4) as u64));
    group.bench_function("mean_pool_l2", |b| {
        b.iter(|| cpu::pool::mean_pool_l2(&mut pooled, black_box(&x), &offsets, d))
    });

    let wpack = support::values(3 * d * d, 5);
    group.throughput(Throughput::Elements((2 * t * 3 * d * d) as u64));
    group.bench_with_input(BenchmarkId::new("gemm a_bt (flop)", format!("{t}x{}x{d}", 3 * d)), &t, |b, &t| {
        b.iter(|| cpu::gemm::a_bt(&mut qkv, black_box(&x), &wpack, t, 3 * d, d, false))
    });
    group.finish();
}

fn gpu_kernels(c: &mut Criterion) {
    let Some(gpu) = support::gpu() else { return };
    let config = LlmConfig::preset("baichuan2-7b").unwrap();
    let mut kernels = embed_kernels(&gpu, &config, &offsets(4096)).unwrap();
    support::bench_kernel_set(c, &gpu, "cuda", &mut kernels);
}

criterion_group!(benches, cpu_reference, gpu_kernels);
criterion_main!(benches);
