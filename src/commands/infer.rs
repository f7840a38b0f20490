//! `learn-kern infer --checkpoint FILE --content DIR --tower user|item --out DIR`: 64-d user or item
//! embeddings for serving, written as a store (embeddings.npy float32, ids.txt, meta.json).

use crate::cli::Common;
use crate::data::sequences;
use crate::embed::store::{EMBEDDINGS, IDS, META};
use crate::error::input;
use crate::eval::gpu::{keep_content_on_device, open_towers};
use crate::eval::towers::{item_embeddings, user_embeddings};
use crate::fsutil::write_atomic;
use crate::npy::{Dtype, NpyMatrixMut};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InferArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub content: PathBuf,
    /// user (needs --sequences) or item (every item of the store, or those in --ids).
    #[arg(long)]
    pub tower: String,
    /// Users to embed (their last --history items).
    #[arg(long)]
    pub sequences: Option<PathBuf>,
    /// Item ids to embed, one per line (item tower; default: the whole store).
    #[arg(long)]
    pub ids: Option<PathBuf>,
    #[arg(long, default_value_t = 80)]
    pub history: usize,
    #[arg(long)]
    pub skip_unknown: bool,
    /// Output store directory.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &InferArgs, common: &Common) -> Result<()> {
    let (params, store) = crate::eval::towers::open_model(&args.checkpoint, &args.content)?;
    let user_tower = match args.tower.as_str() {
        "user" => true,
        "item" => false,
        other => return Err(input(format!("--tower {other:?}: expected user or item"))),
    };
    if user_tower && args.history == 0 {
        return Err(input("--history must be at least 1"));
    }
    let mut gpu = open_towers(common, "infer", &params, args.history)?;
    let (ids, values) = if !user_tower {
        let rows: Vec<u32> = match &args.ids {
            None => (0..store.len() as u32).collect(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| input(format!("{}: cannot read ({e})", path.display())))?;
                text.lines()
                    .map(str::trim)
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(n, id)| {
                        store.row_of(id).map(|r| r as u32).ok_or_else(|| {
                            input(format!("{} line {}: item {id:?} is not in the content store", path.display(), n + 1))
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let ids = rows.iter().map(|&r| store.ids[r as usize].clone()).collect::<Vec<_>>();
        let values = match gpu.as_mut() {
            Some((gpu, towers)) => towers.item_embeddings(gpu, &store, &rows)?,
            None => item_embeddings(&params, &store, &rows)?,
        };
        (ids, values)
    } else {
        let path = args.sequences.as_ref().ok_or_else(|| input("--tower user needs --sequences"))?;
        let seqs = sequences::load(path, |id| store.row_of(id), args.skip_unknown)?;
        let users: Vec<_> = seqs.users.iter().collect();
        let values = match gpu.as_mut() {
            Some((gpu, towers)) => {
                keep_content_on_device(common, gpu, towers, &store)?;
                towers.user_embeddings(gpu, &store, &users, args.history)?
            }
            None => user_embeddings(&params, &store, &users, args.history)?,
        };
        (users.iter().map(|u| u.user.clone()).collect(), values)
    };
    let d = params.config().d_out;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let _ = std::fs::remove_file(args.out.join(META));
    let mut matrix = NpyMatrixMut::create(&args.out.join(EMBEDDINGS), ids.len(), d, Dtype::F32)?;
    for (r, row) in values.chunks(d).enumerate() {
        matrix.write_row(r, row);
    }
    matrix.flush()?;
    let mut text = ids.join("\n");
    text.push('\n');
    write_atomic(&args.out.join(IDS), text.as_bytes())?;
    let meta = json!({
        "kind": format!("pch-{}", args.tower),
        "checkpoint": args.checkpoint.display().to_string(),
        "content": args.content.display().to_string(),
        "dim": d,
        "dtype": "float32",
        "normalized": true,
        "count": ids.len(),
        "history": (args.tower == "user").then_some(args.history),
        "tool": "learn-kern",
        "tool_version": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(&args.out.join(META), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    common.notice(format!("wrote {} {} embeddings ({d}-d) → {}", ids.len(), args.tower, args.out.display()));
    common.write_json(&json!({"out": args.out.display().to_string(), "count": ids.len(), "dim": d}))
}
