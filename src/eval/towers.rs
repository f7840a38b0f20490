//! The trained towers as embedding functions (SPEC §3.1, inference): an item's embedding is the module
//! applied to that item alone (L = 1); a user's is the output at the last valid history position.

use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::{InputKind, MaskKind, PchCache, PchParams, forward_reusing};
use crate::train::batch::Side;
use anyhow::Result;
use std::path::Path;

/// A checkpoint and the content store it will read, checked against each other.
pub fn open_model(checkpoint: &Path, content: &Path) -> Result<(PchParams<f32>, ContentStore)> {
    let (params, _) = crate::train::checkpoint::load(checkpoint)?;
    let store = ContentStore::open(content)?;
    let cfg = params.config();
    if cfg.input == InputKind::Content && cfg.d_content != store.dim() {
        return Err(crate::error::input(format!(
            "{}: the model reads {}-d content, {} holds {}-d embeddings",
            checkpoint.display(),
            cfg.d_content,
            content.display(),
            store.dim()
        )));
    }
    Ok((params, store))
}

/// Items per forward pass of the item tower.
const ITEM_BLOCK: usize = 4096;
/// Users per forward pass of the user tower.
const USER_BLOCK: usize = 256;

fn content_source<'a>(params: &PchParams<f32>, store: &'a ContentStore) -> Option<&'a ContentStore> {
    (params.config().input == InputKind::Content).then_some(store)
}

/// Embeddings `[rows.len(), d_out]` of the items at store `rows`, each alone.
pub fn item_embeddings(params: &PchParams<f32>, store: &ContentStore, rows: &[u32]) -> Result<Vec<f32>> {
    let d = params.config().d_out;
    let mut out = Vec::with_capacity(rows.len() * d);
    let mut cache = PchCache::default();
    for block in rows.chunks(ITEM_BLOCK) {
        let lists: Vec<&[u32]> = block.chunks(1).collect();
        let side = Side::gather(&lists, content_source(params, store));
        out.extend_from_slice(forward_reusing(
            params,
            side.input(),
            &side.shape,
            MaskKind::Diagonal,
            None,
            &mut cache,
        )?);
    }
    Ok(out)
}

/// Embeddings `[users.len(), d_out]` of users from their last `history` items.
pub fn user_embeddings(
    params: &PchParams<f32>,
    store: &ContentStore,
    users: &[&UserSequence],
    history: usize,
) -> Result<Vec<f32>> {
    let d = params.config().d_out;
    let mut out = Vec::with_capacity(users.len() * d);
    let mut cache = PchCache::default();
    for block in users.chunks(USER_BLOCK) {
        let lists: Vec<&[u32]> = block.iter().map(|u| u.recent_history(history)).collect();
        let side = Side::gather(&lists, content_source(params, store));
        let outputs = forward_reusing(params, side.input(), &side.shape, MaskKind::Causal, None, &mut cache)?;
        for (b, &len) in side.shape.lengths.iter().enumerate() {
            let row = b * side.shape.len + len - 1;
            out.extend_from_slice(&outputs[row * d..(row + 1) * d]);
        }
    }
    Ok(out)
}
