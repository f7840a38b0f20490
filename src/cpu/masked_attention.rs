//! Multi-head scaled dot-product attention over packed variable-length sequences, with a causal or
//! diagonal mask.
//!
//! Sequences are packed without padding ([`Varlen`]): the rows of the linear layers are
//! `[Σ lengths, heads·head_dim]`, and attention tensors are head-major per sequence — sequence b holds its
//! heads one after another, each `[lengths[b], head_dim]` — so that each (sequence, head) pair is one
//! contiguous block and its two products are plain GEMMs of exactly its length. [`to_heads`] and
//! [`from_heads`] move between the two layouts. Pairs run in parallel with rayon.

use super::{Real, gemm};
use rayon::prelude::*;

/// Which keys a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Key `j` is visible from query `i` when `j <= i`.
    Causal,
    /// Each position sees only itself (LEARN's item tower Variant 2, and single items).
    Diagonal,
}

impl MaskKind {
    /// The keys `lo..hi` visible from query `i`.
    pub fn keys(self, i: usize) -> (usize, usize) {
        match self {
            MaskKind::Causal => (0, i + 1),
            MaskKind::Diagonal => (i, i + 1),
        }
    }
}

/// Where packed sequences lie: sequence b is rows `start(b)..start(b) + lengths[b]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Varlen {
    lengths: Vec<usize>,
    /// Prefix sums of the lengths (one more entry than sequences).
    starts: Vec<usize>,
    /// Prefix sums of the squared lengths: where each sequence's score blocks start, per head.
    square_starts: Vec<usize>,
}

impl Varlen {
    pub fn new(lengths: &[usize]) -> Self {
        let prefix = |f: fn(usize) -> usize| {
            std::iter::once(0).chain(lengths.iter().scan(0, move |acc, &n| {
                *acc += f(n);
                Some(*acc)
            }))
        };
        Self { lengths: lengths.to_vec(), starts: prefix(|n| n).collect(), square_starts: prefix(|n| n * n).collect() }
    }

    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The first row of sequence `b`.
    pub fn start(&self, b: usize) -> usize {
        self.starts[b]
    }

    /// All rows: the sum of the lengths.
    pub fn rows(&self) -> usize {
        self.starts[self.lengths.len()]
    }

    /// Values of an attention-probability tensor: `heads · Σ lengths²`.
    pub fn prob_len(&self, heads: usize) -> usize {
        heads * self.square_starts[self.lengths.len()]
    }

    /// `buf` cut into one block per sequence, of `size(length)` values each.
    fn per_sequence<'a, T>(&self, buf: &'a mut [T], size: impl Fn(usize) -> usize) -> Vec<&'a mut [T]> {
        blocks(buf, self.lengths.iter().map(|&n| size(n)))
    }
}

/// `buf` cut into consecutive blocks of the given sizes.
fn blocks<T>(buf: &mut [T], sizes: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut rest = buf;
    sizes
        .map(|size| {
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(size);
            rest = tail;
            block
        })
        .collect()
}

/// Head count and width of an attention tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub count: usize,
    pub dim: usize,
}

/// Copies columns `col..col + count·dim` of each row of `rows` (rows of `stride` values) into the head-major
/// `heads`; head h takes columns `col + h·dim ..`. With `stride = 3·count·dim` and `col` = 0, W, 2W this
/// splits a fused Q | K | V projection.
pub fn to_heads<T: Real>(heads: &mut [T], rows: &[T], stride: usize, col: usize, seqs: &Varlen, hd: Heads) {
    let w = hd.count * hd.dim;
    seqs.per_sequence(heads, |n| n * w).into_par_iter().enumerate().for_each(|(b, dst)| {
        let (n, first) = (seqs.lengths[b], seqs.starts[b]);
        for (h, dst) in dst.chunks_mut((n * hd.dim).max(1)).enumerate() {
            for (i, dst) in dst.chunks_mut(hd.dim).enumerate() {
                let at = (first + i) * stride + col + h * hd.dim;
                dst.copy_from_slice(&rows[at..at + hd.dim]);
            }
        }
    });
}

