//! The GPU training step (src/cuda/trainer) against the CPU reference engine (src/train/engine.rs): the
//! loss and every parameter's gradient after one update within the 1e-2 (fp16 compute against f32),
//! a 50-update loss curve that tracks the CPU's, an overflowing update skipped without touching anything,
//! and `train --device cuda` resuming a CPU run (and the reverse) in the same run directory. Then the step
//! against itself: replayed from CUDA graphs and padded to its shape bucket, the same updates give the same
//! bits, an overflow skipped inside a replay included; padded and unpadded give the same bits on the
//! emulator, and on a GPU wherever cuBLAS keeps its algorithm for the padded shapes. Each test skips, saying
//! why, without a GPU.

mod cuda_support;

use cuda_support::{assert_rel, binary, gpu, rng};
use learn_kern::cpu::infonce::LossPositions;
use learn_kern::cuda::Gpu;
use learn_kern::cuda::bucket::padded_rows;
use learn_kern::cuda::trainer::{GpuTrainer, Launch};
use learn_kern::data::sequences::UserSequence;
use learn_kern::embed::store::ContentStore;
use learn_kern::npy::{Dtype, NpyMatrixMut};
use learn_kern::pch::config::ItemTower;
use learn_kern::pch::{PchConfig, PchParams};
use learn_kern::train::engine::{CpuEngine, OptimState, StepEngine, StepSettings};
use learn_kern::train::loss_scale::LossScale;
use learn_kern::train::optim::AdamConfig;
use learn_kern::train::schedule::Schedule;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::process::Command;

const ITEMS: usize = 400;
const D_CONTENT: usize = 96;

fn config() -> PchConfig {
    PchConfig { d_content: D_CONTENT, d_model: 128, n_layers: 2, n_heads: 2, d_ff: 256, d_out: 64, ..PchConfig::base() }
}

/// A content store of random unit fp16 rows, as `embed --dtype f16` writes one.
fn write_store(dir: &Path, rng: &mut ChaCha8Rng) -> ContentStore {
    std::fs::create_dir_all(dir).unwrap();
    let mut matrix = NpyMatrixMut::create(&dir.join("embeddings.npy"), ITEMS, D_CONTENT, Dtype::F16).unwrap();
    for r in 0..ITEMS {
        let mut row: Vec<f32> = (0..D_CONTENT).map(|_| rng.random_range(-1.0..1.0)).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
        matrix.write_row(r, &row);
    }
    matrix.flush().unwrap();
    let ids: Vec<String> = (0..ITEMS).map(|i| format!("i{i}")).collect();
    std::fs::write(dir.join("ids.txt"), ids.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("meta.json"), "{}").unwrap();
    ContentStore::open(dir).unwrap()
}

/// Users with histories of 1..=30 items and 1..=10 targets from a popularity-skewed pool, so that users
/// share targets and the false-negative mask matters.
fn users(rng: &mut ChaCha8Rng, n: usize) -> Vec<UserSequence> {
    let item = |rng: &mut ChaCha8Rng| ((rng.random::<f64>().powi(2)) * ITEMS as f64) as u32;
    (0..n)
        .map(|u| UserSequence {
            user: format!("u{u}"),
            line: u + 1,
            history: (0..rng.random_range(1..=30)).map(|_| item(rng)).collect(),
            targets: (0..rng.random_range(1..=10)).map(|_| item(rng)).collect(),
        })
        .collect()
}

fn settings(item_tower: ItemTower, log_q: bool) -> StepSettings {
    StepSettings {
        history: 24,
        targets: 8,
        tau: 0.05,
        keep_false_negatives: false,
        positions: LossPositions::All,
        item_tower,
        clip_grad_norm: None,
        adam: AdamConfig::default(),
        seed: 7,
        log_q: log_q.then(|| (0..ITEMS).map(|i| -6.0 + (i % 11) as f32 * 0.1).collect()),
    }
}

