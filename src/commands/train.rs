//! `learn-kern train --content DIR --sequences FILE --out DIR` (SPEC §3, §4): PCH training on the CPU
//! reference. The same command reruns resume an interrupted run; `--resume DIR` continues one by its saved
//! settings.

use crate::cli::Common;
use crate::data::sequences;
use crate::device::Device;
use crate::embed::store::ContentStore;
use crate::error::input;
use crate::pch::config::{InputKind, ItemTower, PchConfig, Positions};
use crate::train::run::{self, TrainData, TrainDevice, TrainSettings, batches_per_epoch};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model shape: pch-base (the paper's 12 × 768), pch-small (4 × 256) or pch-tiny.
    #[arg(long, default_value = "pch-base")]
    pub preset: String,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub d_ff: Option<usize>,
    #[arg(long)]
    pub d_out: Option<usize>,
    /// none (the official code: order only through the causal mask) or learned.
    #[arg(long, default_value = "none")]
    pub positions: String,
    /// Rows of the learned position table (default: --history).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// content (LEARN) or id (the ID-embedding baseline).
    #[arg(long, default_value = "content")]
    pub input: String,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// causal (Variant 1: the tower runs causally over the targets) or self (Variant 2: each target alone).
    #[arg(long, default_value = "causal")]
    pub item_tower: String,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Content embedding store (from `embed`).
    #[arg(long, required_unless_present = "resume")]
    pub content: Option<PathBuf>,
    /// Sequences file (JSON Lines: user, history, targets).
    #[arg(long, required_unless_present = "resume")]
    pub sequences: Option<PathBuf>,
    /// Run directory: checkpoint.safetensors, optimizer.safetensors, train.log.jsonl, train.json.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory with its saved settings; a setting named beside it is refused
    /// (it would be ignored).
    #[arg(long, conflicts_with_all = [
        "content", "sequences", "out", "init", "preset", "d_model", "layers", "heads", "d_ff", "d_out", "positions",
        "max_len", "input", "dropout", "item_tower", "history", "targets", "batch_users", "epochs", "steps", "lr",
        "warmup_frac", "beta1", "beta2", "eps", "weight_decay", "clip_grad_norm", "tau", "keep_false_negatives",
        "logq_correction", "loss_positions", "seed", "no_shuffle", "skip_unknown", "checkpoint_every", "overwrite"
    ])]
    pub resume: Option<PathBuf>,
    /// Start from this checkpoint (its config; a fresh optimiser). The model flags describe a new model,
    /// so naming one beside it is refused rather than silently ignored.
    #[arg(long, conflicts_with_all = [
        "preset", "d_model", "layers", "heads", "d_ff", "d_out", "positions", "max_len", "input", "dropout", "item_tower"
    ])]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// History items per user (the last ones).
    #[arg(long, default_value_t = 80)]
    pub history: usize,
    /// Target items per user (the first ones).
    #[arg(long, default_value_t = 40)]
    pub targets: usize,
    #[arg(long, default_value_t = 30)]
    pub batch_users: usize,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Total updates (overrides --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_frac: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 is plain Adam.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Temperature of the scores u·v/τ.
    #[arg(long, default_value_t = 0.05)]
    pub tau: f64,
    /// Keep negatives that are among the user's own targets (Eq. 1 exactly).
    #[arg(long)]
    pub keep_false_negatives: bool,
    /// Correct in-batch negatives for popularity: scores become u·v/τ − log q(v), q the item's share of the
    /// training targets (sampling-bias correction; without it, Eq. 1 as written).
    #[arg(long)]
    pub logq_correction: bool,
    /// all (every history position) or last (the official pretraining loss).
    #[arg(long, default_value = "all")]
    pub loss_positions: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep file order: batch b is users b·B..(b+1)·B−1.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Drop item ids missing from the store (counted) instead of failing.
    #[arg(long)]
    pub skip_unknown: bool,
    /// Save the checkpoint and optimiser state every N updates (and at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Start again in --out, discarding a run already there.
    #[arg(long)]
    pub overwrite: bool,
    /// With --device cuda: on replays each update from a CUDA graph of its batch's shape bucket (captured on
    /// the bucket's first update; the padding changes no result), off launches every kernel from the host.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub cuda_graphs: String,
}

