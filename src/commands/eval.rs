//! `learn-kern eval --checkpoint FILE --content DIR --sequences FILE` (SPEC §5).

use crate::cli::Common;
use crate::cuda::topk::TOPK_MAX_K;
use crate::data::sequences;
use crate::error::input;
use crate::eval::gpu::{GpuRanker, keep_content_on_device, open_towers};
use crate::eval::metrics::MetricsAccumulator;
use crate::eval::run::{EvalOptions, EvalReport, evaluate, evaluate_with};
use crate::eval::topk::counts;
use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Map, Value, json};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A PCH checkpoint (checkpoint.safetensors of a training run, or any file following SPEC §3.3).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The content embedding store the model reads.
    #[arg(long)]
    pub content: PathBuf,
    /// Users to evaluate: history → user embedding, targets → relevant items.
    #[arg(long)]
    pub sequences: PathBuf,
    /// Gallery item ids, one per line (default: every item of the store).
    #[arg(long)]
    pub gallery: Option<PathBuf>,
    /// History items that make the user embedding (the last ones).
    #[arg(long, default_value_t = 80)]
    pub history: usize,
    /// Cut-offs, comma-separated.
    #[arg(long, default_value = "50,100", value_delimiter = ',')]
    pub k: Vec<usize>,
    /// Rank the user's own history items too.
    #[arg(long)]
    pub keep_history: bool,
    /// Also report a baseline: `popular` ranks items by interaction count.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Sequences file whose histories and targets give the popularity counts (default: the evaluated
    /// users' histories).
    #[arg(long)]
    pub popularity_from: Option<PathBuf>,
    /// Drop unknown item ids (counted) instead of failing.
    #[arg(long)]
    pub skip_unknown: bool,
}

fn metrics_object(metrics: &[(String, f64)]) -> Value {
    Value::Object(metrics.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>())
}

/// Prints the metrics table: one row for the model, one for each baseline.
pub fn print_table(report: &EvalReport) {
    println!("users {}, gallery {}", report.users, report.gallery);
    let header: Vec<String> = report.model.iter().map(|(k, _)| format!("{k:>8}")).collect();
    println!("{:<10}{}", "", header.join(""));
    let row = |name: &str, m: &[(String, f64)]| {
        println!("{name:<10}{}", m.iter().map(|(_, v)| format!("{v:>8.4}")).collect::<String>());
    };
    row("model", &report.model);
    if let Some(p) = &report.popular {
        row("popular", p);
    }
}

pub fn run(args: &EvalArgs, common: &Common) -> Result<()> {
    if args.history == 0 {
        return Err(input("--history must be at least 1"));
    }
    // The cut-offs are checked before any engine starts (the GPU's takes seconds to open).
    MetricsAccumulator::new(&args.k)?;
    let popular = match args.baseline.as_deref() {
        None => false,
        Some("popular") => true,
        Some(other) => return Err(input(format!("--baseline {other:?}: expected popular"))),
    };
    let (params, store) = crate::eval::towers::open_model(&args.checkpoint, &args.content)?;
    let seqs = sequences::load(&args.sequences, |id| store.row_of(id), args.skip_unknown)?;
    if seqs.users.is_empty() {
        return Err(input(format!("{}: no user has both a history and targets", args.sequences.display())));
    }
    let mut gallery: Vec<u32> = match &args.gallery {
        None => (0..store.len() as u32).collect(),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| input(format!("{}: cannot read ({e})", path.display())))?;
            let mut rows = Vec::new();
            for (n, id) in text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty()) {
                let row = store.row_of(id).ok_or_else(|| {
                    input(format!("{} line {}: item {id:?} is not in the content store", path.display(), n + 1))
                })?;
                rows.push(row as u32);
            }
            rows
        }
    };
    gallery.sort_unstable();
    gallery.dedup();
    if gallery.is_empty() {
        return Err(input("the gallery is empty"));
    }
    let popularity = if popular {
        let mut position = vec![None; store.len()];
        for (p, &row) in gallery.iter().enumerate() {
            position[row as usize] = Some(p);
        }
        let source = match &args.popularity_from {
            Some(path) => sequences::load(path, |id| store.row_of(id), true)
                .with_context(|| format!("reading popularity from {}", path.display()))?
                .users
                .iter()
                .flat_map(|u| u.history.iter().chain(&u.targets).copied().collect::<Vec<_>>())
                .collect::<Vec<u32>>(),
            None => seqs.users.iter().flat_map(|u| u.history.iter().copied()).collect(),
        };
        Some(counts(gallery.len(), source.iter().filter_map(|&r| position[r as usize])))
    } else {
        None
    };
    let options =
        EvalOptions { history: args.history, ks: args.k.clone(), keep_history: args.keep_history, gallery, popularity };
    let report = match open_towers(common, "eval", &params, args.history)? {
        None => evaluate(&params, &store, &seqs.users, &options)?,
        Some((gpu, mut towers)) => {
            if options.ks.iter().any(|&k| k > TOPK_MAX_K) {
                common
                    .notice(format!("note: --k above {TOPK_MAX_K}: the towers run on the GPU, the ranking on the CPU"));
            }
            keep_content_on_device(common, &gpu, &mut towers, &store)?;
            let mut ranker = GpuRanker::new(&gpu, &mut towers, &store, &options.gallery, options.history)?;
            evaluate_with(&mut ranker, store.len(), &seqs.users, &options)?
        }
    };
    if common.json.as_ref().is_none_or(|p| p.as_os_str() != "-") {
        print_table(&report);
    }
    if seqs.skipped_users + seqs.dropped_ids > 0 {
        common.notice(format!(
            "left out: {} users with an empty history or no targets, {} unknown item ids",
            seqs.skipped_users, seqs.dropped_ids
        ));
    }
    let mut out = json!({"users": report.users, "gallery": report.gallery, "metrics": metrics_object(&report.model)});
    if let Some(p) = &report.popular {
        out["baseline"] = json!({"popular": metrics_object(p)});
    }
    common.write_json(&out)
}
