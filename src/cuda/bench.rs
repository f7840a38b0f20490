//! `learn-kern bench embed` and `bench kernels` on one GPU (SPEC §7): throughput of the embedding engine and
//! of each of its kernels, against ceilings measured in the same run (cuBLAS's fp16 GEMM rate, the device's
//! copy bandwidth), so a figure means the same on a V100 and an H100.

use super::Gpu;
use super::encoder::CudaEncoder;
use super::memory::Dev;
use super::model::GpuModel;
use crate::embed::batching;
use crate::embed::encoder::ContentEncoder;
use crate::llm::LlmConfig;
use anyhow::Result;
use cudarc::driver::{CudaEvent, result, sys};
use half::f16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::time::Instant;

/// Benchmarks time a GPU: on the CPU emulator (tools/cuda_emu) the figures would mean nothing, and the
/// 8192³ GEMM ceiling alone would take minutes.
pub fn refuse_emulated(gpu: &Gpu) -> Result<()> {
    if gpu.is_emulated() {
        return Err(crate::error::input(format!(
            "cuda:{} is {}, which runs kernels correctly but not at any meaningful speed: benchmarks need a GPU",
            gpu.ordinal, gpu.name
        )));
    }
    Ok(())
}

/// Item lengths uniform in `min..=max`, from `seed`.
pub fn random_lengths(count: usize, min: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count).map(|_| rng.random_range(min..=max)).collect()
}

/// Rounds [`time_on_stream`] takes the median of.
const ROUNDS: usize = 5;

/// Times `work` on the compute stream with events: `warmup` untimed runs, then `ROUNDS` (5) rounds of
/// `runs`, each between its own pair of events; the median round's time per run, in seconds.
pub fn time_on_stream(gpu: &Gpu, warmup: usize, runs: usize, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        work()?;
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        rounds.push(time_launches(gpu, runs, &mut work)? / runs.max(1) as f64);
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[ROUNDS / 2])
}

/// The device time of `runs` runs of `work` launched back to back between two events, in seconds (what a
/// criterion bench's `iter_custom` reports).
pub fn time_launches(gpu: &Gpu, runs: usize, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end): (CudaEvent, CudaEvent) = (gpu.ctx.new_event(timed)?, gpu.ctx.new_event(timed)?);
    start.record(&gpu.stream)?;
    for _ in 0..runs {
        work()?;
    }
    end.record(&gpu.stream)?;
    gpu.sync()?;
    Ok(start.elapsed_ms(&end)? as f64 / 1e3)
}

/// cuBLAS's time (seconds) for the fp16 GEMM `y[m, n] = x[m, k] · w[n, k]ᵀ`, on random operands (zeros
/// run faster than real data on some GPUs).
pub fn gemm_seconds(gpu: &Gpu, m: usize, n: usize, k: usize) -> Result<f64> {
    let buffer = gpu.alloc((m * k + n * k + m * n) * 2 + 1024, "GEMM benchmark operands")?;
    let x: Dev<f16> = buffer.view(0, m * k);
    let w: Dev<f16> = buffer.view((m * k * 2).next_multiple_of(256), n * k);
    let y: Dev<f16> = buffer.view((m * k * 2).next_multiple_of(256) + (n * k * 2).next_multiple_of(256), m * n);
    gpu.fill_uniform_f16(x, 1, 0.0, 2.0)?;
    gpu.fill_uniform_f16(w, 2, 0.0, 2.0 / (k as f32).sqrt())?;
    time_on_stream(gpu, 3, 10, || gpu.gemm(y, x, w, m, n, k))
}

/// cuBLAS's fp16 GEMM rate (TFLOP/s) for the shape of [`gemm_seconds`].
pub fn gemm_tflops(gpu: &Gpu, m: usize, n: usize, k: usize) -> Result<f64> {
    Ok(2.0 * (m * n * k) as f64 / gemm_seconds(gpu, m, n, k)? / 1e12)
}

/// The model's four GEMM shapes at `tokens` rows, weighted by their operations: the rate the linear layers
/// could reach if every GEMM ran as fast as cuBLAS runs it alone.
fn model_gemm_tflops(gpu: &Gpu, c: &LlmConfig, tokens: usize) -> Result<f64> {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let shapes = [(3 * d, d), (d, d), (2 * f, d), (d, f)];
    let (mut seconds, mut flops) = (0.0, 0.0);
    for (n, k) in shapes {
        seconds += gemm_seconds(gpu, tokens, n, k)?;
        flops += 2.0 * (tokens * n * k) as f64;
    }
    Ok(flops / seconds / 1e12)
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.
pub fn copy_gbps(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let buffer = gpu.alloc(2 * bytes, "copy benchmark buffers")?;
    let (src, dst): (Dev<u8>, Dev<u8>) = (buffer.view(0, bytes), buffer.view(bytes, bytes));
    gpu.fill_bytes(src, 0x3c)?;
    let seconds = time_on_stream(gpu, 2, 10, || {
        // SAFETY: two disjoint ranges of one live buffer, `bytes` each.
        unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, gpu.stream.cu_stream()) }?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / seconds / 1e9)
}

fn driver_version() -> i32 {
    let mut version = 0;
    // SAFETY: a valid out-pointer, called after the driver was initialised.
    let _ = unsafe { sys::cuDriverGetVersion(&mut version) };
    version
}

