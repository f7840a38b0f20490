//! `learn-kern neighbors --embeddings DIR --query ID… --k K`: exact cosine nearest items over a store, the
//! item-to-item retrieval of the LEARN paper's Fig. 2.

use crate::cli::Common;
use crate::embed::store::ContentStore;
use crate::error::input;
use crate::eval::topk::{Hit, TopK};
use anyhow::Result;
use clap::Args;
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct NeighborsArgs {
    /// A finished embedding store.
    #[arg(long)]
    pub embeddings: PathBuf,
    /// Item ids to look up.
    #[arg(long, num_args = 1.., required = true)]
    pub query: Vec<String>,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
}

/// Rows scanned per parallel task.
const BLOCK: usize = 4096;

/// The `k` rows most cosine-similar to `query` (the query row itself left out), best first; ties go to the
/// lower row. Cosines are exact over the stored values: norms are recomputed, not assumed to be 1.
pub fn nearest(store: &ContentStore, query_row: usize, k: usize) -> Vec<Hit<f32>> {
    let dim = store.dim();
    let query = store.row(query_row);
    let query_norm = query.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let partial: Vec<Vec<Hit<f32>>> = (0..store.len().div_ceil(BLOCK))
        .into_par_iter()
        .map(|block| {
            let mut best = TopK::new(k);
            let mut row = vec![0.0f32; dim];
            for r in block * BLOCK..((block + 1) * BLOCK).min(store.len()) {
                if r == query_row {
                    continue;
                }
                store.read_row(r, &mut row);
                let (dot, norm) =
                    row.iter().zip(&query).fold((0.0f32, 0.0f32), |(d, n), (x, q)| (d + x * q, n + x * x));
                best.push(r, dot / (query_norm * norm.sqrt().max(1e-12)));
            }
            best.into_sorted()
        })
        .collect();
    let mut best = TopK::new(k);
    for hit in partial.into_iter().flatten() {
        best.push(hit.row, hit.score);
    }
    best.into_sorted()
}

pub fn run(args: &NeighborsArgs, common: &Common) -> Result<()> {
    if args.k == 0 {
        return Err(input("--k must be at least 1"));
    }
    let store = ContentStore::open(&args.embeddings)?;
    let mut report = Vec::new();
    for id in &args.query {
        let row = store
            .row_of(id)
            .ok_or_else(|| input(format!("--query {id:?}: no such id in {}", args.embeddings.display())))?;
        let hits = nearest(&store, row, args.k);
        if common.json.is_none() {
            println!("{id}");
            for (rank, hit) in hits.iter().enumerate() {
                println!("  {:>3}. {:<24} {:.4}", rank + 1, store.ids[hit.row], hit.score);
            }
        }
        report.push(json!({
            "query": id,
            "neighbors": hits.iter().map(|h| json!({"id": store.ids[h.row], "cosine": h.score})).collect::<Vec<_>>(),
        }));
    }
    common.write_json(&json!(report))
}
