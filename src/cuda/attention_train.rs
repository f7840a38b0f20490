//! Launchers of the PCH model's masked attention (kernels/masked_attention.cu), forward and backward, on
//! the row-major tensors of the GEMMs around it, in place: q, k and v are read from the QKV projection (its
//! bias added as they are loaded), out and dout are `[rows, ·]` with head h at column `h·64`, and dq, dk,
//! dv are written into a dQKV buffer laid out as the projection, so nothing is permuted in between. `lse`
//! and `delta` hold one fp32 per (row, head) in the head-major order of src/cpu/masked_attention.rs:
//! sequence b's head h at entries `start_b·heads + h·n_b ..`.
//!
//! The causal mask runs flash-attention style (the probabilities are never stored; the backward recomputes
//! them from the forward's lse); the diagonal mask is a copy (out = v) and needs no lse. One batch may hold
//! both: causal tiles over its first sequences and the diagonal mask over a range of rows after them (the
//! training step's user tower and self-only item tower, in one pass).

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
/// them (64-row tiles, as the kernels take), which the causal mask runs over. Rows `diagonal..rows` take the
/// diagonal mask instead: no tile may cover them.
#[derive(Clone, Copy, Debug)]
pub struct AttnBatch {
    pub cu_seqlens: Dev<i32>,
    pub tiles: Dev<[i32; 2]>,
    pub num_tiles: usize,
    pub seqs: usize,
    pub rows: usize,
    pub heads: usize,
    pub diagonal: usize,
}

impl AttnBatch {
    /// The batch with one mask over all its rows: every tile causal (as built), or none and every row
    /// diagonal.
    pub fn masked(self, mask: MaskKind) -> Self {
        match mask {
            MaskKind::Causal => AttnBatch { diagonal: self.rows, ..self },
            MaskKind::Diagonal => AttnBatch { num_tiles: 0, diagonal: 0, ..self },
        }
    }

    /// Columns of all heads: `heads·64`, the width of out, dout and of each of Q, K and V.
    pub fn width(&self) -> usize {
        self.heads * MASKED_ATTENTION_HEAD_DIM
    }

    /// Checks the tables every launch reads and the grid; returns the causal kernels' grid.
    fn check(&self) -> Result<(u32, u32)> {
        ensure!(
            self.heads > 0 && self.heads <= 65535,
            "masked attention: {} heads, expected 1..=65535 (the grid's second dimension)",
            self.heads
        );
        int(self.rows, "masked attention rows")?;
        int(3 * self.width(), "masked attention columns")?;
        covers(&self.cu_seqlens, self.seqs + 1, "masked attention offsets")?;
        covers(&self.tiles, self.num_tiles, "masked attention tiles")?;
        ensure!(self.diagonal <= self.rows, "masked attention: diagonal rows from {} of {}", self.diagonal, self.rows);
        Ok((u32::try_from(self.num_tiles)?, self.heads as u32))
    }
}

/// A row-major fp16 tensor the attention reads or writes in place: rows of `stride` halves, the attention's
/// columns from `col` on (heads of 64 one after another; for a QKV projection or its gradient, Q, K and V
/// one after another, each `heads·64` wide). The kernels touch no other column.
#[derive(Clone, Copy, Debug)]
pub struct RowTensor {
    pub buf: Dev<f16>,
    pub stride: usize,
    pub col: usize,
}

impl RowTensor {
    /// `buf` as rows of `stride` halves, from column 0.
    pub fn new(buf: Dev<f16>, stride: usize) -> Self {
        RowTensor { buf, stride, col: 0 }
    }

    /// The tensor from row `row` on (within the buffer: the callers check what they reach).
    fn rows_from(self, row: usize) -> Self {
        let start = (row * self.stride).min(self.buf.len());
        RowTensor { buf: self.buf.slice(start, self.buf.len() - start), ..self }
    }

    /// The `i`-th block of `width` columns: Q, K or V (i = 0, 1, 2) of a projection.
    fn part(self, i: usize, width: usize) -> Self {
        RowTensor { col: self.col + i * width, ..self }
    }

