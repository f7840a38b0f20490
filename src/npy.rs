//! Two-dimensional `.npy` arrays (NumPy format 1.0, C order, little-endian f16 or f32), memory-mapped.
//!
//! Stores are created full-size up front and filled in place, so a killed job keeps every row it wrote and a
//! reader can map a store of any size without loading it.

use crate::error::input;
use anyhow::{Context, Result};
use half::f16;
use memmap2::{Mmap, MmapMut};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element type of a stored matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    fn descr(self) -> &'static str {
        match self {
            Dtype::F16 => "<f2",
            Dtype::F32 => "<f4",
        }
    }

    /// The name used on the command line and in `meta.json`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "float16",
            Dtype::F32 => "float32",
        }
    }
}

/// The header of a 2-D array: padded so the data starts on a 64-byte boundary, as NumPy writes it.
fn header(rows: usize, cols: usize, dtype: Dtype) -> Vec<u8> {
    let dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}", dtype.descr());
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Parses a NumPy header: returns (rows, cols, dtype, data offset).
fn parse_header(bytes: &[u8], path: &Path) -> Result<(usize, usize, Dtype, usize)> {
    let bad = |what: &str| input(format!("{}: not a 2-D float16/float32 .npy array ({what})", path.display()));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(&format!("format version {v}"))),
    };
    let dict = bytes.get(start..start + len).ok_or_else(|| bad("header runs past the end of the file"))?;
    let dict = std::str::from_utf8(dict).map_err(|_| bad("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let at = dict.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = dict[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let dtype = match field("descr") {
        Some(r) if r.starts_with("'<f2'") => Dtype::F16,
        Some(r) if r.starts_with("'<f4'") => Dtype::F32,
        _ => return Err(bad("descr is not '<f2' or '<f4'")),
    };
    if !field("fortran_order").is_some_and(|r| r.starts_with("False")) {
        return Err(bad("Fortran order"));
    }
    let shape = field("shape").and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next());
    let dims: Vec<usize> = shape
        .ok_or_else(|| bad("no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("shape is not integers")))
        .collect::<Result<_>>()?;
    let [rows, cols] = dims[..] else {
        return Err(bad(&format!("shape has {} dimensions", dims.len())));
    };
    Ok((rows, cols, dtype, start + len))
}

fn decode_row(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// One row as fp16, the GPU's input precision: f16 rows are copied, f32 rows rounded to nearest.
fn decode_row_f16(bytes: &[u8], dtype: Dtype, out: &mut [f16]) {
    match dtype {
        Dtype::F16 => {
            let n = out.len() * 2;
            bytemuck::cast_slice_mut::<f16, u8>(out).copy_from_slice(&bytes[..n]);
        }
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
    }
}

/// A read-only, memory-mapped 2-D array.
pub struct NpyMatrix {
    map: Mmap,
    offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
    pub path: PathBuf,
}

impl NpyMatrix {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| input(format!("{}: cannot open ({e})", path.display())))?;
        // SAFETY: the map is read-only; a concurrent writer could change values under us but not the layout,
        // which is checked against the file length below.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let (rows, cols, dtype, offset) = parse_header(&map, path)?;
        let need = offset + rows * cols * dtype.size();
        if map.len() < need {
            return Err(input(format!(
                "{}: holds {} bytes, its header promises {need} ({rows}×{cols} {})",
                path.display(),
                map.len(),
                dtype.name()
            )));
        }
        Ok(Self { map, offset, rows, cols, dtype, path: path.to_path_buf() })
    }

    /// The raw little-endian bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let width = self.cols * self.dtype.size();
        let start = self.offset + r * width;
        &self.map[start..start + width]
    }

    /// Row `r` converted to f32 into `out` (length `cols`).
    pub fn read_row(&self, r: usize, out: &mut [f32]) {
        decode_row(self.row_bytes(r), self.dtype, out);
    }

    pub fn row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.cols];
        self.read_row(r, &mut out);
        out
    }

    /// Row `r` as fp16 into `out` (length `cols`).
    pub fn read_row_f16(&self, r: usize, out: &mut [f16]) {
        decode_row_f16(self.row_bytes(r), self.dtype, out);
    }
}

/// A writable, memory-mapped 2-D array, created full-size (filled with zeros) or reopened to continue.
pub struct NpyMatrixMut {
    map: MmapMut,
    offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
}

impl NpyMatrixMut {
    /// Creates (or truncates) `path` as a `rows × cols` array of zeros.
    pub fn create(path: &Path, rows: usize, cols: usize, dtype: Dtype) -> Result<Self> {
        let head = header(rows, cols, dtype);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        file.set_len((head.len() + rows * cols * dtype.size()) as u64)
            .with_context(|| format!("{}: cannot size to {rows}×{cols}", path.display()))?;
        let mut matrix = Self::map(&file, path, head.len(), rows, cols, dtype)?;
        matrix.map[..head.len()].copy_from_slice(&head);
        Ok(matrix)
    }

