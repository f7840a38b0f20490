//! `learn-kern bench train` (SPEC §7): the GPU training step at a preset's shapes, end to end as `train`
//! runs it (content gathered on the host from a table in memory, copied, both towers, loss, backward,
//! Adam), reported as steps/s, users/s, tokens/s and MFU against cuBLAS's fp16 GEMM rate measured in the
//! same run, with peak device memory. The inputs are drawn as tools/peer/train_torch.py draws them (every
//! user exactly H history and T target items, ids from a Zipf law over a random permutation of the
//! catalogue), and the FLOP count is its formula, so the two reports compare line by line.

use super::bench::{device_json, gemm_tflops};
use super::trainer::{ContentRows, GpuTrainer, Launch};
use crate::cpu::infonce::LossPositions;
use crate::data::sequences::UserSequence;
use crate::pch::config::ItemTower;
use crate::pch::{PchConfig, PchParams};
use crate::train::engine::{OptimState, StepEngine, StepSettings};
use crate::train::optim::AdamConfig;
use anyhow::{Result, ensure};
use half::f16;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::time::Instant;

/// What `bench train` runs.
#[derive(Clone, Debug)]
pub struct TrainBenchSpec {
    pub preset: String,
    pub config: PchConfig,
    pub batch_users: usize,
    pub history: usize,
    pub targets: usize,
    /// Catalogue size: rows of the random content table.
    pub items: usize,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    /// Replay the step from CUDA graphs (the phases are then not timed) or launch every kernel.
    pub cuda_graphs: bool,
    /// Updates after the timed ones with every launch timed (crate::cuda::profile); 0 for none. They run
    /// the timed updates' launches (a graph's, made from the host, with graphs on).
    pub profile: usize,
}

/// Random unit content rows, fp16, in host memory.
struct ContentTable {
    dim: usize,
    rows: Vec<f16>,
}

impl ContentTable {
    fn random(items: usize, dim: usize, seed: u64) -> Self {
        let mut rows = vec![f16::ZERO; items * dim];
        rows.par_chunks_mut(dim).enumerate().for_each(|(r, out)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ r as u64);
            let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            out.iter_mut().zip(&v).for_each(|(o, x)| *o = f16::from_f32(x / norm));
        });
        ContentTable { dim, rows }
    }
}

impl ContentRows for ContentTable {
    fn dim(&self) -> usize {
        self.dim
    }

    fn read_row_f16(&self, row: usize, out: &mut [f16]) {
        out.copy_from_slice(&self.rows[row * self.dim..(row + 1) * self.dim]);
    }
}

/// Item ids from a Zipf law with exponent 1 over a random permutation of `items` (the peer's sampler).
struct Zipf {
    cumulative: Vec<f64>,
    permutation: Vec<u32>,
}

impl Zipf {
    fn new(items: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=items)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        let mut permutation: Vec<u32> = (0..items as u32).collect();
        permutation.shuffle(rng);
        Zipf { cumulative, permutation }
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> u32 {
        let u = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(0.0);
        let at = self.cumulative.partition_point(|&c| c < u);
        self.permutation[at.min(self.permutation.len() - 1)]
    }
}