    /// Checks that the tensor holds `rows` rows of `width` columns from `col`, with the 16-byte alignment
    /// the kernels' vector accesses need (the buffer's start, the stride and `col`); returns the address
    /// of column `col` and the stride, as the kernels take them.
    fn check(&self, rows: usize, width: usize, what: &str) -> Result<(u64, i32)> {
        let (stride, col) = (self.stride, self.col);
        ensure!(
            stride.is_multiple_of(8) && col.is_multiple_of(8) && col + width <= stride,
            "{what}: {width} columns from column {col} in rows of {stride} (both multiples of 8 expected)"
        );
        let needed = rows.checked_sub(1).map_or(0, |last| last * stride + col + width);
        tensor(&self.buf, needed, what)?;
        Ok((self.buf.ptr() + (col * size_of::<f16>()) as u64, int(stride, what)?))
    }
}

/// The attention's input: a QKV projection, and the bias (`3·heads·64` fp32, Q | K | V) the kernels add
/// as they load it, rounding `fp16(x + b)`, if any.
#[derive(Clone, Copy, Debug)]
pub struct Qkv {
    pub proj: RowTensor,
    pub bias: Option<Dev<f32>>,
}

impl Qkv {
    /// Checks the projection and the bias against `batch`; returns the projection's address and stride
    /// and the bias's address (0 for none).
    fn check(&self, batch: &AttnBatch) -> Result<(u64, i32, u64)> {
        let width = batch.width();
        let (at, stride) = self.proj.check(batch.rows, 3 * width, "attention q, k, v")?;
        let bias = match &self.bias {
            Some(bias) => {
                tensor(bias, 3 * width, "attention QKV bias")?;
                bias.ptr()
            }
            None => 0,
        };
        Ok((at, stride, bias))
    }

    /// The V part with its bias (checked by [`Self::check`]): what the diagonal mask copies.
    fn v(&self, width: usize) -> (RowTensor, Option<Dev<f32>>) {
        (self.proj.part(2, width), self.bias.map(|b| b.slice(2 * width, width)))
    }
}