/// BERT's initialisation plus noise, so that no LayerNorm weight or bias hides a wrong index.
fn params(rng: &mut ChaCha8Rng) -> PchParams<f32> {
    let mut p = PchParams::init(&config(), rng.random()).unwrap();
    p.flat_mut().iter_mut().for_each(|v| *v += rng.random_range(-0.05..0.05));
    p
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn one_update_matches_the_cpu_loss_and_every_gradient() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step one update");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 20);
    let batch: Vec<&UserSequence> = users.iter().collect();
    let start = params(&mut rng);
    for (tower, log_q) in [(ItemTower::Causal, false), (ItemTower::SelfOnly, true)] {
        let what = format!("{tower:?} item tower, log q {log_q}");
        let lr = 1e-3;
        let mut cpu = CpuEngine::new(settings(tower, log_q), &store, OptimState::fresh(start.clone())).unwrap();
        let mut gpu = GpuTrainer::new(0, settings(tower, log_q), &store, OptimState::fresh(start.clone()), 20).unwrap();
        let want = cpu.step(&batch, None, lr).unwrap();
        let got = gpu.step(&batch, None, lr).unwrap();
        eprintln!(
            "{what}: loss {} (CPU {}), grad norm {} (CPU {})",
            got.loss, want.loss, got.grad_norm, want.grad_norm
        );
        assert!(!got.skipped, "{what}: the first update overflowed at the initial scale");
        assert_eq!(got.pairs, want.pairs, "{what}: pairs");
        assert!((got.loss - want.loss).abs() <= 1e-2 * want.loss, "{what}: loss {} vs {}", got.loss, want.loss);
        assert!((got.grad_norm - want.grad_norm).abs() <= 1e-2 * want.grad_norm, "{what}: gradient norm");
        let grads = gpu.gradients().unwrap();
        for ((name, _, g), (_, _, w)) in grads.tensors().zip(cpu.gradients().tensors()) {
            assert_rel(&wide(g), &wide(w), 1e-2, &format!("{what}: d {name}"));
        }
        // Adam's first update moves each parameter by about lr·sign(g): equal where the signs agree.
        let (after_gpu, after_cpu) = (gpu.state().unwrap(), cpu.state().unwrap());
        assert_eq!(after_gpu.adam_step, 1);
        let worst =
            after_gpu.params.flat().iter().zip(after_cpu.params.flat()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst <= 2.0 * lr as f32 + 1e-6, "{what}: parameters after the update differ by {worst}");
    }
}

#[test]
fn a_fifty_update_loss_curve_tracks_the_cpu() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step curve");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 160);
    let start = params(&mut rng);
    let s = settings(ItemTower::Causal, false);
    let mut cpu = CpuEngine::new(s.clone(), &store, OptimState::fresh(start.clone())).unwrap();
    let mut gpu = GpuTrainer::new(0, s, &store, OptimState::fresh(start), 16).unwrap();
    let (steps, schedule) = (50, Schedule::new(2e-3, 50, 0.1).unwrap());
    let batches: Vec<Vec<&UserSequence>> =
        (0..steps).map(|i| users.iter().cycle().skip(i * 16).take(16).collect()).collect();
    let (mut curve_cpu, mut curve_gpu) = (Vec::new(), Vec::new());
    for (i, batch) in batches.iter().enumerate() {
        let next = batches.get(i + 1).map(|b| b.as_slice());
        curve_cpu.push(cpu.step(batch, next, schedule.lr_at(i)).unwrap().loss);
        let got = gpu.step(batch, next, schedule.lr_at(i)).unwrap();
        assert!(!got.skipped, "update {i} overflowed");
        curve_gpu.push(got.loss);
    }
    eprintln!("CPU: {curve_cpu:.4?}\nGPU: {curve_gpu:.4?}");
    let rel: Vec<f64> = curve_gpu.iter().zip(&curve_cpu).map(|(g, c)| (g - c).abs() / c).collect();
    let mean = rel.iter().sum::<f64>() / rel.len() as f64;
    assert!(rel.iter().all(|&r| r <= 0.05), "an update's loss is more than 5% off the CPU's: {rel:.3?}");
    assert!(mean <= 0.01, "the curves drift apart: mean relative difference {mean:.4}");
    assert!(curve_gpu[steps - 5..].iter().sum::<f64>() < curve_gpu[..5].iter().sum::<f64>(), "the loss did not fall");
}

