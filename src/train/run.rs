//! The training loop (SPEC §4): batches of users → user tower over histories, item tower over targets (the
//! same module) → dense all-action InfoNCE → hand-written backward of both passes → global norm, clipping →
//! Adam with warm-up + cosine → log line; checkpoints and the optimiser state at intervals and at the end.
//!
//! A run directory holds `train.json` (the settings that determine the run), `checkpoint.safetensors`
//! (the latest parameters), `optimizer.safetensors` (parameters, Adam moments, step and RNG position:
//! everything needed to continue exactly, in one file so a kill can never pair mismatched halves) and
//! `train.log.jsonl`. Rerunning the same command, or `--resume DIR`, continues from the last saved step.

use super::checkpoint::{self, MappedSafetensors, write_f32_safetensors};
use super::engine::{CpuEngine, OptimState, StepEngine, StepSettings};
use super::loss_scale::LossScale;
use super::optim::AdamConfig;
use super::schedule::Schedule;
use crate::cpu::infonce::LossPositions;
use crate::data::sequences::{Sequences, UserSequence};
use crate::embed::store::ContentStore;
use crate::error::{at_least_one, input};
use crate::pch::config::{InputKind, PchConfig};
use crate::pch::params::PchParams;
use anyhow::{Context, Result, anyhow, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const SETTINGS: &str = "train.json";
pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const LOG: &str = "train.log.jsonl";

/// Everything that determines a run; stored as `train.json` and compared on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub content: String,
    pub sequences: String,
    pub model: PchConfig,
    pub init: Option<String>,
    pub history: usize,
    pub targets: usize,
    pub batch_users: usize,
    /// Total updates (from `--steps`, or `--epochs` × batches per epoch).
    pub steps: usize,
    pub lr: f64,
    pub warmup_frac: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_grad_norm: Option<f64>,
    pub tau: f64,
    pub keep_false_negatives: bool,
    /// Subtract log q(v) (the item's share of all training targets) from every score: the sampling-bias
    /// correction of in-batch negatives (see `cpu::infonce::InfoNceBatch::log_q`). Off: Eq. 1 as written.
    #[serde(default)]
    pub logq_correction: bool,
    pub loss_positions_last: bool,
    pub seed: u64,
    pub shuffle: bool,
    pub skip_unknown: bool,
    pub checkpoint_every: usize,
}

impl TrainSettings {
    fn adam(&self) -> AdamConfig {
        AdamConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// Checks the values a user controls, naming the flag.
    pub fn check(&self) -> Result<()> {
        at_least_one(&[("--history", self.history), ("--targets", self.targets), ("--batch-users", self.batch_users)])?;
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(input(format!("--tau must be a positive number, got {}", self.tau)));
        }
        if let Some(c) = self.clip_grad_norm
            && !(c > 0.0 && c.is_finite())
        {
            return Err(input(format!("--clip-grad-norm must be a positive number, got {c}")));
        }
        if self.checkpoint_every == 0 {
            return Err(input("--checkpoint-every must be at least 1"));
        }
        self.adam().check()?;
        Schedule::new(self.lr, self.steps, self.warmup_frac)?;
        Ok(())
    }
}

/// Where a run stands; saved in the optimizer file's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    /// Updates done.
    step: usize,
    /// Word position of the dropout RNG.
    dropout_word_pos: String,
    /// Seconds of training before this process (resumed runs keep counting).
    elapsed_s: f64,
    /// The fp16 loss scale of the GPU path and its clean steps since the last change (carried unchanged
    /// by the CPU, so a run can move between devices).
    loss_scale: f64,
    #[serde(default)]
    loss_scale_clean_steps: u32,
}

/// One line of `train.log.jsonl` (SPEC §4.4).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// `null` for a step whose fp16 gradients overflowed (then `skipped` is true).
    pub grad_norm: Option<f64>,
    pub users: usize,
    pub pairs: usize,
    pub elapsed_s: f64,
    /// Present (true) only for a GPU step skipped for overflow: nothing was applied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// How a call to [`train`] ended.
#[derive(Debug)]
pub struct TrainReport {
    pub steps_run: usize,
    pub total_steps: usize,
    pub resumed_from: Option<usize>,
    pub last: Option<LogLine>,
    pub seconds: f64,
    pub skipped_users: usize,
    pub dropped_ids: usize,
    pub users: usize,
}

