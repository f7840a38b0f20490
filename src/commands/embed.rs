//! `learn-kern embed --model DIR --items FILE --out DIR` (SPEC §2) and `embed --merge SHARD… --out DIR`.

use crate::cli::Common;
use crate::cuda::encoder::CudaEncoder;
use crate::cuda::gpu::gib;
use crate::device::{self, Device};
use crate::embed::encoder::{ContentEncoder, CpuEncoder};
use crate::embed::items::Catalogue;
use crate::embed::job::{EmbedPlan, parse_shard};
use crate::embed::text::TextRecipe;
use crate::error::input;
use crate::llm::model::Llm;
use crate::npy::Dtype;
use crate::tokenizer::TextTokenizer;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Model directory (config.json, safetensors weights, tokenizer.json or tokenizer.model).
    #[arg(long, required_unless_present = "merge")]
    pub model: Option<PathBuf>,
    /// Items, JSON Lines: an `id` and a `text` field or catalogue fields (title, category, brand, …).
    #[arg(long, required_unless_present = "merge")]
    pub items: Option<PathBuf>,
    /// Output store directory (embeddings.npy, ids.txt, meta.json); rerunning resumes an unfinished store.
    #[arg(long)]
    pub out: PathBuf,
    /// Stored embedding type: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Tokens kept per item (the first ones), special tokens included.
    #[arg(long, default_value_t = 500)]
    pub max_tokens: usize,
    /// Real tokens per batch (sequences are packed, not padded).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Items tokenised and sorted by length together.
    #[arg(long, default_value_t = 65536)]
    pub sort_window: usize,
    /// Item text from a template of {field} placeholders instead of the default layout.
    #[arg(long)]
    pub template: Option<String>,
    /// Count and skip invalid lines instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Embed only rows ≡ I (mod N), e.g. 0/4; combine the shards with --merge.
    #[arg(long)]
    pub shard: Option<String>,
    /// Combine these finished shard stores into --out instead of embedding.
    #[arg(long, num_args = 1..)]
    pub merge: Vec<PathBuf>,
    /// Replace whatever --out holds instead of resuming it.
    #[arg(long)]
    pub overwrite: bool,
}

fn absolute(path: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn parse_dtype(text: &str) -> Result<Dtype> {
    match text {
        "f16" | "float16" => Ok(Dtype::F16),
        "f32" | "float32" => Ok(Dtype::F32),
        _ => Err(input(format!("--dtype {text:?}: expected f16 or f32"))),
    }
}

pub fn run(args: &EmbedArgs, common: &Common) -> Result<()> {
    if !args.merge.is_empty() {
        let rows = crate::embed::merge::merge(&args.merge, &args.out, args.overwrite)?;
        common.notice(format!("merged {} shards: {rows} items → {}", args.merge.len(), args.out.display()));
        return common.write_json(&json!({"out": args.out.display().to_string(), "items": rows}));
    }
    let (Some(model_dir), Some(items)) = (&args.model, &args.items) else {
        return Err(input("embed needs --model and --items (or --merge)"));
    };
    // Absolute paths in job.json and meta.json: a rerun from another directory still matches its store.
    let model_dir = &absolute(model_dir);
    let items = &absolute(items);
    let dtype = parse_dtype(&args.dtype)?;
    let shard = args.shard.as_deref().map(parse_shard).transpose()?;
    if args.batch_tokens < args.max_tokens {
        return Err(input(format!(
            "--batch-tokens {} is smaller than --max-tokens {}: one item must fit a batch",
            args.batch_tokens, args.max_tokens
        )));
    }
    let (recipe, template_source) = match &args.template {
        Some(t) => (TextRecipe::template(t)?, Some(t.clone())),
        None => (TextRecipe::Default, None),
    };
    let device = device::choose(common, "embed", true)?;

    let llm = Llm::load(model_dir)?;
    let tokenizer = TextTokenizer::load(model_dir, args.max_tokens)?;
    if tokenizer.vocab_size() > llm.config().vocab_size {
        return Err(input(format!(
            "{}: the tokenizer has {} ids but config.json's vocab_size is {}",
            model_dir.display(),
            tokenizer.vocab_size(),
            llm.config().vocab_size
        )));
    }
    let catalogue = Catalogue::scan(items, &recipe, args.skip_invalid)?;
    if catalogue.is_empty() {
        return Err(input(format!("{}: holds no items", items.display())));
    }
    let plan = EmbedPlan {
        catalogue: &catalogue,
        recipe: &recipe,
        template_source,
        tokenizer: &tokenizer,
        out: args.out.clone(),
        dtype,
        batch_tokens: args.batch_tokens,
        sort_window: args.sort_window,
        shard,
        overwrite: args.overwrite,
        model: model_dir.display().to_string(),
        model_fingerprint: llm.config().fingerprint(),
        quiet: common.quiet,
    };
    let report = match &device {
        Device::Cpu => plan.run(&mut CpuEncoder { llm: &llm })?,
        Device::Cuda(ordinals) => {
            // Each GPU gets the whole model (loaded from the same mapped files) and its own consumer thread.
            let mut encoders: Vec<Box<dyn ContentEncoder + Send>> = Vec::with_capacity(ordinals.len());
            for &ordinal in ordinals {
                let encoder = CudaEncoder::load(ordinal, &llm, args.batch_tokens, common.quiet)?;
                let m = encoder.memory();
                common.notice(format!(
                    "{}: {} of weights, {} of activations for --batch-tokens {}; {} of {} in use",
                    encoder.describe(),
                    gib(m.weights),
                    gib(m.arena),
                    args.batch_tokens,
                    gib(m.device_used),
                    gib(m.device_total)
                ));
                encoders.push(Box::new(encoder));
            }
            plan.run_parallel(&mut encoders)?
        }
    };
    if report.already_complete {
        common.notice(format!("{}: already complete (same arguments); nothing to do", args.out.display()));
        return common.write_json(&json!({"out": args.out.display().to_string(), "already_complete": true}));
    }
    let seconds = report.seconds.max(1e-9);
    if catalogue.skipped > 0 {
        common.notice(format!(
            "skipped {} invalid lines (first: {})",
            catalogue.skipped,
            catalogue.first_skip_reason.as_deref().unwrap_or("?")
        ));
    }
    common.notice(format!(
        "embedded {} items ({} tokens{}) in {:.1} s: {:.1} items/s, {:.0} tokens/s → {}",
        report.items,
        report.tokens,
        if report.resumed_batches > 0 {
            format!(", {} batches resumed", report.resumed_batches)
        } else {
            String::new()
        },
        seconds,
        report.computed_items as f64 / seconds,
        report.computed_tokens as f64 / seconds,
        args.out.display()
    ));
    common.write_json(&json!({
        "out": args.out.display().to_string(),
        "items": report.items,
        "tokens": report.tokens,
        "computed_items": report.computed_items,
        "resumed_batches": report.resumed_batches,
        "skipped_invalid": catalogue.skipped,
        "seconds": seconds,
        "items_per_s": report.computed_items as f64 / seconds,
        "tokens_per_s": report.computed_tokens as f64 / seconds,
    }))
}