/// `buf` covers `n` elements and starts on 16 bytes, as the kernels' vector accesses need.
fn tensor<T>(buf: &Dev<T>, n: usize, what: &str) -> Result<()> {
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
    /// `out = softmax(q kᵀ / 8 + mask) v` per (sequence, head), q, k, v the parts of `qkv` plus its bias,
    /// and for the causal rows `lse` (the row log-sum-exp of the scaled scores) for
    /// [`Self::masked_attention_bwd`]; the diagonal rows leave it untouched.
    pub fn masked_attention_fwd(&self, out: RowTensor, lse: Dev<f32>, qkv: Qkv, batch: &AttnBatch) -> Result<()> {
        let grid = batch.check()?;
        let (out_at, ld_out) = out.check(batch.rows, batch.width(), "attention output")?;
        let (qkv_at, ld_qkv, bias) = qkv.check(batch)?;
        let (v, v_bias) = qkv.v(batch.width());
        self.diagonal(out, None, v, v_bias, batch)?;
        covers(&lse, batch.diagonal * batch.heads, "attention lse")?;
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(out_at),
            Arg::I32(ld_out),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(qkv_at),
            Arg::I32(ld_qkv),
            Arg::Ptr(bias),
            Arg::Ptr(batch.cu_seqlens.ptr()),
            Arg::Ptr(batch.tiles.ptr()),
            Arg::I32(int(batch.heads, "heads")?),
            Arg::F32(scales().0),
        ];
        // SAFETY: out and qkv cover their columns of `rows` rows, the bias 3·heads·64 floats and lse
        // diagonal·heads (checked); the offsets and tiles, built on the host from the same batch, reach only
        // rows below `diagonal`.
        unsafe { self.launch("masked_attention_fwd", grid, THREADS, 0, &args) }
    }

    /// Gradients of [`Self::masked_attention_fwd`] for `dout`: the Q, K and V columns of `dqkv` are
    /// overwritten. The causal rows need the forward's `out` and `lse`, the same `qkv` (with its bias), and
    /// `delta` (a float per causal row and head of scratch); the diagonal rows read none of them.
    #[allow(clippy::too_many_arguments)]
    pub fn masked_attention_bwd(
        &self,
        dqkv: RowTensor,
        delta: Dev<f32>,
        dout: RowTensor,
        out: RowTensor,
        qkv: Qkv,
        lse: Dev<f32>,
        batch: &AttnBatch,
    ) -> Result<()> {
        let grid = batch.check()?;
        let width = batch.width();
        let (dqkv_at, ld_dqkv) = dqkv.check(batch.rows, 3 * width, "attention dq, dk, dv")?;
        let (dout_at, ld_dout) = dout.check(batch.rows, width, "attention dout")?;
        let zero = [dqkv.part(0, width), dqkv.part(1, width)];
        self.diagonal(dqkv.part(2, width), Some(zero), dout, None, batch)?;
        let (out_at, ld_out) = out.check(batch.rows, width, "attention output")?;
        let (qkv_at, ld_qkv, bias) = qkv.check(batch)?;
        covers(&lse, batch.diagonal * batch.heads, "attention lse")?;
        covers(&delta, batch.diagonal * batch.heads, "attention delta")?;
        if batch.num_tiles == 0 {
            return Ok(());
        }
        let (scale_log2, scale) = scales();
        let (offsets, tiles, heads) =
            (Arg::Ptr(batch.cu_seqlens.ptr()), Arg::Ptr(batch.tiles.ptr()), Arg::I32(int(batch.heads, "heads")?));
        let dq_args = [
            Arg::Ptr(dqkv_at),
            Arg::I32(ld_dqkv),
            Arg::Ptr(delta.ptr()),
            Arg::Ptr(dout_at),
            Arg::I32(ld_dout),
            Arg::Ptr(out_at),
            Arg::I32(ld_out),
            Arg::Ptr(qkv_at),
            Arg::I32(ld_qkv),
            Arg::Ptr(bias),
            Arg::Ptr(lse.ptr()),
            offsets,
            tiles,
            heads,
            Arg::F32(scale_log2),
            Arg::F32(scale),
        ];
        // SAFETY: as the forward; dqkv covers its 3·heads·64 columns and dout its heads·64 of `rows` rows,
        // delta diagonal·heads (checked). This pass writes delta, which the next reads: the stream orders them.
        unsafe { self.launch("masked_attention_bwd_dq", grid, THREADS, 0, &dq_args)? };
        let dkdv_args = [
            Arg::Ptr(dqkv_at),
            Arg::I32(ld_dqkv),
            Arg::Ptr(dout_at),
            Arg::I32(ld_dout),
            Arg::Ptr(qkv_at),
            Arg::I32(ld_qkv),
            Arg::Ptr(bias),
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

    /// `dst = src (+ bias)` and, when given, both of `zero` cleared, over the batch's diagonal rows (none:
    /// no launch) and every head. The kernel takes one stride for `dst` and `zero` (parts of one dQKV
    /// buffer); the callers checked the whole tensors and the bias.
    fn diagonal(
        &self,
        dst: RowTensor,
        zero: Option<[RowTensor; 2]>,
        src: RowTensor,
        bias: Option<Dev<f32>>,
        batch: &AttnBatch,
    ) -> Result<()> {
        let (first, rows, width) = (batch.diagonal, batch.rows - batch.diagonal, batch.width());
        if rows == 0 {
            return Ok(());
        }
        let (dst, src, zero) =
            (dst.rows_from(first), src.rows_from(first), zero.map(|z| z.map(|t| t.rows_from(first))));
        let (dst_at, ld_dst) = dst.check(rows, width, "attention copy")?;
        let (src_at, ld_src) = src.check(rows, width, "attention copy source")?;
        let mut zeros = [0; 2];
        for (at, z) in zeros.iter_mut().zip(zero.iter().flatten()) {
            ensure!(z.stride == dst.stride, "attention copy: zeroed columns in rows of another stride");
            *at = z.check(rows, width, "attention zeroed columns")?.0;
        }
        let args = [
            Arg::Ptr(dst_at),
            Arg::Ptr(zeros[0]),
            Arg::Ptr(zeros[1]),
            Arg::I32(ld_dst),
            Arg::Ptr(src_at),
            Arg::I32(ld_src),
            Arg::Ptr(bias.map_or(0, |b| b.ptr())),
            Arg::I32(int(rows, "rows")?),
            Arg::I32(int(width, "width")?),
        ];
        // SAFETY: every tensor covers `width` columns of `rows` rows from 16-byte boundaries and the bias
        // `width` floats (checked here and by the callers).
        unsafe { self.launch("masked_attention_diag", (self.grid_for(rows * width / 8), 1), 256, 0, &args) }
    }
}
