//! `learn-kern tokenizer export --model DIR [--out FILE]`: the `tokenizer.json` equivalent of a
//! SentencePiece `tokenizer.model`, refused where no tokenizer.json can encode exactly the same.

use crate::cli::Common;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub action: TokenizerAction,
}

#[derive(Subcommand, Debug)]
pub enum TokenizerAction {
    /// Write tokenizer.json for a model directory (or a .model file) that has a SentencePiece tokenizer.model.
    Export {
        /// Model directory or tokenizer.model file.
        #[arg(long)]
        model: PathBuf,
        /// Output file (default: tokenizer.json beside the model).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(args: &TokenizerArgs, common: &Common) -> Result<()> {
    match &args.action {
        TokenizerAction::Export { model, out } => {
            let json = crate::sentencepiece::export::export_tokenizer_json(model)?;
            let out = out.clone().unwrap_or_else(|| {
                let dir =
                    if model.is_dir() { model.clone() } else { model.parent().map(PathBuf::from).unwrap_or_default() };
                dir.join("tokenizer.json")
            });
            crate::fsutil::write_atomic(&out, json.as_bytes())?;
            common.notice(format!("wrote {}", out.display()));
            Ok(())
        }
    }
}