fn absolute(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// The model config the flags describe, for content of width `d_content` and `n_items` items.
pub fn model_config(m: &ModelArgs, d_content: usize, n_items: usize, history: usize) -> Result<PchConfig> {
    let mut cfg = PchConfig::preset(&m.preset)?.with_d_content(d_content);
    cfg.d_model = m.d_model.unwrap_or(cfg.d_model);
    cfg.n_layers = m.layers.unwrap_or(cfg.n_layers);
    cfg.n_heads = m.heads.unwrap_or(cfg.n_heads);
    cfg.d_ff = m.d_ff.unwrap_or(cfg.d_ff);
    cfg.d_out = m.d_out.unwrap_or(cfg.d_out);
    cfg.dropout = m.dropout;
    cfg.positions = match m.positions.as_str() {
        "none" => Positions::None,
        "learned" => Positions::Learned,
        other => return Err(input(format!("--positions {other:?}: expected none or learned"))),
    };
    cfg.max_len = (cfg.positions == Positions::Learned).then(|| m.max_len.unwrap_or(history));
    cfg.input = match m.input.as_str() {
        "content" => InputKind::Content,
        "id" => InputKind::Id,
        other => return Err(input(format!("--input {other:?}: expected content or id"))),
    };
    cfg.n_items = (cfg.input == InputKind::Id).then_some(n_items);
    cfg.item_tower = ItemTower::parse(&m.item_tower)?;
    cfg.validate()?;
    Ok(cfg)
}

fn read_settings(dir: &Path) -> Result<Option<TrainSettings>> {
    let path = dir.join(run::SETTINGS);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| input(format!("{}: unreadable ({e})", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

pub fn run(args: &TrainArgs, common: &Common) -> Result<()> {
    let (settings, out, store, seqs) = match &args.resume {
        Some(dir) => {
            let settings = read_settings(dir)?.ok_or_else(|| {
                input(format!("{}: no {} (not a training run directory)", dir.display(), run::SETTINGS))
            })?;
            let store = ContentStore::open(Path::new(&settings.content))?;
            let seqs = sequences::load(Path::new(&settings.sequences), |id| store.row_of(id), settings.skip_unknown)?;
            (settings, dir.clone(), store, seqs)
        }
        None => fresh(args)?,
    };
    let data = TrainData { store: &store, sequences: &seqs };
    let device = match crate::device::choose_for_job(common, "train", || {
        crate::cuda::trainer::check_trainable(&settings.model, settings.targets)
    })? {
        Device::Cpu => TrainDevice::Cpu,
        Device::Cuda(list) if list.len() == 1 => {
            TrainDevice::Cuda { ordinal: list[0], graphs: args.cuda_graphs == "on" }
        }
        Device::Cuda(_) => return Err(input(format!("--device {}: `train` runs on one GPU", common.device))),
    };
    let report = run::train(&settings, &data, &out, device, common.quiet)?;
    if report.steps_run == 0 {
        common.notice(format!("{}: already trained to step {}; nothing to do", out.display(), report.total_steps));
    } else {
        let last = report.last.as_ref();
        common.notice(format!(
            "trained steps {}..{} of {} on {} users in {:.1} s ({:.2} steps/s); last loss {:.4} → {}",
            report.resumed_from.unwrap_or(0) + 1,
            report.total_steps,
            report.total_steps,
            report.users,
            report.seconds,
            report.steps_run as f64 / report.seconds.max(1e-9),
            last.map_or(f64::NAN, |l| l.loss),
            out.join(run::CHECKPOINT).display()
        ));
    }
    if report.skipped_users + report.dropped_ids > 0 {
        common.notice(format!(
            "left out: {} users with an empty history or no targets, {} unknown item ids",
            report.skipped_users, report.dropped_ids
        ));
    }
    common.write_json(&run::report_json(&report, &out))
}

/// Settings from the flags, checked against a run already in --out.
fn fresh(args: &TrainArgs) -> Result<(TrainSettings, PathBuf, ContentStore, sequences::Sequences)> {
    let (Some(content), Some(seq_path), Some(out)) = (&args.content, &args.sequences, &args.out) else {
        return Err(input("train needs --content, --sequences and --out (or --resume DIR)"));
    };
    let store = ContentStore::open(content)?;
    let seqs = sequences::load(seq_path, |id| store.row_of(id), args.skip_unknown)?;
    let model = match &args.init {
        Some(path) => crate::train::checkpoint::load(path)?.0.config().clone(),
        None => model_config(&args.model, store.dim(), store.len(), args.history)?,
    };
    let steps = args.steps.unwrap_or(args.epochs * batches_per_epoch(seqs.users.len(), args.batch_users));
    let loss_positions_last = match args.loss_positions.as_str() {
        "all" => false,
        "last" => true,
        other => return Err(input(format!("--loss-positions {other:?}: expected all or last"))),
    };
    let settings = TrainSettings {
        content: absolute(content),
        sequences: absolute(seq_path),
        model,
        init: args.init.as_deref().map(absolute),
        history: args.history,
        targets: args.targets,
        batch_users: args.batch_users,
        steps,
        lr: args.lr,
        warmup_frac: args.warmup_frac,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        weight_decay: args.weight_decay,
        clip_grad_norm: args.clip_grad_norm,
        tau: args.tau,
        keep_false_negatives: args.keep_false_negatives,
        logq_correction: args.logq_correction,
        loss_positions_last,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        skip_unknown: args.skip_unknown,
        checkpoint_every: args.checkpoint_every,
    };
    settings.check()?;
    match read_settings(out)? {
        Some(previous) if previous != settings && !args.overwrite => {
            return Err(input(format!(
                "{}: holds a run with other settings; use another --out, --overwrite, or --resume {} to continue it",
                out.display(),
                out.display()
            )));
        }
        Some(previous) if previous == settings => {}
        _ => {
            std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
            for name in [run::OPTIMIZER, run::CHECKPOINT, run::LOG] {
                let _ = std::fs::remove_file(out.join(name));
            }
            crate::fsutil::write_atomic(&out.join(run::SETTINGS), serde_json::to_string_pretty(&settings)?.as_bytes())?;
        }
    }
    Ok((settings, out.clone(), store, seqs))
}