    /// Reopens an array made by [`create`](Self::create) to write more rows; its shape and dtype must match.
    pub fn reopen(path: &Path, rows: usize, cols: usize, dtype: Dtype) -> Result<Self> {
        let existing = NpyMatrix::open(path)?;
        if (existing.rows, existing.cols, existing.dtype) != (rows, cols, dtype) {
            return Err(input(format!(
                "{}: is {}×{} {}, this run writes {rows}×{cols} {}",
                path.display(),
                existing.rows,
                existing.cols,
                existing.dtype.name(),
                dtype.name()
            )));
        }
        let offset = existing.offset;
        drop(existing);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Self::map(&file, path, offset, rows, cols, dtype)
    }

    fn map(file: &File, path: &Path, offset: usize, rows: usize, cols: usize, dtype: Dtype) -> Result<Self> {
        // SAFETY: this process is the only writer of a store directory while a job runs.
        let map = unsafe { MmapMut::map_mut(file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        Ok(Self { map, offset, rows, cols, dtype })
    }

    /// Writes `values` (length `cols`) into row `r`, converting to the array's dtype.
    pub fn write_row(&mut self, r: usize, values: &[f32]) {
        assert_eq!(values.len(), self.cols, "row width");
        let width = self.cols * self.dtype.size();
        let start = self.offset + r * width;
        let dst = &mut self.map[start..start + width];
        match self.dtype {
            Dtype::F16 => {
                for (d, v) in dst.chunks_exact_mut(2).zip(values) {
                    d.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            Dtype::F32 => {
                for (d, v) in dst.chunks_exact_mut(4).zip(values) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }

    /// Row `r` as f32 (to read back what an earlier run wrote).
    pub fn read_row(&self, r: usize, out: &mut [f32]) {
        let width = self.cols * self.dtype.size();
        let start = self.offset + r * width;
        decode_row(&self.map[start..start + width], self.dtype, out);
    }

    /// Forces rows `first..=last` to disk.
    pub fn flush_rows(&self, first: usize, last: usize) -> Result<()> {
        let width = self.cols * self.dtype.size();
        self.map
            .flush_range(self.offset + first * width, (last + 1 - first) * width)
            .context("cannot flush the embeddings array to disk")
    }

    /// Forces written rows to disk.
    pub fn flush(&self) -> Result<()> {
        self.map.flush().context("cannot flush the embeddings array to disk")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_byte_aligned_and_parses_back() {
        for &(rows, cols, dtype) in &[(0, 4096, Dtype::F16), (12345678, 64, Dtype::F32), (3, 5, Dtype::F16)] {
            let h = header(rows, cols, dtype);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
            let got = parse_header(&h, Path::new("x.npy")).unwrap();
            assert_eq!(got, (rows, cols, dtype, h.len()));
        }
    }

    #[test]
    fn rows_round_trip_in_both_dtypes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [Dtype::F16, Dtype::F32] {
            let path = dir.path().join(format!("{}.npy", dtype.name()));
            let mut m = NpyMatrixMut::create(&path, 3, 4, dtype).unwrap();
            m.write_row(1, &[0.5, -1.25, 3.0, 1e-3]);
            m.flush().unwrap();
            drop(m);
            let mut m = NpyMatrixMut::reopen(&path, 3, 4, dtype).unwrap();
            m.write_row(2, &[1.0, 2.0, 4.0, 8.0]);
            m.flush().unwrap();
            let r = NpyMatrix::open(&path).unwrap();
            assert_eq!((r.rows, r.cols, r.dtype), (3, 4, dtype));
            assert_eq!(r.row(0), vec![0.0; 4]);
            let row1 = r.row(1);
            assert_eq!(&row1[..3], &[0.5, -1.25, 3.0]);
            assert!((row1[3] - 1e-3).abs() < 1e-6);
            assert_eq!(r.row(2), vec![1.0, 2.0, 4.0, 8.0]);
            assert!(NpyMatrixMut::reopen(&path, 4, 4, dtype).is_err());
        }
    }

    #[test]
    fn truncated_and_foreign_files_are_input_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let mut bytes = header(10, 10, Dtype::F32);
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &bytes).unwrap();
        let err = NpyMatrix::open(&path).err().unwrap();
        assert!(crate::error::is_input_error(&err), "{err}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(crate::error::is_input_error(&NpyMatrix::open(&path).err().unwrap()));
    }
}
