//! Typed launchers, one per kernel of `kernels/*.cu`. Each checks what its kernel relies on (divisibility
//! for vector accesses, every buffer covering the elements the grid reaches, sizes within the kernel's int
//! arithmetic), then launches on the GPU's compute stream. Contents the kernels trust (sequence offsets,
//! tiles) are built on the host from checked batches; where a kernel could still be handed a bad value (a
//! token id, a position) it writes NaN rather than reading out of bounds.

use super::gpu::{Arg, Gpu};
use super::memory::Dev;
use anyhow::{Result, bail, ensure};
use half::f16;

/// Query rows per attention block (ATT_BM in attention.cu).
pub const ATTENTION_TILE: usize = 64;
const ATTENTION_THREADS: u32 = 128;

/// Head sizes the attention kernel is instantiated for.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Dynamic shared memory of the attention kernel for head size `hd`: `AttnSmem<HD>::TOTAL` in attention.cu,
/// mirrored here (the kernel traps if it gets less).
pub fn attention_shared_bytes(hd: usize) -> usize {
    let (bm, bn) = (ATTENTION_TILE, 32);
    let (ldh, lds, ldp, ldo) = (hd + 8, bn + 4, bn + 8, hd + 4);
    let qsp = (bm * ldh * 2).max(bm * lds * 4 + bm * ldp * 2);
    qsp + 2 * bn * ldh * 2 + bm * ldo * 4 + 2 * bm * 4
}

fn attention_kernel(hd: usize) -> Option<&'static str> {
    match hd {
        16 => Some("attention_fwd_hd16"),
        32 => Some("attention_fwd_hd32"),
        64 => Some("attention_fwd_hd64"),
        128 => Some("attention_fwd_hd128"),
        _ => None,
    }
}

/// Where sequences of `lengths` packed one after another start: 0, then the running sum, one more entry
/// than sequences (the kernels' `cu_seqlens`).
pub fn packed_offsets(lengths: &[usize]) -> Vec<usize> {
    std::iter::once(0)
        .chain(lengths.iter().scan(0, |end, &n| {
            *end += n;
            Some(*end)
        }))
        .collect()
}

/// The attention launch's query tiles for sequences packed at `offsets` (`0 = offsets[0] ≤ … ≤ offsets[S]`):
/// (sequence, first row of the tile within it), written into `tiles` (reused, no allocation once grown).
/// Tiles later in their sequence see more keys, so they come first: the longest blocks start early and the
/// short ones fill in behind them.
pub fn attention_tiles(offsets: &[usize], tiles: &mut Vec<[i32; 2]>) {
    tiles.clear();
    for (s, w) in offsets.windows(2).enumerate() {
        tiles.extend((0..w[1] - w[0]).step_by(ATTENTION_TILE).map(|row| [s as i32, row as i32]));
    }
    tiles.sort_by_key(|t| std::cmp::Reverse(t[1]));
}

/// An element count as the kernels' `int`.
pub(super) fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| anyhow::anyhow!("{what} = {n} exceeds the kernels' int range"))
}

pub(super) fn covers<T>(buf: &Dev<T>, elements: usize, what: &str) -> Result<()> {
    ensure!(buf.len() >= elements, "{what}: {buf:?} holds fewer than the {elements} elements needed");
    Ok(())
}

/// Threads per block for a kernel whose threads each own 8 columns of a row of `dim`: a multiple of 32, at
/// most `cap`.
pub(super) fn row_threads(dim: usize, cap: usize) -> u32 {
    (dim / 8).next_multiple_of(32).clamp(32, cap) as u32
}

impl Gpu {
    /// Raises the attention kernels' dynamic shared-memory limit where they need more than the default
    /// 48 KB, and fails if this GPU cannot give a block that much.
    pub(crate) fn configure_attention(&self) -> Result<()> {
        use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
        for hd in HEAD_DIMS {
            let bytes = attention_shared_bytes(hd);
            if bytes <= 48 * 1024 {
                continue;
            }
            if bytes > self.max_shared_per_block {
                bail!(
                    "cuda:{}: attention with head size {hd} needs {bytes} bytes of shared memory per block; this GPU \
                     allows {}",
                    self.ordinal,
                    self.max_shared_per_block
                );
            }
            if let Some(name) = attention_kernel(hd) {
                self.ctx.bind_to_thread()?;
                self.kernels.get(name)?.set_attribute(MAX_SHARED, bytes as i32)?;
            }
        }
        Ok(())
    }

