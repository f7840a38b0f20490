//! The trained towers as embedding functions on the GPU (SPEC §3.1, inference), mirroring
//! [`crate::eval::towers`]: an item's embedding is the module applied to that item alone (L = 1, diagonal
//! mask); a user's is the output at the last valid history position.
//!
//! Content is gathered on the host from the store, only the valid positions, packed, in fp16 (what the
//! tower's first GEMM reads: the rounding `pack_rows_f32` would do on the device) and uploaded per pass;
//! or, after [`GpuTowers::keep_content_on_device`], the whole store sits on the device and a pass uploads
//! only its row indices and gathers there. The activations live in one arena sized from a byte budget, so
//! a pass holds as many rows as fit in it.

use super::Gpu;
use super::gpu::OutOfMemory;
use super::memory::{Dev, DeviceBuffer};
use super::pch::{Activations, GpuContent, GpuPch};
use crate::data::sequences::UserSequence;
use crate::embed::store::ContentStore;
use crate::pch::{MaskKind, PchBatchShape, PchConfig, PchParams};
use anyhow::{Result, ensure};
use cudarc::driver::result;
use half::f16;
use rayon::prelude::*;
use std::path::PathBuf;

/// Default bytes for the activation arena: large enough for passes of thousands of rows of `pch-base`
/// (≈ 323 KB a row, docs/perf.md), small beside a 16 GB V100.
pub const DEFAULT_ARENA_BUDGET: usize = 2 << 30;

/// Bytes the activation arena of `cfg` takes per packed row (src/cuda/pch/arena.rs): per layer 8·d + 2·f
/// halves and h + 2 floats; shared c + 8·d + f + 2·o + 1 halves and o + h + 1 floats; the batch tables. The
/// reduction partials, a constant, are left to the budget's slack.
pub fn arena_bytes_per_row(cfg: &PchConfig) -> usize {
    let (c, d, f, h, o) = (cfg.d_content, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.d_out);
    let layer = (8 * d + 2 * f) * 2 + (h + 2) * 4;
    cfg.n_layers * layer + (c + 8 * d + f + 2 * o + 1) * 2 + (o + h + 1) * 4 + 4 + 4 + 16
}

/// The arena budget for a command on `gpu`: [`DEFAULT_ARENA_BUDGET`], or a third of the free memory when
/// that is less.
pub fn default_budget(gpu: &Gpu) -> Result<usize> {
    let (free, _) = gpu.memory()?;
    Ok(DEFAULT_ARENA_BUDGET.min(free / 3))
}

/// A PCH model on the GPU with what its inference passes need.
pub struct GpuTowers {
    model: GpuPch,
    acts: Activations,
    /// Packed content of one pass, fp16 `[max_rows, d_content]`.
    content: Dev<f16>,
    _content: DeviceBuffer,
    max_rows: usize,
    resident: Option<ResidentContent>,
}

/// A content store's rows on the device. A user's history items recur across users (a user tower pass of
/// pch-base reads 8 KB of content a position), so uploading the store once and a 4-byte index a position
/// replaces a host gather and upload of every position's row.
struct ResidentContent {
    /// Which store (its folder and row count): a pass over another store gathers on the host.
    store: (PathBuf, usize),
    table: Dev<f16>,
    /// A pass's row indices.
    index: Dev<i32>,
    _buffers: [DeviceBuffer; 2],
}

impl ResidentContent {
    fn holds(&self, store: &ContentStore) -> bool {
        self.store.0 == store.dir && self.store.1 == store.len()
    }
}