/// FLOPs of one training step of the towers (tools/peer/train_torch.py's `model_flops`): a multiply-add is
/// 2, a step 3 × forward; per position the adaptor, the layers' GEMMs and the head, plus causal attention
/// over the visible (key ≤ query) pairs; the loss's score products are not counted.
pub fn model_flops(c: &PchConfig, b: usize, h: usize, t: usize, item_tower: ItemTower) -> f64 {
    let (dc, d, f, o, layers) =
        (c.d_content as f64, c.d_model as f64, c.d_ff as f64, c.d_out as f64, c.n_layers as f64);
    let per_position = 2.0 * dc * d + layers * (8.0 * d * d + 4.0 * d * f) + 2.0 * d * o;
    let causal = |len: usize| layers * 4.0 * d * (len * (len + 1) / 2) as f64;
    let items = match item_tower {
        ItemTower::Causal => causal(t),
        ItemTower::SelfOnly => layers * 4.0 * d * t as f64,
    };
    3.0 * b as f64 * ((h + t) as f64 * per_position + causal(h) + items)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `spec.warmup` untimed and `spec.steps` timed updates on `cuda:ordinal`.
pub fn bench_train(ordinal: usize, spec: &TrainBenchSpec, quiet: bool) -> Result<Value> {
    ensure!(spec.steps > 0 && spec.items > 0, "bench train: --steps and --items must be at least 1");
    let c = &spec.config;
    let (b, h, t) = (spec.batch_users, spec.history, spec.targets);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let content = ContentTable::random(spec.items, c.d_content, spec.seed);
    let zipf = Zipf::new(spec.items, &mut rng);
    let batches = spec.warmup + spec.steps;
    let users: Vec<UserSequence> = (0..batches * b)
        .map(|u| UserSequence {
            user: format!("u{u}"),
            line: u + 1,
            history: (0..h).map(|_| zipf.draw(&mut rng)).collect(),
            targets: (0..t).map(|_| zipf.draw(&mut rng)).collect(),
        })
        .collect();
    let settings = StepSettings {
        history: h,
        targets: t,
        tau: 0.05,
        keep_false_negatives: false,
        positions: LossPositions::All,
        item_tower: c.item_tower,
        clip_grad_norm: None,
        adam: AdamConfig::default(),
        seed: spec.seed,
        log_q: None,
    };
    let params = PchParams::init(c, spec.seed)?;
    let mut trainer = GpuTrainer::new(ordinal, settings, &content, OptimState::fresh(params), b)?;
    super::bench::refuse_emulated(trainer.gpu())?;
    if !quiet {
        eprintln!("{}: measuring cuBLAS's fp16 GEMM rate…", trainer.gpu().describe());
    }
    let gemm_peak = gemm_tflops(trainer.gpu(), 8192, 8192, 8192)?;
    trainer.set_launch(if spec.cuda_graphs { Launch::Graphs } else { Launch::Eager });
    trainer.time_phases()?;

    let batch = |i: usize| users[i * b..(i + 1) * b].iter().collect::<Vec<_>>();
    let (mut times, mut losses, mut skipped) = (Vec::with_capacity(spec.steps), Vec::new(), 0);
    let mut phases: [Vec<f64>; 4] = Default::default();
    if !quiet {
        eprintln!("{} warm-up and {} timed updates of {} users × ({h} + {t}) items…", spec.warmup, spec.steps, b);
    }
    for i in 0..batches {
        let next = (i + 1 < batches).then(|| batch(i + 1));
        let started = Instant::now();
        // The lr stays constant: the schedule costs nothing on the device and changes no timing.
        let outcome = trainer.step(&batch(i), next.as_deref(), 1e-4)?;
        let seconds = started.elapsed().as_secs_f64();
        losses.push(outcome.loss);
        skipped += outcome.skipped as usize;
        if i >= spec.warmup {
            times.push(seconds);
            if let Some(p) = trainer.phase_times()? {
                for (all, ms) in phases.iter_mut().zip([p.forward, p.loss, p.backward, p.optimizer]) {
                    all.push(ms);
                }
            }
        }
    }
    ensure!(losses.iter().all(|l| l.is_finite()), "bench train: a non-finite loss");
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = percentile(&sorted, 0.5);
    // None with CUDA graphs: no event falls between a replay's launches.
    let phase_ms: Vec<Option<f64>> = phases
        .iter_mut()
        .map(|all| {
            all.sort_by(f64::total_cmp);
            (!all.is_empty()).then(|| percentile(all, 0.5))
        })
        .collect();
    let profile =
        (spec.profile > 0).then(|| profile_updates(&mut trainer, spec, &batch, batches, 1e3 * median)).transpose()?;
    let flops = model_flops(c, b, h, t, c.item_tower);
    let tflops = flops / median / 1e12;
    let (free, total) = trainer.gpu().memory()?;
    let memory = trainer.memory();
    Ok(json!({
        "bench": "train",
        "engine": "learn-kern",
        "preset": spec.preset,
        "device": device_json(trainer.gpu()),
        "batch_users": b,
        "history": h,
        "targets": t,
        "items": spec.items,
        "steps": spec.steps,
        "step_ms_median": 1e3 * median,
        "step_ms_p10": 1e3 * percentile(&sorted, 0.1),
        "step_ms_p90": 1e3 * percentile(&sorted, 0.9),
        "steps_per_s": 1.0 / median,
        "users_per_s": b as f64 / median,
        "tokens_per_s": (b * (h + t)) as f64 / median,
        "model_tflop_per_step": flops / 1e12,
        "tflops": tflops,
        "gemm_peak_tflops": gemm_peak,
        "mfu": tflops / gemm_peak,
        "peak_memory_bytes": total - free,
        "cuda_graphs": spec.cuda_graphs,
        "cuda_graphs_captured": trainer.graphs_captured(),
        // Device time of each phase (median over the timed updates), and the loss's share of the update;
        // null with CUDA graphs.
        "phases_ms": {
            "towers_forward": phase_ms[0],
            "infonce": phase_ms[1],
            "towers_backward": phase_ms[2],
            "optimizer": phase_ms[3],
        },
        "infonce_fraction": phase_ms[1].map(|ms| ms / (1e3 * median)),
        "memory": {
            "parameters_and_optimizer_bytes": memory.parameters,
            "activation_bytes": memory.activations,
            "staging_bytes": memory.staging,
            "device_used_bytes": total - free,
            "device_total_bytes": total,
        },
        "loss_first": losses.first(),
        "loss_last": losses.last(),
        "compile_s": Value::Null,
        "skipped_steps": skipped,
        "profile": profile,
    }))
}

/// `spec.profile` more updates with each launch timed, over the bench's batches again from the first:
/// device time per kernel and GEMM shape, against the timed updates' median of `update_ms`.
fn profile_updates<'u>(
    trainer: &mut GpuTrainer,
    spec: &TrainBenchSpec,
    batch: &impl Fn(usize) -> Vec<&'u UserSequence>,
    batches: usize,
    update_ms: f64,
) -> Result<Value> {
    if spec.cuda_graphs {
        trainer.set_launch(Launch::Bucketed);
    }
    let (profiler, ctx) = (trainer.gpu().profiler.clone(), trainer.gpu().ctx.clone());
    profiler.profile_units(&ctx, "update", spec.profile, update_ms, |i| {
        let next = batch((i + 1) % batches);
        trainer.step(&batch(i % batches), Some(&next), 1e-4).map(drop)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flop_count_is_the_peers() {
        // tools/peer/train_torch.py's model_flops at pch-base, B 30, H 80, T 40: about 1.92 TFLOP.
        let c = PchConfig::base();
        let per_position =
            2.0 * 4096.0 * 768.0 + 12.0 * (8.0 * 768.0f64.powi(2) + 4.0 * 768.0 * 3072.0) + 2.0 * 768.0 * 64.0;
        let attention = |n: f64| 12.0 * 4.0 * 768.0 * n * (n + 1.0) / 2.0;
        let want = 3.0 * 30.0 * (120.0 * per_position + attention(80.0) + attention(40.0));
        assert_eq!(model_flops(&c, 30, 80, 40, ItemTower::Causal), want);
        assert!((want / 1e12 - 1.92).abs() < 0.01, "{}", want / 1e12);
        let self_only = model_flops(&c, 30, 80, 40, ItemTower::SelfOnly);
        assert_eq!(want - self_only, 3.0 * 30.0 * (attention(40.0) - 12.0 * 4.0 * 768.0 * 40.0));
    }

    #[test]
    fn zipf_draws_favour_the_first_ranks_of_a_permutation() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let zipf = Zipf::new(1000, &mut rng);
        let mut counts = vec![0usize; 1000];
        for _ in 0..100_000 {
            counts[zipf.draw(&mut rng) as usize] += 1;
        }
        let top = zipf.permutation[0] as usize;
        // Rank 1 has probability 1/H(1000) ≈ 0.134; rank 1000 about 1.3e-4.
        assert!((counts[top] as f64 / 1e5 - 0.134).abs() < 0.01, "{}", counts[top]);
        assert!(counts.iter().filter(|&&c| c > 0).count() > 900, "most of the catalogue is drawn");
    }

    #[test]
    fn content_rows_are_unit_fp16_rows() {
        let table = ContentTable::random(5, 64, 1);
        let mut row = vec![f16::ZERO; 64];
        table.read_row_f16(3, &mut row);
        let norm: f32 = row.iter().map(|x| x.to_f32().powi(2)).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        assert_ne!(table.rows[..64], table.rows[64..128], "rows differ");
    }
}