#[test]
fn an_overflowing_update_is_skipped_and_the_scale_backs_off() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step overflow");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 12);
    let batch: Vec<&UserSequence> = users.iter().collect();
    let start = params(&mut rng);
    // 2^40 times the loss's gradient overflows fp16 in the first backward GEMM.
    let state = OptimState {
        loss_scale: LossScale { scale: 2f64.powi(40), clean_steps: 5 },
        ..OptimState::fresh(start.clone())
    };
    let mut gpu = GpuTrainer::new(0, settings(ItemTower::Causal, false), &store, state, 12).unwrap();
    let first = gpu.step(&batch, None, 1e-3).unwrap();
    assert!(first.skipped && !first.grad_norm.is_finite() && first.loss.is_finite(), "{first:?}");
    let after = gpu.state().unwrap();
    assert_eq!(after.params.flat(), start.flat(), "a skipped update changed the parameters");
    assert!(after.m.iter().chain(&after.v).all(|&x| x == 0.0), "a skipped update changed the moments");
    assert_eq!((after.adam_step, after.loss_scale), (0, LossScale { scale: 2f64.powi(39), clean_steps: 0 }));
    // Halving continues until the gradients fit, then updates apply.
    let mut applied = None;
    for i in 0..30 {
        if !gpu.step(&batch, None, 1e-3).unwrap().skipped {
            applied = Some(i);
            break;
        }
    }
    assert!(applied.is_some(), "the scale never came down far enough");
    assert_eq!(gpu.state().unwrap().adam_step, 1);
}

#[test]
fn the_optimiser_state_moves_between_the_engines() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step state");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 96);
    let start = params(&mut rng);
    let s = settings(ItemTower::Causal, false);
    let batches: Vec<Vec<&UserSequence>> = users.chunks(16).map(|c| c.iter().collect()).collect();
    let run = |engine: &mut dyn StepEngine, from: usize| -> Vec<f64> {
        (from..6)
            .map(|i| engine.step(&batches[i], batches.get(i + 1).map(|b| b.as_slice()), 1e-3).unwrap().loss)
            .collect()
    };
    let cpu_only = run(&mut CpuEngine::new(s.clone(), &store, OptimState::fresh(start.clone())).unwrap(), 0);
    // Three updates on one device, three on the other, in both orders.
    let mut cpu = CpuEngine::new(s.clone(), &store, OptimState::fresh(start.clone())).unwrap();
    run(&mut cpu, 3);
    let mut gpu = GpuTrainer::new(0, s.clone(), &store, cpu.state().unwrap(), 16).unwrap();
    let gpu_after_cpu = run(&mut gpu, 3);
    assert_eq!(gpu.state().unwrap().adam_step, 6);
    let mut gpu = GpuTrainer::new(0, s.clone(), &store, OptimState::fresh(start), 16).unwrap();
    run(&mut gpu, 3);
    let state = gpu.state().unwrap();
    assert_eq!(state.adam_step, 3);
    let cpu_after_gpu = run(&mut CpuEngine::new(s, &store, state).unwrap(), 3);
    for (what, got) in [("GPU after CPU", gpu_after_cpu), ("CPU after GPU", cpu_after_gpu)] {
        for (g, w) in got.iter().zip(&cpu_only[3..]) {
            assert!((g - w).abs() <= 2e-2 * w, "{what}: loss {g} vs {w} on the CPU alone");
        }
    }
}

