//! Copies a strided view of a storage in a file out in row-major order, with bounded buffers.
//!
//! A contiguous view streams through one chunk of `budget` bytes. A strided view reads the span of storage it
//! covers and gathers from memory; when that span is larger than both the budget and the view itself (a sparse
//! view into a big storage) it is split along its outer dimension, so no read ever exceeds the larger of the
//! budget and the view's own size. Peak memory is therefore about the largest tensor plus two chunks, whatever
//! the checkpoint's size.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// Where a storage lies in its file: the byte at which element 0 starts, and the element size.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub start: u64,
    pub elem: usize,
}

/// Reusable buffers for copying views, kept as 8-byte words so they can be viewed as any element type.
pub struct Gather {
    budget: usize,
    span: Vec<u64>,
    row: Vec<u64>,
}

/// Storage elements from the first to the last one a view of non-empty `dims` touches, inclusive.
fn span(dims: &[(u64, u64)]) -> u64 {
    1 + dims.iter().map(|&(n, s)| (n - 1) * s).sum::<u64>()
}

impl Gather {
    /// `budget` bounds every read except a strided view's own span (at least one element is read at a time).
    pub fn new(budget: usize) -> Self {
        Gather { budget: budget.max(8), span: Vec::new(), row: Vec::new() }
    }

