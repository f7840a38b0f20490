//! Launchers of the PCH model's masked attention (kernels/masked_attention.cu), forward and backward, in the
//! packed head-major layout of src/cpu/masked_attention.rs: q, k, v, out and their gradients are
//! `[rows·heads, 64]` fp16 with sequence b's head h at rows `start_b·heads + h·n_b ..`; `lse` and `delta`
//! hold one fp32 per such row.
//!
//! The causal mask runs flash-attention style (the probabilities are never stored; the backward recomputes
//! them from the forward's lse); the diagonal mask is a copy (out = v) and needs no lse.

use super::gpu::{Arg, Gpu};
use super::memory::Dev;
use super::ops::{covers, int};
use crate::cpu::masked_attention::MaskKind;
use anyhow::{Result, ensure};
use half::f16;

/// The one head size the kernels are built for (the PCH model's 768 / 12).
pub const MASKED_ATTENTION_HEAD_DIM: usize = 64;
const THREADS: u32 = 128;

/// A packed batch on the device: `seqs` sequences of `rows` rows in all, `heads` heads; `cu_seqlens` holds
/// the seqs + 1 row offsets and `tiles` the `num_tiles` entries [`super::ops::attention_tiles`] builds from
/// them (64-row tiles, as the kernels take).
#[derive(Clone, Copy, Debug)]
pub struct AttnBatch {
    pub cu_seqlens: Dev<i32>,
    pub tiles: Dev<[i32; 2]>,
    pub num_tiles: usize,
    pub seqs: usize,
    pub rows: usize,
    pub heads: usize,
}

impl AttnBatch {
    /// Elements of each `[rows·heads, 64]` tensor.
    pub fn elements(&self) -> usize {
        self.rows * self.heads * MASKED_ATTENTION_HEAD_DIM
    }

    /// Checks the buffers every launch reads and the grid; returns the causal kernels' grid.
    fn check(&self) -> Result<(u32, u32)> {
        ensure!(
            self.heads > 0 && self.heads <= 65535,
            "masked attention: {} heads, expected 1..=65535 (the grid's second dimension)",
            self.heads
        );
        int(self.elements(), "masked attention elements")?;
        covers(&self.cu_seqlens, self.seqs + 1, "masked attention offsets")?;
        covers(&self.tiles, self.num_tiles, "masked attention tiles")?;
        Ok((u32::try_from(self.num_tiles)?, self.heads as u32))
    }
}

/// `buf` covers `n` halves and starts on 16 bytes, as the kernels' vector accesses need.
fn tensor(buf: &Dev<f16>, n: usize, what: &str) -> Result<()> {
    covers(buf, n, what)?;
    ensure!(buf.ptr().is_multiple_of(16), "{what}: {buf:?} does not start on a 16-byte boundary");
    Ok(())
}

/// The softmax scale 1/√64 in log2 units (the kernels use exp2), and plain.
fn scales() -> (f32, f32) {
    let scale = 1.0 / (MASKED_ATTENTION_HEAD_DIM as f32).sqrt();
    (scale * std::f32::consts::LOG2_E, scale)
}

