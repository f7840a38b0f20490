//! Launchers of kernels/pch_layout.cu: packing a padded batch's valid rows, and the permutes between
//! row-major projections and the head-major attention layout. Crate-private: the kernels trust the row map's
//! contents, which only [`super::GpuPch`] builds (on the host, from a checked batch shape).

use crate::cuda::attention_train::MASKED_ATTENTION_HEAD_DIM as HD;
use crate::cuda::gpu::{Arg, Gpu};
use crate::cuda::memory::Dev;
use crate::cuda::ops::{covers, int};
use anyhow::{Result, ensure};
use half::f16;

/// Where the packed rows of a padded `[seqs, len]` batch come from: packed row r is padded position
/// `valid[r]`; sequence b is packed rows `cu_seqlens[b] .. cu_seqlens[b + 1]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowMap {
    pub valid: Dev<i32>,
    pub cu_seqlens: Dev<i32>,
    pub rows: usize,
    pub seqs: usize,
    pub len: usize,
}

/// The content of a batch on the device: padded `[B, L, d_content]` in either precision, or only the valid
/// positions, packed in (sequence, position) order `[rows, d_content]` in fp16, which the adaptor reads as
/// it is (what training gathers on the host, to copy no padding).
#[derive(Clone, Copy, Debug)]
pub enum GpuContent {
    F32(Dev<f32>),
    F16(Dev<f16>),
    PackedF16(Dev<f16>),
}

impl GpuContent {
    pub fn len(&self) -> usize {
        match self {
            GpuContent::F32(d) => d.len(),
            GpuContent::F16(d) | GpuContent::PackedF16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RowMap {
    fn check(&self) -> Result<()> {
        covers(&self.valid, self.rows, "row map")?;
        covers(&self.cu_seqlens, self.seqs + 1, "row map offsets")?;
        int(self.seqs * self.len, "padded positions")?;
        Ok(())
    }
}

impl Gpu {
    /// `out[r] = fp16(src[map.valid[r]])`, rows of `cols` (a multiple of 8).
    pub(super) fn pack_rows(&self, out: Dev<f16>, src: GpuContent, map: &RowMap, cols: usize) -> Result<()> {
        map.check()?;
        ensure!(cols > 0 && cols.is_multiple_of(8), "pack: width {cols} is not a multiple of 8");
        covers(&out, map.rows * cols, "packed rows")?;
        ensure!(src.len() >= map.seqs * map.len * cols, "pack: the padded batch holds {} values", src.len());
        let (name, ptr) = match src {
            GpuContent::F32(d) => ("pack_rows_f32", d.ptr()),
            GpuContent::F16(d) => ("pack_rows_f16", d.ptr()),
            GpuContent::PackedF16(_) => anyhow::bail!("pack: the content is packed already"),
        };
        int(map.rows * cols, "packed elements")?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(ptr),
            Arg::Ptr(map.valid.ptr()),
            Arg::I32(int(map.rows, "rows")?),
            Arg::I32(int(cols, "width")?),
        ];
        // SAFETY: out covers rows·cols and src the whole padded batch, which every valid[r] < seqs·len
        // indexes (the map is built from the checked shape); 16-byte accesses for cols % 8 == 0.
        unsafe { self.launch(name, (self.grid_for(map.rows * cols / 8), 1), 256, 0, &args) }
    }

    /// `heads[head-major] = rows[:, col .. col + heads·64] (+ bias)`, rows of `stride` halves.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_to_heads(
        &self,
        heads: Dev<f16>,
        rows: Dev<f16>,
        bias: Option<Dev<f32>>,
        map: &RowMap,
        n_heads: usize,
        stride: usize,
        col: usize,
    ) -> Result<()> {
        let n = self.check_permute(heads, rows, map, n_heads, stride, col)?;
        if let Some(bias) = &bias {
            covers(bias, n_heads * HD, "head bias")?;
        }
        let args = [
            Arg::Ptr(heads.ptr()),
            Arg::Ptr(rows.ptr()),
            Arg::Ptr(bias.map_or(0, |b| b.ptr())),
            Arg::Ptr(map.valid.ptr()),
            Arg::Ptr(map.cu_seqlens.ptr()),
            Arg::I32(int(map.rows, "rows")?),
            Arg::I32(int(n_heads, "heads")?),
            Arg::I32(int(map.len, "padded length")?),
            Arg::I32(int(stride, "row stride")?),
            Arg::I32(int(col, "column")?),
        ];
        // SAFETY: see check_permute; the bias covers heads·64 floats (checked).
        unsafe { self.launch("rows_to_heads", (self.grid_for(n / 8), 1), 256, 0, &args) }
    }

    /// `rows[:, col .. col + heads·64] = heads[head-major]`: the inverse of [`Self::rows_to_heads`].
    pub(super) fn heads_to_rows(
        &self,
        rows: Dev<f16>,
        heads: Dev<f16>,
        map: &RowMap,
        n_heads: usize,
        stride: usize,
        col: usize,
    ) -> Result<()> {
        let n = self.check_permute(heads, rows, map, n_heads, stride, col)?;
        let args = [
            Arg::Ptr(rows.ptr()),
            Arg::Ptr(heads.ptr()),
            Arg::Ptr(map.valid.ptr()),
            Arg::Ptr(map.cu_seqlens.ptr()),
            Arg::I32(int(map.rows, "rows")?),
            Arg::I32(int(n_heads, "heads")?),
            Arg::I32(int(map.len, "padded length")?),
            Arg::I32(int(stride, "row stride")?),
            Arg::I32(int(col, "column")?),
        ];
        // SAFETY: see check_permute.
        unsafe { self.launch("heads_to_rows", (self.grid_for(n / 8), 1), 256, 0, &args) }
    }

    /// The checks both permutes rely on; returns the elements of the head-major tensor. Each packed row r
    /// maps into the head-major rows of its own sequence (below `rows·heads`), so covering `rows·heads·64`
    /// and `rows·stride` suffices; 16-byte accesses need `stride` and `col` to be multiples of 8.
    fn check_permute(
        &self,
        heads: Dev<f16>,
        rows: Dev<f16>,
        map: &RowMap,
        n_heads: usize,
        stride: usize,
        col: usize,
    ) -> Result<usize> {
        map.check()?;
        ensure!(
            stride.is_multiple_of(8) && col.is_multiple_of(8) && col + n_heads * HD <= stride,
            "permute: {n_heads} heads from column {col} do not fit rows of {stride}"
        );
        let n = map.rows * n_heads * HD;
        covers(&heads, n, "head-major tensor")?;
        covers(&rows, map.rows * stride, "row-major tensor")?;
        int(n.max(map.rows * stride), "permute elements")?;
        Ok(n)
    }
}