/// The inverse of [`to_heads`]: writes head-major `heads` into columns `col..col + count·dim` of each row of
/// `rows`, leaving the other columns as they are.
pub fn from_heads<T: Real>(rows: &mut [T], stride: usize, col: usize, heads: &[T], seqs: &Varlen, hd: Heads) {
    let w = hd.count * hd.dim;
    seqs.per_sequence(rows, |n| n * stride).into_par_iter().enumerate().for_each(|(b, dst)| {
        let (n, base) = (seqs.lengths[b], seqs.starts[b] * w);
        for (i, row) in dst.chunks_mut(stride).enumerate() {
            for h in 0..hd.count {
                let at = base + (h * n + i) * hd.dim;
                row[col + h * hd.dim..col + (h + 1) * hd.dim].copy_from_slice(&heads[at..at + hd.dim]);
            }
        }
    });
}

/// One (sequence, head) pair: its length and where its blocks start in the head-major tensors and in the
/// probabilities.
struct Pair {
    n: usize,
    at: usize,
    prob_at: usize,
}

/// Every pair in (sequence, head) order, the order of the blocks in memory.
fn pairs(seqs: &Varlen, hd: Heads) -> impl Iterator<Item = Pair> + '_ {
    (0..seqs.lengths.len()).flat_map(move |b| {
        let n = seqs.lengths[b];
        (0..hd.count).map(move |h| Pair {
            n,
            at: (seqs.starts[b] * hd.count + h * n) * hd.dim,
            prob_at: (seqs.square_starts[b] * hd.count) + h * n * n,
        })
    })
}

/// `out = dropout(softmax(q kᵀ / √dim + mask)) v` per (sequence, head). Keeps the softmax `probs`
/// (`heads · Σ n²` values, zero where masked) for [`backward`]. `keep`, when given, holds dropout
/// multipliers (0 or 1/(1-p)) in the layout of `probs`.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    keep: Option<&[T]>,
    seqs: &Varlen,
    hd: Heads,
    mask: MaskKind,
) {
    let (dh, scale) = (hd.dim, T::c(1.0 / (hd.dim as f64).sqrt()));
    let list: Vec<Pair> = pairs(seqs, hd).collect();
    let outs = blocks(out, list.iter().map(|p| p.n * dh));
    let ps = blocks(probs, list.iter().map(|p| p.n * p.n));
    list.into_par_iter().zip(outs).zip(ps).for_each_init(Vec::new, |dropped, ((pair, out), p)| {
        let Pair { n, at, prob_at } = pair;
        let (q, k, v) = (&q[at..at + n * dh], &k[at..at + n * dh], &v[at..at + n * dh]);
        gemm::a_bt(p, q, k, n, n, dh, false);
        for (i, row) in p.chunks_mut(n.max(1)).enumerate() {
            let (lo, hi) = mask.keys(i);
            let top = row[lo..hi].iter().fold(T::neg_infinity(), |m, &s| m.max(s));
            let mut sum = T::zero();
            for s in &mut row[lo..hi] {
                *s = ((*s - top) * scale).exp();
                sum = sum + *s;
            }
            let inv = T::one() / sum;
            row[lo..hi].iter_mut().for_each(|s| *s = *s * inv);
            row[..lo].fill(T::zero());
            row[hi..].fill(T::zero());
        }
        match keep {
            Some(keep) => {
                dropped.clear();
                dropped.extend(p.iter().zip(&keep[prob_at..prob_at + n * n]).map(|(&p, &m)| p * m));
                gemm::a_b(out, dropped, v, n, dh, n, false);
            }
            None => gemm::a_b(out, p, v, n, dh, n, false),
        }
    });
}