/// The data a run reads.
pub struct TrainData<'a> {
    pub store: &'a ContentStore,
    pub sequences: &'a Sequences,
}

/// log q(v) for every store row: its share of the training targets the loss sees (each user's first
/// `targets`), add-one smoothed so an item never seen as a target has a finite value.
fn target_log_q(users: &[UserSequence], targets: usize, items: usize) -> Vec<f32> {
    let mut counts = vec![1.0f64; items];
    for user in users {
        for &row in user.first_targets(targets) {
            counts[row as usize] += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    counts.iter().map(|c| (c / total).ln() as f32).collect()
}

/// Batches per epoch for `users` users.
pub fn batches_per_epoch(users: usize, batch_users: usize) -> usize {
    users.div_ceil(batch_users.max(1))
}

/// The users of update `step`: epoch `step / per_epoch`, shuffled per epoch from the seed unless `--no-shuffle`.
struct Order {
    users: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    epoch: Option<(usize, Vec<usize>)>,
}

impl Order {
    fn batch_of(&mut self, step: usize) -> Vec<usize> {
        let per_epoch = batches_per_epoch(self.users, self.batch);
        let (epoch, b) = (step / per_epoch, step % per_epoch);
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.users).collect();
            if self.shuffle {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                rng.set_stream(epoch as u64);
                order.shuffle(&mut rng);
            }
            self.epoch = Some((epoch, order));
        }
        let order = &self.epoch.as_ref().map(|e| &e.1).expect("set above");
        order[b * self.batch..((b + 1) * self.batch).min(self.users)].to_vec()
    }
}

/// Where a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainDevice {
    Cpu,
    /// One GPU, by ordinal, with the step replayed from CUDA graphs or launched kernel by kernel.
    Cuda {
        ordinal: usize,
        graphs: bool,
    },
}

/// Overflowing steps in a row after which a GPU run stops: the scale has fallen from 2^16 to 1 and the
/// gradients still do not fit fp16, which no further halving can fix.
const MAX_SKIPS_IN_A_ROW: usize = 24;