#[test]
fn train_on_cuda_continues_a_killed_cpu_run() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step cli");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    write_store(&work.join("store"), &mut rng);
    let ids = |rows: &[u32]| rows.iter().map(|r| format!("\"i{r}\"")).collect::<Vec<_>>().join(",");
    let lines: Vec<String> = users(&mut rng, 64)
        .iter()
        .map(|u| {
            format!("{{\"user\":\"{}\",\"history\":[{}],\"targets\":[{}]}}", u.user, ids(&u.history), ids(&u.targets))
        })
        .collect();
    std::fs::write(work.join("seqs.jsonl"), lines.join("\n") + "\n").unwrap();
    let run = work.join("run");
    let command = |device: &str| {
        let mut cmd = Command::new(binary());
        cmd.env_remove("RUST_BACKTRACE").args(["--quiet", "--json", "--device", device, "train"]);
        cmd.arg("--content")
            .arg(work.join("store"))
            .arg("--sequences")
            .arg(work.join("seqs.jsonl"))
            .arg("--out")
            .arg(&run);
        cmd.args(["--d-model", "128", "--layers", "2", "--heads", "2", "--d-ff", "256", "--batch-users", "16"]);
        cmd.args(["--history", "24", "--targets", "8", "--lr", "1e-3", "--steps", "120", "--checkpoint-every", "3"]);
        cmd
    };
    // The CPU run is killed once it has saved a state.
    let mut child = command("cpu").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !run.join("optimizer.safetensors").exists() {
        assert!(std::time::Instant::now() < deadline, "the CPU run saved nothing in two minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    // The same command on the GPU continues it to the end.
    let out = command("cuda").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let from = report["resumed_from"].as_u64().expect("the GPU run resumed");
    assert!((3..120).contains(&from), "resumed from {from}");
    let log = std::fs::read_to_string(run.join("train.log.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=120).collect::<Vec<_>>(), "every update logged once, in order");
    let losses: Vec<f64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&losses[110..]) < mean(&losses[..10]), "the GPU continuation did not train");
}

/// Bits of everything an update leaves: parameters, Adam's moments and step, the loss scale.
fn state_bits(engine: &dyn StepEngine) -> (Vec<u32>, Vec<u32>, Vec<u32>, u64, LossScale) {
    let state = engine.state().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (bits(state.params.flat()), bits(&state.m), bits(&state.v), state.adam_step, state.loss_scale)
}

/// An update's outcome as bits, to compare engines exactly.
fn outcome_bits(o: &learn_kern::train::engine::StepOutcome) -> (u64, u64, usize, bool) {
    (o.loss.to_bits(), o.grad_norm.to_bits(), o.pairs, o.skipped)
}

/// Whether padded launches left the unpadded run's bits, said on stderr. On the emulator, whose GEMMs sum
/// in order, they must; on a GPU cuBLAS may pick another algorithm (another split of K) for a padded GEMM
/// shape and round differently, so there a difference is said and the caller holds the two runs to the
/// CPU comparison's bounds instead. The padding logic itself is what the emulator checks bit for bit.
fn padding_kept_the_bits(gpu: &Gpu, same: bool, what: &str) -> bool {
    assert!(same || !gpu.is_emulated(), "{what}: padding changed the results");
    if !same {
        eprintln!("{what}: padded and unpadded differ in bits on {} (cuBLAS's choice for a padded shape)", gpu.name);
    }
    same
}

/// A GPU trainer launching as `launch`.
fn trainer<'a>(
    s: &StepSettings,
    store: &'a ContentStore,
    state: OptimState,
    users: usize,
    launch: Launch,
) -> GpuTrainer<'a> {
    let mut gpu = GpuTrainer::new(0, s.clone(), store, state, users).unwrap();
    gpu.set_launch(launch);
    gpu
}