impl Gpu {
    /// `out = softmax(q kᵀ / 8 + mask) v` per (sequence, head), and for the causal mask `lse` (the row
    /// log-sum-exp of the scaled scores) for [`Self::masked_attention_bwd`]. The diagonal mask leaves `lse`
    /// untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn masked_attention_fwd(
        &self,
        out: Dev<f16>,
        lse: Dev<f32>,
        q: Dev<f16>,
        k: Dev<f16>,
        v: Dev<f16>,
        batch: &AttnBatch,
        mask: MaskKind,
    ) -> Result<()> {
        let grid = batch.check()?;
        let n = batch.elements();
        for (buf, what) in [(&out, "attention output"), (&q, "attention q"), (&k, "attention k"), (&v, "attention v")] {
            tensor(buf, n, what)?;
        }
        if mask == MaskKind::Diagonal {
            return self.diagonal(out, v, None, n);
        }
        covers(&lse, batch.rows * batch.heads, "attention lse")?;
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(q.ptr()),
            Arg::Ptr(k.ptr()),
            Arg::Ptr(v.ptr()),
            Arg::Ptr(batch.cu_seqlens.ptr()),
            Arg::Ptr(batch.tiles.ptr()),
            Arg::I32(int(batch.heads, "heads")?),
            Arg::F32(scales().0),
        ];
        // SAFETY: every tensor covers rows·heads·64 elements and lse rows·heads (checked); the offsets and
        // tiles, built on the host from the same batch, reach only rows below `rows`.
        unsafe { self.launch("masked_attention_fwd", grid, THREADS, 0, &args) }
    }

    /// Gradients of [`Self::masked_attention_fwd`] for `dout`: `dq`, `dk`, `dv` are overwritten. The causal
    /// mask needs the forward's `out` and `lse`, and `delta` (rows·heads floats of scratch); the diagonal
    /// mask reads neither.
    #[allow(clippy::too_many_arguments)]
    pub fn masked_attention_bwd(
        &self,
        dq: Dev<f16>,
        dk: Dev<f16>,
        dv: Dev<f16>,
        delta: Dev<f32>,
        dout: Dev<f16>,
        out: Dev<f16>,
        q: Dev<f16>,
        k: Dev<f16>,
        v: Dev<f16>,
        lse: Dev<f32>,
        batch: &AttnBatch,
        mask: MaskKind,
    ) -> Result<()> {
        let grid = batch.check()?;
        let n = batch.elements();
        for (buf, what) in
            [(&dq, "attention dq"), (&dk, "attention dk"), (&dv, "attention dv"), (&dout, "attention dout")]
        {
            tensor(buf, n, what)?;
        }
        if mask == MaskKind::Diagonal {
            return self.diagonal(dv, dout, Some((dq, dk)), n);
        }
        for (buf, what) in [(&out, "attention output"), (&q, "attention q"), (&k, "attention k"), (&v, "attention v")] {
            tensor(buf, n, what)?;
        }
        covers(&lse, batch.rows * batch.heads, "attention lse")?;
        covers(&delta, batch.rows * batch.heads, "attention delta")?;
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let (scale_log2, scale) = scales();
        let (offsets, tiles, heads) =
            (Arg::Ptr(batch.cu_seqlens.ptr()), Arg::Ptr(batch.tiles.ptr()), Arg::I32(int(batch.heads, "heads")?));
        let dq_args = [
            Arg::Ptr(dq.ptr()),
            Arg::Ptr(delta.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(out.ptr()),
            Arg::Ptr(q.ptr()),
            Arg::Ptr(k.ptr()),
            Arg::Ptr(v.ptr()),
            Arg::Ptr(lse.ptr()),
            offsets,
            tiles,
            heads,
            Arg::F32(scale_log2),
            Arg::F32(scale),
        ];
        // SAFETY: as the forward; delta covers rows·heads (checked). This pass writes delta, which the next
        // reads: the stream orders them.
        unsafe { self.launch("masked_attention_bwd_dq", grid, THREADS, 0, &dq_args)? };
        let dkdv_args = [
            Arg::Ptr(dk.ptr()),
            Arg::Ptr(dv.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(q.ptr()),
            Arg::Ptr(k.ptr()),
            Arg::Ptr(v.ptr()),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(delta.ptr()),
            offsets,
            tiles,
            heads,
            Arg::F32(scale_log2),
            Arg::F32(scale),
        ];
        // SAFETY: as above.
        unsafe { self.launch("masked_attention_bwd_dkdv", grid, THREADS, 0, &dkdv_args) }
    }

    /// `dst = src` and, when given, both of `zero` cleared, over `n` halves (a multiple of 64).
    fn diagonal(&self, dst: Dev<f16>, src: Dev<f16>, zero: Option<(Dev<f16>, Dev<f16>)>, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (z1, z2) = zero.map_or((0, 0), |(a, b)| (a.ptr(), b.ptr()));
        let args = [Arg::Ptr(dst.ptr()), Arg::Ptr(src.ptr()), Arg::Ptr(z1), Arg::Ptr(z2), Arg::I64(n as i64 / 8)];
        // SAFETY: every buffer covers n halves (checked by the callers) from a 16-byte boundary
        // (checked).
        unsafe { self.launch("masked_attention_diag", (self.grid_for(n / 8), 1), 256, 0, &args) }
    }
}
