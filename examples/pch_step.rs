//! Times one PCH training step on the CPU (forward + backward, f32) — the shape `tools/pch_speed.py` runs in
//! PyTorch. Run: `cargo run --release --example pch_step [iterations] [min_len] [small|base]`;
//! RAYON_NUM_THREADS sets the threads. With `min_len` below 80, sequence lengths are drawn from min_len..=80
//! (padding is free). `small` (the default): d_model 256, 4 layers, batch 8; `base`: pch-base, batch 30.

use learn_kern::pch::{MaskKind, PchBatchShape, PchCache, PchConfig, PchInput, PchParams, backward, forward_reusing};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let min_len: usize = std::env::args().nth(2).map_or(Ok(80), |s| s.parse())?;
    let (cfg, batch) = match std::env::args().nth(3).as_deref() {
        Some("base") => (PchConfig::base(), 30),
        None | Some("small") => {
            (PchConfig { d_model: 256, n_layers: 4, n_heads: 4, d_ff: 1024, d_out: 64, ..PchConfig::tiny() }, 8)
        }
        Some(other) => anyhow::bail!("unknown shape {other}: small or base"),
    };
    let cfg = cfg.with_d_content(512);
    let len = 80;
    let params = PchParams::<f32>::init(&cfg, 0)?;
    let mut grads = params.zeros_like();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let content: Vec<f32> = (0..batch * len * cfg.d_content).map(|_| rng.random_range(-1.0..1.0)).collect();
    let d_out: Vec<f32> = (0..batch * len * cfg.d_out).map(|_| rng.random_range(-1.0..1.0)).collect();
    let lengths = (0..batch).map(|_| rng.random_range(min_len.min(len)..=len)).collect();
    let shape = PchBatchShape { batch, len, lengths };
    let mut cache = PchCache::default();

    let mut step = || -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        forward_reusing(&params, PchInput::Content(&content), &shape, MaskKind::Causal, None, &mut cache)?;
        let t1 = Instant::now();
        backward(&params, &cache, &d_out, &mut grads);
        Ok(((t1 - t0).as_secs_f64() * 1e3, t1.elapsed().as_secs_f64() * 1e3))
    };
    for _ in 0..3 {
        step()?;
    }
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut times: Vec<(f64, f64)> = (0..iterations).map(|_| step()).collect::<anyhow::Result<_>>()?;
    times.sort_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
    let (fwd, bwd) = times[times.len() / 2];
    let cpu = (cpu_seconds() - cpu0) * 1e3 / iterations as f64;
    let wall = wall0.elapsed().as_secs_f64() * 1e3 / iterations as f64;
    println!(
        "pch step d_model {}, {} layers, d_ff {}, d_content 512, B {batch} L {len} lengths {:?}, {} threads: \
         forward {fwd:.1} ms + backward {bwd:.1} ms = {:.1} ms (median of {iterations}); \
         mean {wall:.1} ms wall, {cpu:.1} ms CPU per step",
        cfg.d_model,
        cfg.n_layers,
        cfg.d_ff,
        shape.lengths,
        rayon::current_num_threads(),
        fwd + bwd
    );
    Ok(())
}

/// CPU time of the whole process (user + system), from /proc/self/stat; a busy machine inflates wall time
/// but much less the CPU time a step needs.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th, in clock ticks.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}