#[test]
fn graphs_replay_the_eager_step_bit_for_bit_across_buckets() {
    let Some(device) = gpu() else { return };
    let mut rng = rng("cuda_train_step graphs");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 69);
    let start = params(&mut rng);
    let s = StepSettings { clip_grad_norm: Some(0.5), ..settings(ItemTower::Causal, true) };
    // Batches of 16 and 7 users, alternately: their rows fall into different buckets, which random rows
    // make come back only by chance (all seven differ in about one run in 4,000), so the last batch repeats
    // the first one's users: at least one bucket comes back.
    let batches: Vec<Vec<&UserSequence>> =
        [0..16, 16..32, 32..39, 39..55, 55..62, 62..69, 0..16].into_iter().map(|r| users[r].iter().collect()).collect();
    let bucket = |b: &[&UserSequence]| {
        let rows = |len: fn(&UserSequence, usize) -> usize, max| padded_rows(b.iter().map(|u| len(u, max)).sum());
        (b.len(), rows(|u, h| u.recent_history(h).len(), s.history), rows(|u, t| u.first_targets(t).len(), s.targets))
    };
    let buckets: std::collections::HashSet<_> = batches.iter().map(|b| bucket(b)).collect();
    assert!(buckets.len() >= 2 && buckets.len() < batches.len(), "the batches make {} buckets", buckets.len());
    let peak_lr = 2e-3;
    let schedule = Schedule::new(peak_lr, batches.len(), 0.3).unwrap();
    let run = |launch: Launch| {
        let mut gpu = trainer(&s, &store, OptimState::fresh(start.clone()), 16, launch);
        let outcomes: Vec<_> = (0..batches.len())
            .map(|i| {
                let next = batches.get(i + 1).map(|b| b.as_slice());
                outcome_bits(&gpu.step(&batches[i], next, schedule.lr_at(i)).unwrap())
            })
            .collect();
        (outcomes, state_bits(&gpu), gpu.graphs_captured())
    };
    let (eager, bucketed, graphs) = (run(Launch::Eager), run(Launch::Bucketed), run(Launch::Graphs));
    assert_eq!((eager.2, bucketed.2, graphs.2), (0, 0, buckets.len()), "graphs captured, one per bucket");
    assert!(eager.0.iter().all(|o| !o.3), "an update overflowed");
    // A replay is the launches it captured, on any GPU.
    assert!(
        graphs.0 == bucketed.0 && graphs.1 == bucketed.1,
        "graph replays differ from the same launches made eagerly"
    );
    if !padding_kept_the_bits(&device, bucketed == eager, "seven updates in two buckets") {
        // An Adam update moves a parameter by at most lr·(1 − β1)/√(1 − β2) ≈ 3.2·lr, whatever its gradient.
        for (i, (p, e)) in bucketed.0.iter().zip(&eager.0).enumerate() {
            let (p, e) = (f64::from_bits(p.0), f64::from_bits(e.0));
            assert!((p - e).abs() <= 1e-2 * e, "update {i}: loss {p} padded, {e} not");
        }
        let drift = bucketed.1.0.iter().zip(&eager.1.0).map(|(a, b)| (f32::from_bits(*a) - f32::from_bits(*b)).abs());
        let worst = drift.fold(0.0f32, f32::max);
        assert!(worst <= 2.0 * 3.2 * peak_lr as f32 * batches.len() as f32, "parameters drifted {worst} apart");
    }
}