pub(crate) fn device_json(gpu: &Gpu) -> Value {
    let driver = driver_version();
    json!({
        "name": gpu.name,
        "ordinal": gpu.ordinal,
        "compute_capability": format!("{}.{}", gpu.arch.0, gpu.arch.1),
        "memory_bytes": gpu.total_memory,
        "driver": format!("{}.{}", driver / 1000, driver % 1000 / 10),
        "cublas": gpu.blas.version,
        "kernels": gpu.kernels.origin,
    })
}

/// What `bench embed` measures.
pub struct EmbedBenchSpec<'a> {
    pub preset: &'a str,
    pub config: LlmConfig,
    pub lengths: &'a [usize],
    pub batch_tokens: usize,
    pub seed: u64,
    pub warmup_batches: usize,
    /// Runs of the fullest batch after the timed ones with every launch timed (crate::cuda::profile); 0 for
    /// none.
    pub profile: usize,
}

/// Runs the embedding pipeline (pack, upload, forward, pool, download; two slots, two streams) over random
/// items of the given lengths with random weights made on the device, after measuring the GEMM ceilings.
pub fn bench_embed(ordinal: usize, spec: &EmbedBenchSpec, quiet: bool) -> Result<Value> {
    let c = &spec.config;
    let gpu = Gpu::open(ordinal)?;
    refuse_emulated(&gpu)?;
    // The ceilings first, while the memory the model will take is still free.
    if !quiet {
        eprintln!("{}: measuring cuBLAS's fp16 GEMM rate…", gpu.describe());
    }
    let gemm_peak = gemm_tflops(&gpu, 8192, 8192, 8192)?;
    let gemm_model = model_gemm_tflops(&gpu, c, spec.batch_tokens)?;
    let model = GpuModel::random(&gpu, c, spec.seed)?;
    let mut encoder = CudaEncoder::new(gpu, model, spec.batch_tokens)?;

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5eed);
    let vocab = c.vocab_size as u32;
    let items: Vec<Vec<u32>> =
        spec.lengths.iter().map(|&n| (0..n).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let batches = batching::plan(spec.lengths, spec.batch_tokens);
    let refs = |batch: &[usize]| batch.iter().map(|&i| items[i].as_slice()).collect::<Vec<_>>();
    // Warm-up on the longest batches: kernels loaded, cuBLAS heuristics cached, clocks up.
    for batch in batches.iter().rev().take(spec.warmup_batches) {
        encoder.encode(&refs(batch))?;
    }
    if !quiet {
        eprintln!("embedding {} items in {} batches…", items.len(), batches.len());
    }
    let mut done = Vec::new();
    let mut finite = true;
    let started = Instant::now();
    for batch in &batches {
        if encoder.submit(&refs(batch), &mut done)? {
            finite &= done.iter().all(|v| v.is_finite());
        }
    }
    while encoder.flush(&mut done)? {
        finite &= done.iter().all(|v| v.is_finite());
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(finite, "the benchmark produced non-finite embeddings (fp16 overflow in the random model?)");
    let batch_ms = 1e3 * seconds / batches.len() as f64;
    let profile = (spec.profile > 0)
        .then(|| {
            // The fullest batch again, one run at a time (so its GEMMs keep one shape each): device time
            // per kernel and GEMM shape of a batch.
            let tokens_of = |batch: &Vec<usize>| batch.iter().map(|&i| spec.lengths[i]).sum::<usize>();
            let fullest = batches.iter().max_by_key(|b| tokens_of(b)).map(|b| refs(b)).unwrap_or_default();
            let (profiler, ctx) = (encoder.gpu().profiler.clone(), encoder.gpu().ctx.clone());
            profiler.profile_units(&ctx, "batch", spec.profile, batch_ms, |_| encoder.encode(&fullest).map(drop))
        })
        .transpose()?;

    let tokens: usize = spec.lengths.iter().sum();
    let flops: f64 = spec.lengths.iter().map(|&n| c.flops_per_sequence(n)).sum();
    let per_token = c.flops_per_token();
    let tokens_per_s = tokens as f64 / seconds;
    let memory = encoder.memory();
    let (free, total) = encoder.gpu().memory()?;
    Ok(json!({
        "bench": "embed",
        "engine": "learn-kern",
        "preset": spec.preset,
        "device": device_json(encoder.gpu()),
        "batch_tokens": spec.batch_tokens,
        "items": items.len(),
        "tokens": tokens,
        "batches": batches.len(),
        "min_len": spec.lengths.iter().min(),
        "max_len": spec.lengths.iter().max(),
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "items_per_s": items.len() as f64 / seconds,
        "tflops": flops / seconds / 1e12,
        "gflop_per_token": per_token / 1e9,
        "gemm_peak_tflops": gemm_peak,
        "gemm_model_shapes_tflops": gemm_model,
        // The target: tokens/s ≥ 0.8 × (GEMM rate ÷ linear-layer FLOP per token).
        "fraction_of_gemm_peak": tokens_per_s * per_token / (gemm_peak * 1e12),
        "fraction_of_model_gemms": tokens_per_s * per_token / (gemm_model * 1e12),
        "target_tokens_per_s": 0.8 * gemm_peak * 1e12 / per_token,
        // Packed varlen batches compute no padding; the budget fill says how full the batches are.
        "padding_efficiency": 1.0,
        "batch_fill": tokens as f64 / (batches.len() * spec.batch_tokens) as f64,
        "memory": {
            "weights_bytes": memory.weights,
            "arena_bytes": memory.arena,
            "device_used_bytes": memory.device_used.max(total - free),
            "device_total_bytes": total,
        },
        "profile": profile,
    }))
}
