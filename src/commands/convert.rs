//! `learn-kern convert --model DIR [--out DIR]`: PyTorch `.bin` checkpoints → safetensors, streamed.

use crate::cli::Common;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Model directory holding pytorch_model.bin or pytorch_model.bin.index.json with its shards.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the safetensors files (default: the model directory itself).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &ConvertArgs, common: &Common) -> Result<()> {
    let report = crate::convert::convert_model_dir(&args.model, args.out.as_deref(), !common.quiet)?;
    common.notice(format!(
        "converted {} tensors ({:.2} GB) from {} file(s) in {:.1} s → {}",
        report.tensors,
        report.bytes as f64 / 1e9,
        report.inputs.len(),
        report.seconds,
        args.out.as_ref().unwrap_or(&args.model).display()
    ));
    common.write_json(&serde_json::to_value(&report)?)
}