/// Runs (or continues) the run in `out` to `settings.steps` updates on `device`.
pub fn train(
    settings: &TrainSettings,
    data: &TrainData,
    out: &Path,
    device: TrainDevice,
    quiet: bool,
) -> Result<TrainReport> {
    settings.check()?;
    let users = &data.sequences.users;
    if users.is_empty() {
        bail!(input(format!("{}: no user has both a history and targets", settings.sequences)));
    }
    check_model_fits(&settings.model, data.store)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    crate::fsutil::remove_stale_temps(out);

    let (optim, mut state, resumed_from) = start(settings, out)?;
    truncate_log(&out.join(LOG), state.step)?;
    let schedule = Schedule::new(settings.lr, settings.steps, settings.warmup_frac)?;
    let mut order = Order {
        users: users.len(),
        batch: settings.batch_users,
        seed: settings.seed,
        shuffle: settings.shuffle,
        epoch: None,
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(LOG))
        .with_context(|| format!("{}: cannot open the log", out.join(LOG).display()))?;

    let step_settings = StepSettings {
        history: settings.history,
        targets: settings.targets,
        tau: settings.tau as f32,
        keep_false_negatives: settings.keep_false_negatives,
        positions: if settings.loss_positions_last { LossPositions::Last } else { LossPositions::All },
        item_tower: settings.model.item_tower,
        clip_grad_norm: settings.clip_grad_norm,
        adam: settings.adam(),
        seed: settings.seed,
        log_q: settings.logq_correction.then(|| target_log_q(users, settings.targets, data.store.len())),
    };
    let mut engine: Box<dyn StepEngine + '_> = match device {
        TrainDevice::Cpu => Box::new(CpuEngine::new(step_settings, data.store, optim)?),
        TrainDevice::Cuda { ordinal, graphs } => {
            gpu_engine(ordinal, graphs, step_settings, data.store, optim, settings.batch_users)?
        }
    };
    let started = Instant::now();
    let first_step = state.step;
    let bar = progress_bar(quiet, settings.steps, first_step);
    let (mut last, mut skips_in_a_row) = (None, 0);
    let mut batch = order.batch_of(state.step);

    while state.step < settings.steps {
        let step = state.step;
        let chosen: Vec<&UserSequence> = batch.iter().map(|&i| &users[i]).collect();
        let next_batch = (step + 1 < settings.steps).then(|| order.batch_of(step + 1));
        let next: Option<Vec<&UserSequence>> = next_batch.as_ref().map(|b| b.iter().map(|&i| &users[i]).collect());
        let lr = schedule.lr_at(step);
        let outcome = engine.step(&chosen, next.as_deref(), lr)?;
        if !outcome.loss.is_finite() {
            return Err(diverged(step, "loss", outcome.loss, out));
        }
        skips_in_a_row = if outcome.skipped { skips_in_a_row + 1 } else { 0 };
        if (!outcome.skipped && !outcome.grad_norm.is_finite()) || skips_in_a_row >= MAX_SKIPS_IN_A_ROW {
            return Err(diverged(step, "gradient norm", outcome.grad_norm, out));
        }
        state.step += 1;
        let line = LogLine {
            step: state.step,
            loss: outcome.loss,
            lr,
            grad_norm: outcome.grad_norm.is_finite().then_some(outcome.grad_norm),
            users: chosen.len(),
            pairs: outcome.pairs,
            elapsed_s: state.elapsed_s + started.elapsed().as_secs_f64(),
            skipped: outcome.skipped,
        };
        writeln!(log, "{}", serde_json::to_string(&line)?).context("cannot append to train.log.jsonl")?;
        bar.inc(1);
        bar.set_message(format!("loss {:.4}{}", line.loss, if line.skipped { " (overflow: skipped)" } else { "" }));
        if state.step % settings.checkpoint_every == 0 || state.step == settings.steps {
            log.sync_data().context("cannot sync train.log.jsonl")?;
            save(out, &engine.state()?, &TrainState { elapsed_s: line.elapsed_s, ..state.clone() })?;
        }
        last = Some(line);
        batch = next_batch.unwrap_or_default();
    }
    bar.finish_and_clear();
    Ok(TrainReport {
        steps_run: state.step - first_step,
        total_steps: settings.steps,
        resumed_from,
        last,
        seconds: started.elapsed().as_secs_f64(),
        skipped_users: data.sequences.skipped_users,
        dropped_ids: data.sequences.dropped_ids,
        users: users.len(),
    })
}

fn gpu_engine<'a>(
    ordinal: usize,
    graphs: bool,
    settings: StepSettings,
    store: &'a ContentStore,
    optim: OptimState,
    max_users: usize,
) -> Result<Box<dyn StepEngine + 'a>> {
    use crate::cuda::trainer::{GpuTrainer, Launch};
    let mut trainer = GpuTrainer::new(ordinal, settings, store, optim, max_users)?;
    trainer.set_launch(if graphs { Launch::Graphs } else { Launch::Eager });
    Ok(Box::new(trainer))
}

fn progress_bar(quiet: bool, total: usize, done: usize) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} · {per_sec} · {msg} · ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

/// The error for a non-finite loss or gradient: training stops, the last good checkpoint stays.
fn diverged(step: usize, what: &str, value: f64, out: &Path) -> anyhow::Error {
    let kept = if out.join(CHECKPOINT).exists() {
        format!("the last good checkpoint is {}", out.join(CHECKPOINT).display())
    } else {
        "no checkpoint was written yet".to_string()
    };
    anyhow!("step {}: the {what} is {value}; training stopped ({kept}); try a lower --lr or --clip-grad-norm", step + 1)
}

/// The content store must match the model's input width (or, for id input, its item table).
fn check_model_fits(model: &PchConfig, store: &ContentStore) -> Result<()> {
    match model.input {
        InputKind::Content if model.d_content != store.dim() => Err(input(format!(
            "{}: content embeddings are {}-d, the model's d_content is {}",
            store.dir.display(),
            store.dim(),
            model.d_content
        ))),
        InputKind::Id if model.n_items.unwrap_or(0) < store.len() => Err(input(format!(
            "{}: {} items, the model's item table has {} rows",
            store.dir.display(),
            store.len(),
            model.n_items.unwrap_or(0)
        ))),
        _ => Ok(()),
    }
}