    /// `x[t] = table[ids[t]]` widened to fp32 for `tokens` rows of `dim`; `table` is `[vocab, dim]`.
    pub fn embedding_gather(
        &self,
        x: Dev<f32>,
        table: Dev<f16>,
        ids: Dev<u32>,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        ensure!(dim > 0 && dim.is_multiple_of(8), "embedding: width {dim} is not a multiple of 8");
        ensure!(table.len().is_multiple_of(dim), "embedding: the table is not rows of {dim}");
        covers(&x, tokens * dim, "embedding output")?;
        covers(&ids, tokens, "embedding ids")?;
        let vocab = int(table.len() / dim, "vocabulary")?;
        let args = [
            Arg::Ptr(x.ptr()),
            Arg::Ptr(table.ptr()),
            Arg::Ptr(ids.ptr()),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(dim, "width")?),
            Arg::I32(vocab),
        ];
        // SAFETY: x covers tokens·dim floats, ids tokens ids, and ids out of the vocabulary are never read
        // through; dim % 8 == 0 keeps the 16-byte accesses aligned (buffers are 256-byte aligned).
        unsafe { self.launch("embedding_gather", (self.grid_for(tokens * dim / 8), 1), 256, 0, &args) }
    }

    /// Per row: `x += delta` (when given), then `out = fp16(w · x · rsqrt(mean(x²) + eps))`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual(
        &self,
        x: Dev<f32>,
        delta: Option<Dev<f16>>,
        w: Dev<f32>,
        out: Dev<f16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(dim > 0 && dim.is_multiple_of(8), "rmsnorm: width {dim} is not a multiple of 8");
        covers(&x, rows * dim, "rmsnorm input")?;
        covers(&out, rows * dim, "rmsnorm output")?;
        covers(&w, dim, "rmsnorm weight")?;
        if let Some(delta) = &delta {
            covers(delta, rows * dim, "rmsnorm residual")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(x.ptr()),
            Arg::Ptr(delta.map_or(0, |d| d.ptr())),
            Arg::Ptr(w.ptr()),
            Arg::Ptr(out.ptr()),
            Arg::I32(int(dim, "width")?),
            Arg::F32(eps),
        ];
        let grid = u32::try_from(rows).map_err(|_| anyhow::anyhow!("rmsnorm: {rows} rows"))?;
        // SAFETY: one block per row of `rows`, each touching the row's dim elements of x, delta and out and
        // dim weights; all covered (checked), 16-byte aligned for dim % 8 == 0.
        unsafe { self.launch("rmsnorm_residual", (grid, 1), row_threads(dim, 256), 0, &args) }
    }

    /// The (cos, sin) table of `positions` positions for heads of `head_dim`, angles in fp32.
    pub fn rope_table(&self, table: Dev<[f32; 2]>, positions: usize, head_dim: usize, theta: f32) -> Result<()> {
        ensure!(head_dim >= 2 && head_dim.is_multiple_of(2), "rope: odd head size {head_dim}");
        let half = head_dim / 2;
        covers(&table, positions * half, "rope table")?;
        let args = [
            Arg::Ptr(table.ptr()),
            Arg::I32(int(positions, "positions")?),
            Arg::I32(int(half, "half")?),
            Arg::F32(theta),
        ];
        // SAFETY: the table covers positions·half pairs (checked).
        unsafe { self.launch("rope_table", (self.grid_for(positions * half), 1), 256, 0, &args) }
    }

    /// Rotates the first `heads` head slices of each of `tokens` rows of `row_len` halves, in place.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_apply(
        &self,
        x: Dev<f16>,
        table: Dev<[f32; 2]>,
        positions: Dev<i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        row_len: usize,
    ) -> Result<()> {
        ensure!(head_dim.is_multiple_of(16) && head_dim > 0, "rope: head size {head_dim} is not a multiple of 16");
        ensure!(
            row_len.is_multiple_of(8) && heads * head_dim <= row_len,
            "rope: {heads} heads do not fit rows of {row_len}"
        );
        covers(&x, tokens * row_len, "rope input")?;
        covers(&positions, tokens, "rope positions")?;
        let table_positions = table.len() / (head_dim / 2);
        let args = [
            Arg::Ptr(x.ptr()),
            Arg::Ptr(table.ptr()),
            Arg::Ptr(positions.ptr()),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(heads, "heads")?),
            Arg::I32(int(head_dim, "head size")?),
            Arg::I32(int(row_len, "row length")?),
            Arg::I32(int(table_positions, "table positions")?),
        ];
        // SAFETY: rows and positions covered (checked); positions past the table produce NaN, not reads.
        unsafe { self.launch("rope_apply", (self.grid_for(tokens * heads * head_dim / 16), 1), 256, 0, &args) }
    }

    /// Causal attention over `seqs` sequences packed in `tokens` rows of `qkv` (`[T, 3D]`, D = heads·head_dim)
    /// into `out` (`[T, D]`). `cu_seqlens` holds the seqs + 1 offsets and `tiles` the `num_tiles` entries of
    /// [`attention_tiles`] for them.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        qkv: Dev<f16>,
        out: Dev<f16>,
        cu_seqlens: Dev<i32>,
        tiles: Dev<[i32; 2]>,
        num_tiles: usize,
        seqs: usize,
        heads: usize,
        head_dim: usize,
        tokens: usize,
    ) -> Result<()> {
        let Some(name) = attention_kernel(head_dim) else {
            bail!("attention: head size {head_dim} has no kernel (the CUDA engine supports {HEAD_DIMS:?})");
        };
        let dim = heads * head_dim;
        covers(&qkv, tokens * 3 * dim, "attention qkv")?;
        covers(&out, tokens * dim, "attention output")?;
        covers(&cu_seqlens, seqs + 1, "attention offsets")?;
        covers(&tiles, num_tiles, "attention tiles")?;
        ensure!(heads > 0 && heads <= 65535, "attention: {heads} heads exceed the grid's second dimension");
        if num_tiles == 0 {
            return Ok(());
        }
        let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
        let args = [
            Arg::Ptr(qkv.ptr()),
            Arg::Ptr(out.ptr()),
            Arg::Ptr(cu_seqlens.ptr()),
            Arg::Ptr(tiles.ptr()),
            Arg::I32(int(heads, "heads")?),
            Arg::F32(scale_log2),
        ];
        let grid = (u32::try_from(num_tiles)?, heads as u32);
        let shared = attention_shared_bytes(head_dim) as u32;
        // SAFETY: qkv and out cover the tokens the offsets reach (checked against `tokens`, which the caller
        // built the offsets from); tiles index sequences < seqs with rows < their length; the shared memory
        // is what the kernel's layout needs (its limit was raised in configure_attention).
        unsafe { self.launch(name, grid, ATTENTION_THREADS, shared, &args) }
    }

    /// `act[t, j] = silu(gate_up[t, j]) · gate_up[t, ffn + j]` for `tokens` rows.
    pub fn swiglu(&self, act: Dev<f16>, gate_up: Dev<f16>, tokens: usize, ffn: usize) -> Result<()> {
        ensure!(ffn > 0 && ffn.is_multiple_of(8), "swiglu: width {ffn} is not a multiple of 8");
        covers(&act, tokens * ffn, "swiglu output")?;
        covers(&gate_up, tokens * 2 * ffn, "swiglu input")?;
        let args = [
            Arg::Ptr(act.ptr()),
            Arg::Ptr(gate_up.ptr()),
            Arg::I32(int(tokens, "tokens")?),
            Arg::I32(int(ffn, "width")?),
        ];
        // SAFETY: both buffers cover the rows (checked), 16-byte aligned for ffn % 8 == 0.
        unsafe { self.launch("swiglu", (self.grid_for(tokens * ffn / 8), 1), 256, 0, &args) }
    }

    /// Per sequence: last residual add, final RMSNorm, mean over its rows, L2 normalisation → `out[s]` (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn final_norm_pool(
        &self,
        out: Dev<f32>,
        x: Dev<f32>,
        delta: Option<Dev<f16>>,
        w: Dev<f32>,
        cu_seqlens: Dev<i32>,
        seqs: usize,
        tokens: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        ensure!(dim > 0 && dim.is_multiple_of(8) && dim <= 8192, "pool: width {dim} must be a multiple of 8, ≤ 8192");
        covers(&out, seqs * dim, "pool output")?;
        covers(&x, tokens * dim, "pool input")?;
        covers(&w, dim, "pool weight")?;
        covers(&cu_seqlens, seqs + 1, "pool offsets")?;
        if let Some(delta) = &delta {
            covers(delta, tokens * dim, "pool residual")?;
        }
        if seqs == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(x.ptr()),
            Arg::Ptr(delta.map_or(0, |d| d.ptr())),
            Arg::Ptr(w.ptr()),
            Arg::Ptr(cu_seqlens.ptr()),
            Arg::I32(int(dim, "width")?),
            Arg::F32(eps),
        ];
        // SAFETY: one block per sequence, its rows within `tokens` (offsets built by the caller from a batch
        // of that many tokens); blockDim·8 ≥ dim as the kernel requires.
        unsafe { self.launch("final_norm_pool", (u32::try_from(seqs)?, 1), row_threads(dim, 1024), 0, &args) }
    }

    /// `out = fp16(src)` for bf16 `src`; sets `overflow[0]` if a finite value overflowed fp16.
    pub fn convert_bf16_f16(&self, out: Dev<f16>, src: Dev<u16>, overflow: Dev<u32>) -> Result<()> {
        self.convert("convert_bf16_f16", out, src.ptr(), src.len(), overflow)
    }

    /// `out = fp16(src)` for f32 `src`; sets `overflow[0]` if a finite value overflowed fp16.
    pub fn convert_f32_f16(&self, out: Dev<f16>, src: Dev<f32>, overflow: Dev<u32>) -> Result<()> {
        self.convert("convert_f32_f16", out, src.ptr(), src.len(), overflow)
    }

    fn convert(&self, name: &str, out: Dev<f16>, src: u64, n: usize, overflow: Dev<u32>) -> Result<()> {
        covers(&out, n, "conversion output")?;
        covers(&overflow, 1, "overflow flag")?;
        let args = [Arg::Ptr(out.ptr()), Arg::Ptr(src), Arg::I64(n as i64), Arg::Ptr(overflow.ptr())];
        // SAFETY: out covers the n elements of src (checked), the flag one word.
        unsafe { self.launch(name, (self.grid_for(n), 1), 256, 0, &args) }
    }

    /// `out[i] = fp16(centre + spread · u_i)`, u uniform in [-0.5, 0.5) from (seed, i).
    pub fn fill_uniform_f16(&self, out: Dev<f16>, seed: u64, centre: f32, spread: f32) -> Result<()> {
        let args =
            [Arg::Ptr(out.ptr()), Arg::I64(out.len() as i64), Arg::U64(seed), Arg::F32(centre), Arg::F32(spread)];
        // SAFETY: writes exactly out's elements.
        unsafe { self.launch("fill_uniform_f16", (self.grid_for(out.len()), 1), 256, 0, &args) }
    }

    /// The fp32 version of [`Self::fill_uniform_f16`].
    pub fn fill_uniform_f32(&self, out: Dev<f32>, seed: u64, centre: f32, spread: f32) -> Result<()> {
        let args =
            [Arg::Ptr(out.ptr()), Arg::I64(out.len() as i64), Arg::U64(seed), Arg::F32(centre), Arg::F32(spread)];
        // SAFETY: writes exactly out's elements.
        unsafe { self.launch("fill_uniform_f32", (self.grid_for(out.len()), 1), 256, 0, &args) }
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` through cuBLAS (fp16, fp32 accumulation), on the compute stream.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, y: Dev<f16>, x: Dev<f16>, w: Dev<f16>, m: usize, n: usize, k: usize) -> Result<()> {
        self.blas.a_bt(y, x, w, m, n, k, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_shared_memory_matches_the_kernel_layout() {
        // AttnSmem<HD>::TOTAL, worked by hand: 128 needs the opt-in above 48 KB, which the V100 grants (96 KB).
        assert_eq!(attention_shared_bytes(32), 29184);
        assert_eq!(attention_shared_bytes(64), 41472);
        assert_eq!(attention_shared_bytes(128), 69120);
        assert!(attention_shared_bytes(128) <= 96 * 1024);
    }

    #[test]
    fn tiles_cover_every_row_once_latest_first() {
        let offsets = [0, 1, 65, 65, 200];
        let mut tiles = vec![[9, 9]];
        attention_tiles(&offsets, &mut tiles);
        let mut covered = vec![0; 200];
        for &[s, row] in &tiles {
            let (start, end) = (offsets[s as usize], offsets[s as usize + 1]);
            let first = start + row as usize;
            covered[first..(first + ATTENTION_TILE).min(end)].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert_eq!(tiles.len(), 1 + 1 + 3);
        assert!(tiles.windows(2).all(|w| w[0][1] >= w[1][1]));
        assert_eq!(tiles[0], [3, 128]);
    }
}