impl GpuTowers {
    /// Uploads `params` and sizes passes to `budget` bytes of activations, but at least `min_rows` rows (a
    /// user's whole history must fit one pass). Refuses (as input errors) the configurations the GPU tower
    /// does not implement.
    pub fn new(gpu: &Gpu, params: &PchParams<f32>, budget: usize, min_rows: usize) -> Result<Self> {
        let model = GpuPch::new(gpu, params)?;
        let cfg = model.config().clone();
        let per_row = arena_bytes_per_row(&cfg) + cfg.d_content * 2;
        let max_rows = (budget / per_row).max(min_rows).max(1);
        let acts = model.activations(gpu, max_rows, max_rows)?;
        let content_buffer = gpu.alloc(max_rows * cfg.d_content * 2, "the content of a tower pass")?;
        let content = content_buffer.view::<f16>(0, max_rows * cfg.d_content);
        Ok(GpuTowers { model, acts, content, _content: content_buffer, max_rows, resident: None })
    }

    /// Uploads every row of `store` (fp16, as passes read it) when that takes at most `budget` bytes and the
    /// device has them, so that later passes over it gather on the device; says whether it did.
    pub fn keep_content_on_device(&mut self, gpu: &Gpu, store: &ContentStore, budget: usize) -> Result<bool> {
        let dc = self.config().d_content;
        ensure!(store.dim() == dc, "the model reads {dc}-d content, the store holds {}-d embeddings", store.dim());
        let bytes = store.len() * dc * 2;
        if store.is_empty() || bytes > budget || store.len() > i32::MAX as usize {
            return Ok(false);
        }
        let allocated = gpu
            .alloc(bytes, "the content store")
            .and_then(|table| Ok([table, gpu.alloc(self.max_rows * 4, "a pass's content rows")?]));
        let buffers = match allocated {
            Ok(buffers) => buffers,
            Err(err) if err.downcast_ref::<OutOfMemory>().is_some() => return Ok(false),
            Err(err) => return Err(err),
        };
        let table = buffers[0].view::<f16>(0, store.len() * dc);
        // Up in slices of 64 MiB read from the memory-mapped store in parallel; `upload` stages each before
        // returning, so the staging buffer is free again for the next.
        let slice_rows = ((64 << 20) / (dc * 2)).clamp(1, store.len());
        let mut staging = vec![f16::ZERO; slice_rows * dc];
        for first in (0..store.len()).step_by(slice_rows) {
            let n = slice_rows.min(store.len() - first);
            let part = &mut staging[..n * dc];
            part.par_chunks_mut(dc).enumerate().for_each(|(i, row)| store.read_row_f16(first + i, row));
            gpu.upload(table.slice(first * dc, n * dc), part)?;
        }
        let index = buffers[1].view::<i32>(0, self.max_rows);
        self.resident =
            Some(ResidentContent { store: (store.dir.clone(), store.len()), table, index, _buffers: buffers });
        Ok(true)
    }

    pub fn config(&self) -> &PchConfig {
        self.model.config()
    }

    /// Most positions (padding included) one pass takes.
    pub fn rows_per_pass(&self) -> usize {
        self.max_rows
    }

    /// Device bytes of the activation arena.
    pub fn arena_bytes(&self) -> usize {
        self.acts.bytes()
    }

    /// Runs the tower over right-padded `lists` of store rows; the packed outputs `[Σ lengths, d_out]` stay
    /// on the device until the next pass.
    fn pass(&mut self, gpu: &Gpu, store: &ContentStore, lists: &[&[u32]], mask: MaskKind) -> Result<Dev<f32>> {
        let dc = self.config().d_content;
        ensure!(store.dim() == dc, "the model reads {dc}-d content, the store holds {}-d embeddings", store.dim());
        let len = lists.iter().map(|l| l.len()).max().unwrap_or(0);
        let lengths: Vec<usize> = lists.iter().map(|l| l.len()).collect();
        ensure!(lists.len() * len <= self.max_rows, "a tower pass of {} × {len} positions", lists.len());
        // Only the valid positions, packed, as training gathers them: no padding is copied.
        let rows: Vec<u32> = lists.iter().flat_map(|l| l.iter().copied()).collect();
        match &self.resident {
            Some(resident) if resident.holds(store) => {
                gpu.gather_rows_f16(self.content, resident.table, &rows, resident.index, dc)?
            }
            _ => {
                let mut content = vec![f16::ZERO; rows.len() * dc];
                content.par_chunks_mut(dc).zip(&rows).for_each(|(out, &r)| store.read_row_f16(r as usize, out));
                gpu.upload(self.content, &content)?;
            }
        }
        let shape = PchBatchShape { batch: lists.len(), len, lengths };
        let view = GpuContent::PackedF16(self.content.slice(0, rows.len() * dc));
        self.model.forward(gpu, &mut self.acts, view, &shape, mask)
    }