/// Fresh parameters (from `--init` or the seed) or the state of an interrupted run.
fn start(settings: &TrainSettings, out: &Path) -> Result<(OptimState, TrainState, Option<usize>)> {
    if out.join(OPTIMIZER).exists() {
        let (optim, state) = load_state(out, settings)?;
        let step = state.step;
        return Ok((optim, state, Some(step)));
    }
    let params = match &settings.init {
        Some(path) => {
            let (params, _) = checkpoint::load(Path::new(path))?;
            if params.config() != &settings.model {
                return Err(input(format!("{path}: its config differs from the one this run trains")));
            }
            params
        }
        None => PchParams::init(&settings.model, settings.seed)?,
    };
    let optim = OptimState::fresh(params);
    let fresh_state = TrainState {
        step: 0,
        dropout_word_pos: "0".into(),
        elapsed_s: 0.0,
        loss_scale: optim.loss_scale.scale,
        loss_scale_clean_steps: 0,
    };
    Ok((optim, fresh_state, None))
}

/// Writes the optimizer state (with the parameters) and then the checkpoint, each atomically.
fn save(out: &Path, optim: &OptimState, state: &TrainState) -> Result<()> {
    let n = optim.params.flat().len();
    let state = TrainState {
        dropout_word_pos: optim.dropout_word_pos.to_string(),
        loss_scale: optim.loss_scale.scale,
        loss_scale_clean_steps: optim.loss_scale.clean_steps,
        ..state.clone()
    };
    let metadata = HashMap::from([
        ("config".to_string(), optim.params.config().to_json()),
        ("state".to_string(), serde_json::to_string(&state)?),
        ("adam_step".to_string(), optim.adam_step.to_string()),
    ]);
    write_f32_safetensors(
        &out.join(OPTIMIZER),
        &[("params", vec![n], optim.params.flat()), ("adam.m", vec![n], &optim.m), ("adam.v", vec![n], &optim.v)],
        metadata,
    )?;
    checkpoint::save(&out.join(CHECKPOINT), &optim.params, &[("step", state.step.to_string())])
}

fn load_state(out: &Path, settings: &TrainSettings) -> Result<(OptimState, TrainState)> {
    let path = out.join(OPTIMIZER);
    let file = MappedSafetensors::open(&path)?;
    let meta = file.metadata()?;
    let bad = |what: &str| input(format!("{}: {what}; remove the run directory to start again", path.display()));
    let state: TrainState = meta
        .get("state")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no readable \"state\" metadata"))?;
    let config = meta.get("config").map(|c| PchConfig::from_json(c, &path.display().to_string())).transpose()?;
    if config.as_ref() != Some(&settings.model) {
        return Err(bad("its model config differs from this run's"));
    }
    let mut params = PchParams::<f32>::zeros(&settings.model)?;
    let n = params.flat().len();
    let take = |name: &str| -> Result<Vec<f32>> {
        match file.f32_tensor(name)? {
            Some((shape, values)) if shape == [n] => Ok(values),
            _ => Err(bad(&format!("tensor {name} is missing or not [{n}]"))),
        }
    };
    params.flat_mut().copy_from_slice(&take("params")?);
    let (m, v) = (take("adam.m")?, take("adam.v")?);
    let adam_step: u64 = meta.get("adam_step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no adam_step"))?;
    let dropout_word_pos =
        state.dropout_word_pos.parse::<u128>().map_err(|_| bad("an unreadable dropout RNG position"))?;
    let optim = OptimState {
        params,
        adam_step,
        m,
        v,
        loss_scale: LossScale::restore(state.loss_scale, state.loss_scale_clean_steps),
        dropout_word_pos,
    };
    Ok((optim, state))
}

/// Drops log lines past `step` (written after the last saved state by a run that was then killed).
fn truncate_log(path: &PathBuf, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| serde_json::from_str::<LogLine>(line).map(|l| l.step <= step).unwrap_or(false))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    crate::fsutil::write_atomic(path, body.as_bytes())
}

/// The report as JSON (for `--json`).
pub fn report_json(report: &TrainReport, out: &Path) -> serde_json::Value {
    json!({
        "out": out.display().to_string(),
        "steps_run": report.steps_run,
        "total_steps": report.total_steps,
        "resumed_from": report.resumed_from,
        "users": report.users,
        "skipped_users": report.skipped_users,
        "dropped_ids": report.dropped_ids,
        "seconds": report.seconds,
        "last": report.last,
    })
}