#[test]
fn an_overflow_inside_a_replayed_graph_is_skipped() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("cuda_train_step graph overflow");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    let users = users(&mut rng, 12);
    let batch: Vec<&UserSequence> = users.iter().collect();
    let start = params(&mut rng);
    let s = settings(ItemTower::Causal, false);
    // 2^40 overflows fp16, and so do the halvings after it for a while: every one of them a replay.
    let state = || OptimState {
        loss_scale: LossScale { scale: 2f64.powi(40), clean_steps: 5 },
        ..OptimState::fresh(start.clone())
    };
    let mut graphs = trainer(&s, &store, state(), 12, Launch::Graphs);
    let mut eager = trainer(&s, &store, state(), 12, Launch::Eager);
    let (mut skipped, mut applied) = (0, 0);
    for i in 0..40 {
        let got = graphs.step(&batch, Some(&batch), 1e-3).unwrap();
        assert_eq!(outcome_bits(&got), outcome_bits(&eager.step(&batch, Some(&batch), 1e-3).unwrap()), "update {i}");
        if got.skipped {
            skipped += 1;
            if i == 1 {
                let after = graphs.state().unwrap();
                assert_eq!(after.params.flat(), start.flat(), "a replay that overflowed changed the parameters");
                assert!(
                    after.m.iter().chain(&after.v).all(|&x| x == 0.0),
                    "a replay that overflowed changed the moments"
                );
                assert_eq!((after.adam_step, after.loss_scale.scale), (0, 2f64.powi(38)));
            }
        } else {
            applied += 1;
            if applied == 2 {
                break;
            }
        }
    }
    assert!(skipped >= 2 && applied == 2, "{skipped} updates skipped, {applied} applied");
    assert_eq!(graphs.graphs_captured(), 1, "one batch, one bucket, one graph replayed");
    assert!(state_bits(&graphs) == state_bits(&eager), "the replays' state differs from the eager step's");
    assert_eq!(graphs.state().unwrap().adam_step, 2);
}

#[test]
fn a_bucket_padded_with_a_dummy_sequence_gives_the_unpadded_result() {
    let Some(device) = gpu() else { return };
    let mut rng = rng("cuda_train_step padding");
    let dir = tempfile::tempdir().unwrap();
    let store = write_store(&dir.path().join("store"), &mut rng);
    // A draw whose rows fill the 64-row bucket exactly pads nothing and tests nothing (about one seed in
    // thirty), so draw again until both towers need a dummy sequence.
    let needs_padding = |users: &[UserSequence]| {
        let history_rows: usize = users.iter().map(|u| u.recent_history(24).len()).sum();
        let target_rows: usize = users.iter().map(|u| u.first_targets(8).len()).sum();
        !history_rows.is_multiple_of(64) && !target_rows.is_multiple_of(64)
    };
    let users = std::iter::repeat_with(|| users(&mut rng, 13)).find(|u| needs_padding(u)).unwrap();
    let batch: Vec<&UserSequence> = users.iter().collect();
    let start = params(&mut rng);
    for (tower, log_q, positions) in
        [(ItemTower::Causal, false, LossPositions::All), (ItemTower::SelfOnly, true, LossPositions::Last)]
    {
        let what = format!("{tower:?} item tower, log q {log_q}, {positions:?} positions");
        let s = StepSettings { positions, ..settings(tower, log_q) };
        let mut padded = trainer(&s, &store, OptimState::fresh(start.clone()), 13, Launch::Bucketed);
        let mut exact = trainer(&s, &store, OptimState::fresh(start.clone()), 13, Launch::Eager);
        let (got, want) = (padded.step(&batch, None, 1e-3).unwrap(), exact.step(&batch, None, 1e-3).unwrap());
        let (g, w) = (padded.gradients().unwrap(), exact.gradients().unwrap());
        let bits = |p: &PchParams<f32>| p.flat().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let same = outcome_bits(&got) == outcome_bits(&want)
            && bits(&g) == bits(&w)
            && state_bits(&padded) == state_bits(&exact);
        if !padding_kept_the_bits(&device, same, &what) {
            assert_eq!((got.pairs, got.skipped), (want.pairs, want.skipped), "{what}: pairs or skip");
            assert!((got.loss - want.loss).abs() <= 1e-2 * want.loss, "{what}: loss {} vs {}", got.loss, want.loss);
            for ((name, _, g), (_, _, w)) in g.tensors().zip(w.tensors()) {
                assert_rel(&wide(g), &wide(w), 1e-2, &format!("{what}: d {name}, padded"));
            }
        }
    }
}
