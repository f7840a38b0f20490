//! `learn-kern init-model --preset tiny|small|baichuan2-7b --seed S --out DIR`

use crate::cli::Common;
use crate::init_model::{init_model, weights::InitDtype};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InitModelArgs {
    /// Model shape: tiny (D 128, 2 layers), small (D 512, 4 layers) or baichuan2-7b (the real shape, 14 GB in bf16).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype: f32, f16 or bf16 (default: f32 for tiny and small, bf16 for baichuan2-7b, as released).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace a model already in --out.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &InitModelArgs, common: &Common) -> Result<()> {
    let dtype = match &args.dtype {
        Some(text) => InitDtype::parse(text)?,
        None if args.preset == "baichuan2-7b" => InitDtype::BF16,
        None => InitDtype::F32,
    };
    let report = init_model(&args.out, &args.preset, args.seed, dtype, args.overwrite)?;
    let c = &report.config;
    common.notice(format!(
        "wrote {} ({} layers, D {}, F {}, {} heads, vocab {}, {}; tokenizer with {} ids)",
        args.out.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.vocab_size,
        dtype.torch_name(),
        report.tokenizer_vocab
    ));
    common.write_json(&json!({
        "out": args.out.display().to_string(),
        "preset": args.preset,
        "dtype": dtype.torch_name(),
        "hidden_size": c.hidden_size,
        "layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
        "tokenizer_vocab": report.tokenizer_vocab,
    }))
}