/// Gradients of [`forward`] given `dout`: `dq`, `dk`, `dv` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    keep: Option<&[T]>,
    seqs: &Varlen,
    hd: Heads,
) {
    let (dh, scale) = (hd.dim, T::c(1.0 / (hd.dim as f64).sqrt()));
    let list: Vec<Pair> = pairs(seqs, hd).collect();
    let sizes = || list.iter().map(|p| p.n * dh);
    let (dqs, dks, dvs) = (blocks(dq, sizes()), blocks(dk, sizes()), blocks(dv, sizes()));
    list.par_iter().zip(dqs).zip(dks).zip(dvs).for_each_init(
        || (Vec::new(), Vec::new()),
        |(dp, dropped), (((pair, dq), dk), dv)| {
            let &Pair { n, at, prob_at } = pair;
            let block = at..at + n * dh;
            let (q, k, v, dout) = (&q[block.clone()], &k[block.clone()], &v[block.clone()], &dout[block]);
            let p = &probs[prob_at..prob_at + n * n];
            dp.resize(n * n, T::zero());
            gemm::a_bt(dp, dout, v, n, n, dh, false);
            match keep {
                Some(keep) => {
                    let keep = &keep[prob_at..prob_at + n * n];
                    dropped.clear();
                    dropped.extend(p.iter().zip(keep).map(|(&p, &m)| p * m));
                    gemm::at_b(dv, dropped, dout, n, dh, n, false);
                    dp.iter_mut().zip(keep).for_each(|(d, &m)| *d = *d * m);
                }
                None => gemm::at_b(dv, p, dout, n, dh, n, false),
            }
            // Softmax Jacobian, row by row: ds = p ∘ (dp - Σ p·dp), times the score scale.
            for (ds, p) in dp.chunks_mut(n.max(1)).zip(p.chunks(n.max(1))) {
                let dot = ds.iter().zip(p).map(|(&d, &p)| d * p).sum::<T>();
                ds.iter_mut().zip(p).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
            }
            gemm::a_b(dq, dp, k, n, dh, n, false);
            gemm::at_b(dk, dp, q, n, dh, n, false);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_check, random};

    const HD: Heads = Heads { count: 3, dim: 5 };
    const LENGTHS: [usize; 4] = [6, 3, 0, 1];

    fn seqs() -> Varlen {
        Varlen::new(&LENGTHS)
    }

    /// The mask written as a predicate, independently of [`MaskKind::keys`].
    fn visible(mask: MaskKind, i: usize, j: usize) -> bool {
        match mask {
            MaskKind::Causal => j <= i,
            MaskKind::Diagonal => j == i,
        }
    }

    /// Naive attention in f64, straight from the definition, indexing the packed layout by hand.
    fn naive(q: &[f64], k: &[f64], v: &[f64], keep: Option<&[f64]>, mask: MaskKind) -> (Vec<f64>, Vec<f64>) {
        let (h_n, dh) = (HD.count, HD.dim);
        let s = seqs();
        let mut out = vec![0.0; s.rows() * h_n * dh];
        let mut probs = vec![0.0; s.prob_len(h_n)];
        let mut prob_base = 0;
        for (b, &n) in LENGTHS.iter().enumerate() {
            for h in 0..h_n {
                let at = |i: usize, d: usize| (s.start(b) * h_n + h * n + i) * dh + d;
                for i in 0..n {
                    let score = |j: usize| (0..dh).map(|d| q[at(i, d)] * k[at(j, d)]).sum::<f64>() / (dh as f64).sqrt();
                    let seen: Vec<usize> = (0..n).filter(|&j| visible(mask, i, j)).collect();
                    let z: f64 = seen.iter().map(|&j| score(j).exp()).sum();
                    for &j in &seen {
                        let p = score(j).exp() / z;
                        probs[prob_base + i * n + j] = p;
                        let p = p * keep.map_or(1.0, |m| m[prob_base + i * n + j]);
                        for d in 0..dh {
                            out[at(i, d)] += p * v[at(j, d)];
                        }
                    }
                }
                prob_base += n * n;
            }
        }
        (out, probs)
    }

    fn keep_mask(seed: u64) -> Vec<f64> {
        random(seqs().prob_len(HD.count), seed).iter().map(|&u| if u < -0.4 { 0.0 } else { 1.0 / 0.7 }).collect()
    }

    #[test]
    fn packing_offsets() {
        let s = seqs();
        assert_eq!((s.rows(), s.start(1), s.start(3), s.prob_len(2)), (10, 6, 9, 2 * (36 + 9 + 1)));
        assert_eq!(s.lengths(), &LENGTHS);
        for mask in [MaskKind::Causal, MaskKind::Diagonal] {
            for i in 0..6 {
                let (lo, hi) = mask.keys(i);
                for j in 0..6 {
                    assert_eq!((lo..hi).contains(&j), visible(mask, i, j), "{mask:?} {i} {j}");
                }
            }
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        let n = seqs().rows() * HD.count * HD.dim;
        let (q, k, v) = (random(n, 1), random(n, 2), random(n, 3));
        let scaled: Vec<f64> = q.iter().map(|x| 4.0 * x).collect(); // peaked softmax rows
        for mask in [MaskKind::Causal, MaskKind::Diagonal] {
            for keep in [None, Some(keep_mask(4))] {
                let mut out = vec![f64::NAN; n];
                let mut probs = vec![f64::NAN; seqs().prob_len(HD.count)];
                forward(&mut out, &mut probs, &scaled, &k, &v, keep.as_deref(), &seqs(), HD, mask);
                let (want_out, want_probs) = naive(&scaled, &k, &v, keep.as_deref(), mask);
                assert_close(&probs, &want_probs, 1e-14);
                assert_close(&out, &want_out, 1e-14);
            }
        }
        // f32 agrees with the f64 definition.
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (mut out, mut probs) = (vec![f32::NAN; n], vec![f32::NAN; seqs().prob_len(HD.count)]);
        forward(&mut out, &mut probs, &f(&scaled), &f(&k), &f(&v), None, &seqs(), HD, MaskKind::Causal);
        assert_close(&out, &naive(&scaled, &k, &v, None, MaskKind::Causal).0, 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let n = seqs().rows() * HD.count * HD.dim;
        let np = seqs().prob_len(HD.count);
        let (q, k, v, w) = (random(n, 5), random(n, 6), random(n, 7), random(n, 8));
        for mask in [MaskKind::Causal, MaskKind::Diagonal] {
            for keep in [None, Some(keep_mask(9))] {
                let keep = keep.as_deref();
                let loss = |q: &[f64], k: &[f64], v: &[f64]| {
                    let (mut out, mut probs) = (vec![0.0; n], vec![0.0; np]);
                    forward(&mut out, &mut probs, q, k, v, keep, &seqs(), HD, mask);
                    out.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
                };
                let (mut out, mut probs) = (vec![0.0; n], vec![0.0; np]);
                forward(&mut out, &mut probs, &q, &k, &v, keep, &seqs(), HD, mask);
                let (mut dq, mut dk, mut dv) = (vec![f64::NAN; n], vec![f64::NAN; n], vec![f64::NAN; n]);
                backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &probs, keep, &seqs(), HD);
                fd_check(&q, &dq, |q| loss(q, &k, &v), 1e-8);
                fd_check(&k, &dk, |k| loss(&q, k, &v), 1e-8);
                fd_check(&v, &dv, |v| loss(&q, &k, v), 1e-8);
            }
        }
    }

    #[test]
    fn head_layout_round_trips() {
        let s = seqs();
        let w = HD.count * HD.dim;
        let qkv = random(s.rows() * 3 * w, 10);
        let n = s.rows() * w;
        let mut parts = [vec![f64::NAN; n], vec![f64::NAN; n], vec![f64::NAN; n]];
        for (p, part) in parts.iter_mut().enumerate() {
            to_heads(part, &qkv, 3 * w, p * w, &s, HD);
        }
        // Position i of sequence b, head h, dimension d of K sits at row start(b)+i, column w + h·dim + d.
        let (b, h, i, d) = (1, 2, 1, 3);
        let k = &parts[1];
        let head_major = (s.start(b) * HD.count + h * LENGTHS[b] + i) * HD.dim + d;
        assert_eq!(k[head_major], qkv[(s.start(b) + i) * 3 * w + w + h * HD.dim + d]);
        let mut back = vec![f64::NAN; qkv.len()];
        for (p, part) in parts.iter().enumerate() {
            from_heads(&mut back, 3 * w, p * w, part, &s, HD);
        }
        assert_eq!(back, qkv);
        let mut rows = vec![f64::NAN; s.rows() * w];
        from_heads(&mut rows, w, 0, &parts[2], &s, HD);
        for r in 0..s.rows() {
            assert_eq!(rows[r * w..(r + 1) * w], qkv[r * 3 * w + 2 * w..(r + 1) * 3 * w]);
        }
    }
}