    /// Streams `len` bytes from byte `pos` of `src` to `out`, feeding them to `crc` when one is given.
    pub fn stream<R: Read + Seek, W: Write>(
        &mut self,
        src: &mut R,
        pos: u64,
        len: u64,
        out: &mut W,
        mut crc: Option<&mut crc32fast::Hasher>,
    ) -> io::Result<()> {
        src.seek(SeekFrom::Start(pos))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(self.budget as u64) as usize;
            let chunk = typed::<u8>(&mut self.span, n);
            src.read_exact(chunk)?;
            if let Some(h) = crc.as_mut() {
                h.update(chunk);
            }
            out.write_all(chunk)?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Copies the view `dims` ((size, stride) pairs in elements, outer to inner, as `TensorRef::layout` gives
    /// them) that starts at element `offset` of the storage at `at`.
    pub fn copy<R: Read + Seek, W: Write>(
        &mut self,
        src: &mut R,
        at: Source,
        offset: u64,
        dims: &[(u64, u64)],
        out: &mut W,
    ) -> io::Result<()> {
        if dims.iter().any(|&(n, _)| n == 0) {
            return Ok(());
        }
        let elem = at.elem as u64;
        let pos = at.start + offset * elem;
        match dims {
            [] => return self.stream(src, pos, elem, out, None),
            [(n, 1)] => return self.stream(src, pos, n * elem, out, None),
            _ => {}
        }
        let bytes = dims.iter().map(|&(n, _)| n).product::<u64>() * elem;
        if span(dims) * elem <= bytes.max(self.budget as u64) {
            self.read_span(src, pos, span(dims) * elem)?;
            return self.gather(at.elem, dims, out);
        }
        let (n, s) = dims[0];
        let rest = &dims[1..];
        let budget_elems = self.budget as u64 / elem;
        if span(rest) <= budget_elems {
            // Several outer indices per read: as many as fit in the budget.
            let per_read = (budget_elems - span(rest)).checked_div(s).map_or(n, |q| (q + 1).min(n));
            let mut i = 0;
            while i < n {
                let k = per_read.min(n - i);
                let mut chunk = Vec::with_capacity(dims.len());
                chunk.push((k, s));
                chunk.extend_from_slice(rest);
                self.read_span(src, pos + i * s * elem, span(&chunk) * elem)?;
                self.gather(at.elem, &chunk, out)?;
                i += k;
            }
            return Ok(());
        }
        for i in 0..n {
            self.copy(src, at, offset + i * s, rest, out)?;
        }
        Ok(())
    }

    /// Reads `len` bytes from byte `pos` into the span buffer.
    fn read_span<R: Read + Seek>(&mut self, src: &mut R, pos: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("a tensor span does not fit in memory"))?;
        src.seek(SeekFrom::Start(pos))?;
        src.read_exact(typed::<u8>(&mut self.span, len))
    }

    /// Writes the view `dims` of the span buffer (which starts at the view's first element) in row-major order.
    fn gather<W: Write>(&mut self, elem: usize, dims: &[(u64, u64)], out: &mut W) -> io::Result<()> {
        let (span, row, budget) = (&self.span, &mut self.row, self.budget);
        match elem {
            1 => gather_typed::<u8, W>(bytemuck::cast_slice(span), dims, row, budget, out),
            2 => gather_typed::<u16, W>(bytemuck::cast_slice(span), dims, row, budget, out),
            4 => gather_typed::<u32, W>(bytemuck::cast_slice(span), dims, row, budget, out),
            _ => gather_typed::<u64, W>(bytemuck::cast_slice(span), dims, row, budget, out),
        }
    }
}

/// The first `count` elements of `buf` viewed as `T`, growing it if needed. A buffer that must grow is freed
/// first, so growing never holds the old and the new allocation at once.
fn typed<T: bytemuck::Pod>(buf: &mut Vec<u64>, count: usize) -> &mut [T] {
    let words = (count * size_of::<T>()).div_ceil(8);
    if buf.len() < words {
        *buf = Vec::new();
        buf.resize(words, 0);
    }
    &mut bytemuck::cast_slice_mut(buf.as_mut_slice())[..count]
}

/// Writes the view `dims` of `src` (whose element 0 is the view's first) in row-major order, through `row`.
///
/// The last two dimensions are walked in blocks of output rows when the inner stride is the larger (a
/// transpose): the reads for one column of a block are then neighbours in memory, instead of one page apart.
fn gather_typed<T: bytemuck::Pod, W: Write>(
    src: &[T],
    dims: &[(u64, u64)],
    row: &mut Vec<u64>,
    budget: usize,
    out: &mut W,
) -> io::Result<()> {
    let size = size_of::<T>();
    let (n, s) = (dims[dims.len() - 1].0 as usize, dims[dims.len() - 1].1 as usize);
    let (outer, (m, ms)) = match dims.len() {
        1 => (&dims[..0], (1, 0)),
        d => (&dims[..d - 2], (dims[d - 2].0 as usize, dims[d - 2].1 as usize)),
    };
    let block = if s != 1 && ms < s { (budget / (n * size)).clamp(1, 64) } else { 1 };
    let per_piece = (budget / size).max(1);
    let mut index = vec![0u64; outer.len()];
    loop {
        let base = outer.iter().zip(&index).map(|(&(_, st), &i)| i * st).sum::<u64>() as usize;
        let mut i = 0;
        while i < m {
            let rows = block.min(m - i);
            let first = base + i * ms;
            if s == 1 {
                out.write_all(bytemuck::cast_slice(&src[first..first + n]))?;
            } else if rows > 1 {
                let tile = typed::<T>(row, rows * n);
                for j in 0..n {
                    for b in 0..rows {
                        tile[b * n + j] = src[first + b * ms + j * s];
                    }
                }
                out.write_all(bytemuck::cast_slice(tile))?;
            } else {
                let mut j = 0;
                while j < n {
                    let count = per_piece.min(n - j);
                    let piece = typed::<T>(row, count);
                    for (k, d) in piece.iter_mut().enumerate() {
                        *d = src[first + (j + k) * s];
                    }
                    out.write_all(bytemuck::cast_slice(piece))?;
                    j += count;
                }
            }
            i += rows;
        }
        // Odometer over the outer dimensions, last fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return Ok(());
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d].0 {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tensor::{Dtype, StorageRef, TensorRef};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::io::Cursor;

    /// A reader that records the largest single read, to check the memory bound.
    struct Counting {
        inner: Cursor<Vec<u8>>,
        largest: usize,
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.inner.read(buf)
        }
    }

    impl Seek for Counting {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    /// The view read element by element from the original (unmerged) shape and strides.
    fn naive(file: &[u8], at: Source, t: &TensorRef) -> Vec<u8> {
        let mut out = Vec::new();
        let total = t.numel();
        for flat in 0..total {
            let mut rem = flat;
            let mut idx = t.offset;
            for d in (0..t.shape.len()).rev() {
                idx += (rem % t.shape[d]) * t.stride[d];
                rem /= t.shape[d];
            }
            let p = (at.start + idx * at.elem as u64) as usize;
            out.extend_from_slice(&file[p..p + at.elem]);
        }
        out
    }

    fn random_view(rng: &mut ChaCha8Rng, dtype: Dtype) -> TensorRef {
        let rank = rng.random_range(0..5usize);
        let shape: Vec<u64> = (0..rank).map(|_| rng.random_range(1..6u64)).collect();
        // Row-major strides, then a random mix of: padding (views of a wider tensor), permutation
        // (transposes), zero strides (expand).
        let mut stride = vec![0u64; rank];
        let mut acc = 1;
        for d in (0..rank).rev() {
            stride[d] = acc;
            acc *= shape[d] + rng.random_range(0..3u64) * rng.random_range(0..2u64);
        }
        for d in 0..rank {
            let e = rng.random_range(d..rank);
            stride.swap(d, e);
            if rng.random_range(0..8) == 0 {
                stride[d] = 0;
            }
        }
        let offset = rng.random_range(0..7u64);
        let storage = StorageRef { key: "0".into(), dtype, numel: 0 };
        TensorRef::new(storage, offset, shape, stride).unwrap()
    }

    #[test]
    fn copies_match_naive_indexing_for_random_views_and_budgets() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..600 {
            let dtype = [Dtype::U8, Dtype::BF16, Dtype::F32, Dtype::F64][case % 4];
            let t = random_view(&mut rng, dtype);
            let at = Source { start: rng.random_range(0..9u64), elem: dtype.size() };
            let len = (at.start + t.extent().unwrap() * at.elem as u64) as usize + rng.random_range(0..5usize);
            let file: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let want = naive(&file, at, &t);
            for budget in [1, 8, 24, 100, 1 << 20] {
                let mut src = Counting { inner: Cursor::new(file.clone()), largest: 0 };
                let mut out = Vec::new();
                Gather::new(budget).copy(&mut src, at, t.offset, &t.layout(), &mut out).unwrap();
                assert_eq!(out, want, "case {case}: {t:?} budget {budget}");
                let bound = budget.max(8).max(t.nbytes() as usize);
                assert!(src.largest <= bound, "case {case}: read {} > {bound}", src.largest);
            }
        }
    }

    #[test]
    fn a_sparse_view_of_a_big_storage_is_read_in_budget_sized_pieces() {
        // Column 3 of a 64 x 1000 f32 matrix: the span is the whole matrix, the view 64 elements.
        let storage = StorageRef { key: "0".into(), dtype: Dtype::F32, numel: 64_000 };
        let t = TensorRef::new(storage, 3, vec![64, 2], vec![1000, 1]).unwrap();
        let file: Vec<u8> = (0..256_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let at = Source { start: 0, elem: 4 };
        let mut src = Counting { inner: Cursor::new(file.clone()), largest: 0 };
        let mut out = Vec::new();
        Gather::new(4096).copy(&mut src, at, t.offset, &t.layout(), &mut out).unwrap();
        assert_eq!(out, naive(&file, at, &t));
        assert!(src.largest <= 4096);
    }

    #[test]
    fn streaming_feeds_the_checksum() {
        let file: Vec<u8> = (0..1000u32).map(|i| (i * 13 % 256) as u8).collect();
        let mut h = crc32fast::Hasher::new();
        let mut out = Vec::new();
        Gather::new(64).stream(&mut Cursor::new(file.clone()), 10, 900, &mut out, Some(&mut h)).unwrap();
        assert_eq!(out, &file[10..910]);
        assert_eq!(h.finalize(), crc32fast::hash(&file[10..910]));
    }
}
