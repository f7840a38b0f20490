//! Batches of users (SPEC §4.1): each user's last H history items and first T targets, right-padded to the
//! batch's longest, with content embeddings gathered from the memory-mapped store (or item ids for the
//! ID-embedding baseline).

use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::{PchBatchShape, PchInput};
use rayon::prelude::*;

/// One side (histories or targets) of a batch.
pub struct Side {
    pub shape: PchBatchShape,
    /// Store rows `[B, L]`; 0 at padded positions.
    pub rows: Vec<u32>,
    /// Content embeddings `[B, L, d_content]` (empty for `input = "id"`).
    pub content: Vec<f32>,
}

impl Side {
    /// Right-pads `lists` of store rows into one side; gathers their content unless `store` is `None`.
    pub fn gather(lists: &[&[u32]], store: Option<&ContentStore>) -> Side {
        let len = lists.iter().map(|l| l.len()).max().unwrap_or(0);
        let lengths: Vec<usize> = lists.iter().map(|l| l.len()).collect();
        let mut rows = vec![0u32; lists.len() * len];
        for (b, list) in lists.iter().enumerate() {
            rows[b * len..b * len + list.len()].copy_from_slice(list);
        }
        let content = match store {
            None => Vec::new(),
            Some(store) => {
                let dc = store.dim();
                let mut content = vec![0.0f32; rows.len() * dc];
                content.par_chunks_mut(dc).zip(&rows).enumerate().for_each(|(r, (out, &row))| {
                    if r % len.max(1) < lengths[r / len.max(1)] {
                        store.read_row(row as usize, out);
                    }
                });
                content
            }
        };
        Side { shape: PchBatchShape { batch: lists.len(), len, lengths }, rows, content }
    }

    /// The model input of this side.
    pub fn input(&self) -> PchInput<'_, f32> {
        if self.content.is_empty() { PchInput::Ids(&self.rows) } else { PchInput::Content(&self.content) }
    }
}

/// A training batch: the user tower reads `history`, the item tower reads `targets`.
pub struct Batch {
    pub history: Side,
    pub targets: Side,
}

impl Batch {
    /// Assembles users' last `h` history items and first `t` targets. `store` is `None` for id input.
    pub fn assemble(users: &[&UserSequence], h: usize, t: usize, store: Option<&ContentStore>) -> Batch {
        let histories: Vec<&[u32]> = users.iter().map(|u| u.recent_history(h)).collect();
        let targets: Vec<&[u32]> = users.iter().map(|u| u.first_targets(t)).collect();
        Batch { history: Side::gather(&histories, store), targets: Side::gather(&targets, store) }
    }
}
