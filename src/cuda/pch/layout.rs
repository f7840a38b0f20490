//! Launchers of kernels/pch_layout.cu: packing a padded batch's valid rows, and gathering rows of a table
//! on the device. Crate-private: the kernels trust the row map's contents, which only [`super::GpuPch`]
//! builds (on the host, from a checked batch shape) or [`Gpu::gather_rows_f16`] checks.

use crate::cuda::gpu::{Arg, Gpu};
use crate::cuda::memory::Dev;
use crate::cuda::ops::{covers, int};
use anyhow::{Result, ensure};
use half::f16;

/// Where the packed rows of a padded `[seqs, len]` batch come from: packed row r is padded position
/// `valid[r]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowMap {
    pub valid: Dev<i32>,
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

    /// `out[r] = table[rows[r]]` for fp16 rows of `cols` values (a multiple of 8), gathered on the device:
    /// the indices go up through `index`, ordered on the compute stream before the gather that reads them.
    pub(crate) fn gather_rows_f16(
        &self,
        out: Dev<f16>,
        table: Dev<f16>,
        rows: &[u32],
        index: Dev<i32>,
        cols: usize,
    ) -> Result<()> {
        ensure!(cols > 0 && table.len().is_multiple_of(cols), "gather: {table:?} is not rows of {cols}");
        let table_rows = table.len() / cols;
        int(table_rows, "table rows")?;
        ensure!(
            rows.iter().all(|&r| (r as usize) < table_rows),
            "gather: a row index past the table's {table_rows} rows"
        );
        let host: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        self.upload(index, &host)?;
        let map = RowMap { valid: index.slice(0, rows.len()), rows: rows.len(), seqs: table_rows, len: 1 };
        self.pack_rows(out, GpuContent::F16(table), &map, cols)
    }
}