    /// Embeddings of the items at store `rows`, each alone, into `out` (`[rows.len(), d_out]` on the device).
    pub fn item_embeddings_into(&mut self, gpu: &Gpu, store: &ContentStore, rows: &[u32], out: Dev<f32>) -> Result<()> {
        let d = self.config().d_out;
        ensure!(out.len() >= rows.len() * d, "item embeddings: {out:?} holds fewer than {} rows", rows.len());
        for (b, block) in rows.chunks(self.max_rows).enumerate() {
            let lists: Vec<&[u32]> = block.chunks(1).collect();
            let embeddings = self.pass(gpu, store, &lists, MaskKind::Diagonal)?;
            let dst = out.slice(b * self.max_rows * d, block.len() * d);
            gpu.ctx.bind_to_thread()?;
            // SAFETY: both ranges hold block.len()·d floats (the pass output has one row per item) and lie in
            // live buffers: the arena and `out`, which the caller keeps alive. Ordered on the compute stream.
            unsafe { result::memcpy_dtod_async(dst.ptr(), embeddings.ptr(), dst.bytes(), gpu.stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Embeddings `[rows.len(), d_out]` of the items at store `rows`, each alone.
    pub fn item_embeddings(&mut self, gpu: &Gpu, store: &ContentStore, rows: &[u32]) -> Result<Vec<f32>> {
        let d = self.config().d_out;
        let mut out = Vec::with_capacity(rows.len() * d);
        for block in rows.chunks(self.max_rows) {
            let lists: Vec<&[u32]> = block.chunks(1).collect();
            let embeddings = self.pass(gpu, store, &lists, MaskKind::Diagonal)?;
            out.extend(gpu.download(embeddings)?);
        }
        Ok(out)
    }

    /// Embeddings `[users.len(), d_out]` of users from their last `history` items. Users go in file order,
    /// as many a pass as their padded histories fit in it.
    pub fn user_embeddings(
        &mut self,
        gpu: &Gpu,
        store: &ContentStore,
        users: &[&UserSequence],
        history: usize,
    ) -> Result<Vec<f32>> {
        let d = self.config().d_out;
        let mut out = Vec::with_capacity(users.len() * d);
        let mut start = 0;
        while start < users.len() {
            // The longest run of users whose padded block fits a pass.
            let (mut end, mut len) = (start, 0);
            while end < users.len() {
                let l = len.max(users[end].recent_history(history).len());
                if (end + 1 - start) * l > self.max_rows {
                    break;
                }
                (end, len) = (end + 1, l);
            }
            ensure!(end > start, "user {:?}: a history longer than a tower pass holds", users[start].user);
            let lists: Vec<&[u32]> = users[start..end].iter().map(|u| u.recent_history(history)).collect();
            ensure!(lists.iter().all(|l| !l.is_empty()), "a user with an empty history has no embedding");
            let packed = gpu.download(self.pass(gpu, store, &lists, MaskKind::Causal)?)?;
            let mut at = 0;
            for list in &lists {
                at += list.len();
                out.extend_from_slice(&packed[(at - 1) * d..at * d]);
            }
            start = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_estimate_matches_docs_perf() {
        // docs/perf.md: pch-base keeps 24.6 KB a row a layer and 323 KB a row in all.
        let per_row = arena_bytes_per_row(&PchConfig::base());
        assert!((322_000..324_000).contains(&per_row), "{per_row}");
    }
}
