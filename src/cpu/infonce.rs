//! Dense all-action InfoNCE (SPEC §4.2): loss and gradients in one call, tiled as flash attention is.
//!
//! Every valid history position j of user i is a query row u_q, every valid target position of user z a
//! column v_c, and s_qc = u_q·v_c/τ. With N_q the log-sum-exp of query q's negatives (the other users'
//! allowed targets), the loss of query q and its own user's target k is
//!
//! ```text
//! l_qk = −s_qk + log(exp s_qk + exp N_q) = softplus(N_q − s_qk)
//! ```
//!
//! so N_q is computed once per row and shared by all of the row's positives. A row without negatives has
//! N_q = −∞ and l = 0 exactly. For the mean over the P valid (q, k) pairs:
//!
//! ```text
//! ∂L/∂s_qk = −σ(N_q − s_qk)/P                                      k a positive of q
//! ∂L/∂s_qc = g_q·exp(s_qc − N_q),   g_q = Σ_k σ(N_q − s_qk)/P      c an allowed negative of q
//! ```
//!
//! The [queries × columns] score matrix is never held. Pass 1 streams N_q over column blocks (online
//! log-sum-exp); pass 2 handles the positives, one small product per user; pass 3 recomputes each score
//! tile and turns it into gradients, once over row blocks for the query gradients and once over column
//! blocks for the column gradients. Every gradient row is written by one job, adding in block order, so
//! no atomics or per-thread sums are needed and the bits do not depend on the number of threads. Memory
//! beyond the inputs and gradients: compact copies of them and one tile per job.

use super::{Real, gemm};
use rayon::prelude::*;
use std::ops::Range;

/// Which history positions are queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossPositions {
    /// Every valid position j < h_i (the paper's dense all-action loss).
    All,
    /// Only j = h_i − 1 (the official code's pretraining loss).
    Last,
}

/// One batch of tower outputs, right-padded, row-major.
pub struct InfoNceBatch<'a, T> {
    /// `[B, H, d]` user-tower outputs; rows at or past `hist_len[i]` are padding.
    pub users: &'a [T],
    /// Valid history length of each user, 1 ≤ h_i ≤ H.
    pub hist_len: &'a [usize],
    /// `[B, T, d]` item-tower outputs; rows at or past `tgt_len[i]` are padding.
    pub items: &'a [T],
    /// Valid target count of each user, 1 ≤ t_i ≤ T.
    pub tgt_len: &'a [usize],
    /// `[B, T]` item ids (store rows) of the targets, for false-negative masking.
    pub target_ids: &'a [u32],
    pub h: usize,
    pub t: usize,
    pub d: usize,
    /// Temperature, > 0.
    pub tau: T,
    /// Keep negatives that are among the query user's own targets (Eq. 1 exactly).
    pub keep_false_negatives: bool,
    pub positions: LossPositions,
    /// `[B, T]` log sampling probability of each target, or `None` for Eq. 1 as written. When given, every
    /// score becomes s_qc − log q_c, the sampling-bias correction of in-batch softmax (Yi et al., RecSys
    /// 2019): negatives are other users' targets, drawn in proportion to popularity, so uncorrected scores
    /// learn log p(v|u) − log q(v) and rank popular items down; corrected ones learn log p(v|u).
    pub log_q: Option<&'a [T]>,
}

/// The mean loss and the number of valid (i, j, k) triples it averages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InfoNceOut<T> {
    pub loss: T,
    pub pairs: usize,
}

/// Tile sizes: a 64 × 512 f32 score tile is 128 KiB, which stays in L2 next to its 64-wide operands.
const ROW_BLOCK: usize = 64;
const COL_BLOCK: usize = 512;

/// Loss of the batch, and its gradients with respect to `users` and `items` written (not accumulated) to
/// `d_users` (`[B, H, d]`) and `d_items` (`[B, T, d]`); padded rows and unused history rows get zero.
///
/// Panics when the shapes disagree or τ is not positive: the caller builds the batch, and the CLI checks
/// `--tau`.
pub fn infonce<T: Real>(b: &InfoNceBatch<T>, d_users: &mut [T], d_items: &mut [T]) -> InfoNceOut<T> {
    infonce_tiled(b, d_users, d_items, ROW_BLOCK, COL_BLOCK)
}

fn infonce_tiled<T: Real>(
    b: &InfoNceBatch<T>,
    d_users: &mut [T],
    d_items: &mut [T],
    rb: usize,
    cb: usize,
) -> InfoNceOut<T> {
    check_shapes(b, d_users, d_items);
    let d = b.d;
    let lay = Layout::new(b);
    let (nq, nc) = (lay.q_user.len(), lay.c_user.len());
    let pairs: usize = (0..b.hist_len.len()).map(|i| lay.queries(i).len() * lay.columns(i).len()).sum();
    d_users.fill(T::zero());
    d_items.fill(T::zero());
    if pairs == 0 {
        return InfoNceOut { loss: T::zero(), pairs };
    }

    // Compact copies: queries pre-scaled by 1/τ so a product gives s directly, and ∂s/∂v = u/τ is the
    // same scaled row.
    let inv_tau = T::one() / b.tau;
    let mut q = vec![T::zero(); nq * d];
    for (dst, &src) in q.chunks_exact_mut(d).zip(&lay.q_src) {
        for (x, &u) in dst.iter_mut().zip(&b.users[src * d..(src + 1) * d]) {
            *x = u * inv_tau;
        }
    }
    let mut c = vec![T::zero(); nc * d];
    for (dst, &src) in c.chunks_exact_mut(d).zip(&lay.c_src) {
        dst.copy_from_slice(&b.items[src * d..(src + 1) * d]);
    }
    let shift: Option<Vec<T>> = b.log_q.map(|log_q| lay.c_src.iter().map(|&src| log_q[src]).collect());
    let shift = shift.as_deref();

    // Pass 1: N_q for every query.
    let mut lse = vec![T::neg_infinity(); nq];
    lse.par_chunks_mut(rb).enumerate().for_each_init(
        || vec![T::zero(); rb * cb],
        |tile, (blk, lse)| {
            let rows = blk * rb..blk * rb + lse.len();
            negative_lse(lse, rows, &q, &c, shift, &lay, cb, tile)
        },
    );

    // Pass 2: the positives of each user, which start the gradients and give the loss and g_q.
    let inv_p = T::c(1.0 / pairs as f64);
    let mut dq = vec![T::zero(); nq * d];
    let mut dc = vec![T::zero(); nc * d];
    let mut g = vec![T::zero(); nq];
    let loss_sum: f64 = (
        split_rows(&mut dq, &lay.q_start, d),
        split_rows(&mut dc, &lay.c_start, d),
        split_rows(&mut g, &lay.q_start, 1),
    )
        .into_par_iter()
        .enumerate()
        .map(|(i, (dq_i, dc_i, g_i))| {
            let (qs, cs) = (lay.queries(i), lay.columns(i));
            let q_i = &q[qs.start * d..qs.end * d];
            let c_i = &c[cs.start * d..cs.end * d];
            positives(q_i, c_i, shift.map(|s| &s[cs.clone()]), &lse[qs], g_i, dq_i, dc_i, inv_p, d)
        })
        .sum();

    // Pass 3: the negatives, recomputing every score tile. Each gradient row has one owner, so no sums
    // are shared between jobs: row blocks own their query gradients, then column blocks (a tall tile, the
    // transpose of pass 1's) own their column gradients. Every sum runs in block order, so the bits do
    // not depend on the thread count; the price is one more score product.
    dq.par_chunks_mut(rb * d).enumerate().for_each_init(
        || vec![T::zero(); rb * cb],
        |tile, (blk, dq_blk)| {
            let rows = blk * rb..blk * rb + dq_blk.len() / d;
            for cols in blocks(nc, cb) {
                if let Some(p) = negative_probs(tile, &rows, &cols, &q, &c, shift, &lse, &g, &lay) {
                    gemm::a_b(dq_blk, p, &c[cols.start * d..cols.end * d], rows.len(), d, cols.len(), true);
                }
            }
        },
    );
    dc.par_chunks_mut(rb * d).enumerate().for_each_init(
        || vec![T::zero(); cb * rb],
        |tile, (blk, dc_blk)| {
            let cols = blk * rb..blk * rb + dc_blk.len() / d;
            for rows in blocks(nq, cb) {
                if let Some(p) = negative_probs(tile, &rows, &cols, &q, &c, shift, &lse, &g, &lay) {
                    gemm::at_b(dc_blk, p, &q[rows.start * d..rows.end * d], cols.len(), d, rows.len(), true);
                }
            }
        },
    );

    // ∂s/∂u = v/τ: the 1/τ of the query side is applied here, once.
    for (src, &dst) in dq.chunks_exact(d).zip(&lay.q_src) {
        for (x, &y) in d_users[dst * d..(dst + 1) * d].iter_mut().zip(src) {
            *x = y * inv_tau;
        }
    }
    for (src, &dst) in dc.chunks_exact(d).zip(&lay.c_src) {
        d_items[dst * d..(dst + 1) * d].copy_from_slice(src);
    }
    InfoNceOut { loss: T::c(loss_sum / pairs as f64), pairs }
}

fn check_shapes<T: Real>(b: &InfoNceBatch<T>, d_users: &[T], d_items: &[T]) {
    let n = b.hist_len.len();
    let (h, t, d) = (b.h, b.t, b.d);
    assert_eq!(b.tgt_len.len(), n, "infonce: {n} history lengths but {} target lengths", b.tgt_len.len());
    assert_eq!(b.users.len(), n * h * d, "infonce: users holds {} values, expected [{n}, {h}, {d}]", b.users.len());
    assert_eq!(b.items.len(), n * t * d, "infonce: items holds {} values, expected [{n}, {t}, {d}]", b.items.len());
    assert_eq!(b.target_ids.len(), n * t, "infonce: {} target ids, expected [{n}, {t}]", b.target_ids.len());
    assert_eq!(d_users.len(), b.users.len(), "infonce: d_users must match users");
    assert_eq!(d_items.len(), b.items.len(), "infonce: d_items must match items");
    for (i, (&hi, &ti)) in b.hist_len.iter().zip(b.tgt_len).enumerate() {
        assert!((1..=h).contains(&hi), "infonce: user {i} has history length {hi}, expected 1..={h}");
        assert!((1..=t).contains(&ti), "infonce: user {i} has {ti} targets, expected 1..={t}");
    }
    assert!(d > 0, "infonce: embedding width d must be at least 1");
    if let Some(log_q) = b.log_q {
        assert_eq!(log_q.len(), n * t, "infonce: {} log q values, expected [{n}, {t}]", log_q.len());
    }
    assert!(b.tau > T::zero() && b.tau.is_finite(), "infonce: tau must be positive, got {:?}", b.tau);
}

/// Which rows are queries, which columns exist, and which columns each user may not use as negatives.
/// Queries and columns are numbered user by user, so a user's own columns are one range.
struct Layout {
    d: usize,
    q_start: Vec<usize>,
    c_start: Vec<usize>,
    q_user: Vec<usize>,
    c_user: Vec<usize>,
    /// Row of `users` (as `[B·H, d]`) behind each query; row of `items` behind each column.
    q_src: Vec<usize>,
    c_src: Vec<usize>,
    /// Columns sorted by (item id, column), so the columns of one id are one run.
    by_id: Vec<usize>,
    /// Per user, the runs of `by_id` whose id is among its targets and which hold another user's column:
    /// false negatives. Empty when false negatives are kept.
    banned: Vec<Vec<Range<usize>>>,
}

impl Layout {
    fn new<T: Real>(b: &InfoNceBatch<T>) -> Layout {
        let n = b.hist_len.len();
        let (mut q_start, mut c_start) = (vec![0], vec![0]);
        let (mut q_user, mut c_user, mut q_src, mut c_src) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let first = match b.positions {
                LossPositions::All => 0,
                LossPositions::Last => b.hist_len[i] - 1,
            };
            for j in first..b.hist_len[i] {
                q_user.push(i);
                q_src.push(i * b.h + j);
            }
            for k in 0..b.tgt_len[i] {
                c_user.push(i);
                c_src.push(i * b.t + k);
            }
            q_start.push(q_user.len());
            c_start.push(c_user.len());
        }
        let id = |col: usize| b.target_ids[c_src[col]];
        let mut by_id: Vec<usize> = (0..c_user.len()).collect();
        by_id.sort_unstable_by_key(|&col| (id(col), col));
        let banned = if b.keep_false_negatives {
            vec![Vec::new(); n]
        } else {
            (0..n)
                .map(|i| {
                    let mut runs: Vec<Range<usize>> = (c_start[i]..c_start[i + 1])
                        .map(|own| {
                            let x = id(own);
                            by_id.partition_point(|&col| id(col) < x)..by_id.partition_point(|&col| id(col) <= x)
                        })
                        .filter(|run| by_id[run.clone()].iter().any(|&col| c_user[col] != i))
                        .collect();
                    runs.sort_unstable_by_key(|run| run.start);
                    runs.dedup();
                    runs
                })
                .collect()
        };
        Layout { d: b.d, q_start, c_start, q_user, c_user, q_src, c_src, by_id, banned }
    }

    fn queries(&self, user: usize) -> Range<usize> {
        self.q_start[user]..self.q_start[user + 1]
    }

    fn columns(&self, user: usize) -> Range<usize> {
        self.c_start[user]..self.c_start[user + 1]
    }

    /// Sets to −∞ the scores in `tile` (`rows × cols`, row-major) that are not negatives of their query:
    /// the query user's own columns and its false negatives.
    fn mask<T: Real>(&self, tile: &mut [T], rows: Range<usize>, cols: Range<usize>) {
        let w = cols.len();
        let mut r = rows.start;
        while r < rows.end {
            let user = self.q_user[r];
            let end = self.q_start[user + 1].min(rows.end);
            let run = &mut tile[(r - rows.start) * w..(end - rows.start) * w];
            let own = self.c_start[user].max(cols.start)..self.c_start[user + 1].min(cols.end);
            if own.start < own.end {
                for row in run.chunks_exact_mut(w) {
                    row[own.start - cols.start..own.end - cols.start].fill(T::neg_infinity());
                }
            }
            for ids in &self.banned[user] {
                let list = &self.by_id[ids.clone()];
                let from = list.partition_point(|&col| col < cols.start);
                for &col in list[from..].iter().take_while(|&&col| col < cols.end) {
                    for row in run.chunks_exact_mut(w) {
                        row[col - cols.start] = T::neg_infinity();
                    }
                }
            }
            r = end;
        }
    }
}

/// Splits `buf` (rows of `width`) into one slice per user, user i holding rows `starts[i]..starts[i+1]`.
fn split_rows<'a, T>(mut buf: &'a mut [T], starts: &[usize], width: usize) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(starts.len().saturating_sub(1));
    for w in starts.windows(2) {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut((w[1] - w[0]) * width);
        parts.push(head);
        buf = rest;
    }
    parts
}

/// Subtracts each column's log q from a `[rows × w]` block of scores.
fn apply_shift<T: Real>(block: &mut [T], shift: Option<&[T]>) {
    if let Some(shift) = shift {
        for row in block.chunks_exact_mut(shift.len()) {
            row.iter_mut().zip(shift).for_each(|(x, &s)| *x = *x - s);
        }
    }
}

/// Score tile of query rows `rows` against columns `cols`, corrected by `shift` and masked, into the front
/// of `tile`.
#[allow(clippy::too_many_arguments)]
fn scores<'t, T: Real>(
    tile: &'t mut [T],
    rows: &Range<usize>,
    cols: &Range<usize>,
    q: &[T],
    c: &[T],
    shift: Option<&[T]>,
    lay: &Layout,
) -> &'t mut [T] {
    let d = lay.d;
    let tile = &mut tile[..rows.len() * cols.len()];
    let q_blk = &q[rows.start * d..rows.end * d];
    gemm::a_bt(tile, q_blk, &c[cols.start * d..cols.end * d], rows.len(), cols.len(), d, false);
    apply_shift(tile, shift.map(|s| &s[cols.clone()]));
    lay.mask(tile, rows.clone(), cols.clone());
    tile
}

/// Pass 1 for one block of queries: the log-sum-exp of each row's negatives, streamed over column blocks
/// with a running maximum so no exponent overflows.
#[allow(clippy::too_many_arguments)]
fn negative_lse<T: Real>(
    lse: &mut [T],
    rows: Range<usize>,
    q: &[T],
    c: &[T],
    shift: Option<&[T]>,
    lay: &Layout,
    cb: usize,
    tile: &mut [T],
) {
    let nc = lay.c_user.len();
    let mut sum = vec![T::zero(); rows.len()];
    lse.fill(T::neg_infinity()); // the running maximum until the end
    for cols in blocks(nc, cb) {
        let w = cols.len();
        let tile = scores(tile, &rows, &cols, q, c, shift, lay);
        for ((row, m), s) in tile.chunks_exact(w).zip(lse.iter_mut()).zip(&mut sum) {
            let top = row.iter().fold(T::neg_infinity(), |a, &x| a.max(x));
            if top == T::neg_infinity() {
                continue;
            }
            let new_m = m.max(top);
            let part: T = row.iter().map(|&x| (x - new_m).exp()).sum();
            *s = *s * (*m - new_m).exp() + part;
            *m = new_m;
        }
    }
    for (m, &s) in lse.iter_mut().zip(&sum) {
        if *m != T::neg_infinity() {
            *m = *m + s.ln();
        }
    }
}

/// Pass 2 for user i: its loss terms (summed in f64), g_q of its queries, and the positive part of its
/// query gradients (in units of the scaled queries) and of its column gradients.
#[allow(clippy::too_many_arguments)]
fn positives<T: Real>(
    q_i: &[T],
    c_i: &[T],
    shift_i: Option<&[T]>,
    lse_i: &[T],
    g_i: &mut [T],
    dq_i: &mut [T],
    dc_i: &mut [T],
    inv_p: T,
    d: usize,
) -> f64 {
    let (n, t) = (lse_i.len(), c_i.len() / d);
    let mut w = vec![T::zero(); n * t];
    gemm::a_bt(&mut w, q_i, c_i, n, t, d, false);
    apply_shift(&mut w, shift_i);
    let mut loss = 0.0;
    for ((row, &lse), g) in w.chunks_exact_mut(t).zip(lse_i).zip(g_i.iter_mut()) {
        let mut total = T::zero();
        for s in row.iter_mut() {
            let x = lse - *s;
            loss += softplus(x).to_f64().unwrap_or(f64::NAN);
            let p = sigmoid(x);
            total = total + p;
            *s = -p * inv_p;
        }
        *g = total * inv_p;
    }
    gemm::a_b(dq_i, &w, c_i, n, d, t, false);
    gemm::at_b(dc_i, &w, q_i, t, d, n, false);
    loss
}

/// Pass 3 for one tile: ∂L/∂s of the negatives of queries `rows` among columns `cols`, in units of
/// the scaled queries, into the front of `tile`; `None` when no query of the block has a negative.
#[allow(clippy::too_many_arguments)]
fn negative_probs<'t, T: Real>(
    tile: &'t mut [T],
    rows: &Range<usize>,
    cols: &Range<usize>,
    q: &[T],
    c: &[T],
    shift: Option<&[T]>,
    lse: &[T],
    g: &[T],
    lay: &Layout,
) -> Option<&'t mut [T]> {
    let (lse, g) = (&lse[rows.clone()], &g[rows.clone()]);
    if g.iter().all(|&x| x == T::zero()) {
        return None;
    }
    let tile = scores(tile, rows, cols, q, c, shift, lay);
    for ((row, &m), &gq) in tile.chunks_exact_mut(cols.len()).zip(lse).zip(g) {
        // g_q = 0 also covers N_q = −∞, where exp(s − N_q) would be ∞·0.
        if gq == T::zero() {
            row.fill(T::zero());
        } else {
            row.iter_mut().for_each(|x| *x = gq * (*x - m).exp());
        }
    }
    Some(tile)
}

/// `0..n` in consecutive ranges of `size` (the last one shorter).
fn blocks(n: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(size).map(move |start| start..(start + size).min(n))
}

/// log(1 + eˣ) without overflow; exactly 0 at −∞.
fn softplus<T: Real>(x: T) -> T {
    x.max(T::zero()) + (-x.abs()).exp().ln_1p()
}

/// 1 / (1 + e⁻ˣ) without overflow; exactly 0 at −∞.
fn sigmoid<T: Real>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// An owned batch for tests.
    #[derive(Clone)]
    struct Case {
        users: Vec<f64>,
        hist_len: Vec<usize>,
        items: Vec<f64>,
        tgt_len: Vec<usize>,
        ids: Vec<u32>,
        h: usize,
        t: usize,
        d: usize,
        tau: f64,
        keep: bool,
        positions: LossPositions,
        log_q: Option<Vec<f64>>,
    }

    impl Case {
        /// Random padded batch; ids drawn from a small pool so that users share items and masking matters.
        /// With `unit`, rows are L2-normalised (scores up to ±1/τ).
        fn random(seed: u64, n: usize, h: usize, t: usize, d: usize, pool: u32, unit: bool) -> Case {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut rows = |count: usize| {
                let mut v: Vec<f64> = (0..count * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                if unit {
                    for r in v.chunks_exact_mut(d) {
                        let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                        r.iter_mut().for_each(|x| *x /= norm);
                    }
                }
                v
            };
            let (users, items) = (rows(n * h), rows(n * t));
            let hist_len = (0..n).map(|_| rng.random_range(1..=h)).collect();
            let tgt_len = (0..n).map(|_| rng.random_range(1..=t)).collect();
            let ids = (0..n * t).map(|_| rng.random_range(0..pool)).collect();
            Case {
                users,
                hist_len,
                items,
                tgt_len,
                ids,
                h,
                t,
                d,
                tau: 0.5,
                keep: false,
                positions: LossPositions::All,
                log_q: None,
            }
        }

        /// The same case with a log sampling probability per target, a function of its item id.
        fn with_log_q(&self) -> Case {
            let log_q = self.ids.iter().map(|&id| -1.0 - 0.37 * (id % 5) as f64).collect();
            Case { log_q: Some(log_q), ..self.clone() }
        }

        fn batch(&self) -> InfoNceBatch<'_, f64> {
            InfoNceBatch {
                users: &self.users,
                hist_len: &self.hist_len,
                items: &self.items,
                tgt_len: &self.tgt_len,
                target_ids: &self.ids,
                h: self.h,
                t: self.t,
                d: self.d,
                tau: self.tau,
                keep_false_negatives: self.keep,
                positions: self.positions,
                log_q: self.log_q.as_deref(),
            }
        }

        /// Loss and gradients from the tiled code, with the gradient buffers poisoned first.
        fn run(&self, rb: usize, cb: usize) -> (InfoNceOut<f64>, Vec<f64>, Vec<f64>) {
            let mut du = vec![f64::NAN; self.users.len()];
            let mut di = vec![f64::NAN; self.items.len()];
            let out = infonce_tiled(&self.batch(), &mut du, &mut di, rb, cb);
            (out, du, di)
        }
    }

    /// The definition, materialised: the full score matrix, and for every (i, j, k) a softmax over the
    /// positive and the allowed negatives. ∂l/∂s is p − 1 for the positive and p for each negative.
    fn naive(c: &Case) -> (f64, usize, Vec<f64>, Vec<f64>) {
        let (n, h, t, d) = (c.hist_len.len(), c.h, c.t, c.d);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let u = |i: usize, j: usize| &c.users[(i * h + j) * d..(i * h + j + 1) * d];
        let v = |z: usize, k: usize| &c.items[(z * t + k) * d..(z * t + k + 1) * d];
        let mut s = vec![0.0; n * h * n * t];
        for (i, j, z, k) in
            (0..n).flat_map(|i| (0..h).flat_map(move |j| (0..n).flat_map(move |z| (0..t).map(move |k| (i, j, z, k)))))
        {
            let shift = c.log_q.as_ref().map_or(0.0, |q| q[z * t + k]);
            s[((i * h + j) * n + z) * t + k] = dot(u(i, j), v(z, k)) / c.tau - shift;
        }
        let mut terms = Vec::new(); // (loss, [(user row, item row, ∂l/∂s)])
        for i in 0..n {
            let js = match c.positions {
                LossPositions::All => 0..c.hist_len[i],
                LossPositions::Last => c.hist_len[i] - 1..c.hist_len[i],
            };
            let own: Vec<u32> = c.ids[i * t..i * t + c.tgt_len[i]].to_vec();
            for j in js {
                let score = |z: usize, k: usize| s[((i * h + j) * n + z) * t + k];
                let negs: Vec<(usize, usize)> = (0..n)
                    .filter(|&z| z != i)
                    .flat_map(|z| (0..c.tgt_len[z]).map(move |k| (z, k)))
                    .filter(|&(z, k)| c.keep || !own.contains(&c.ids[z * t + k]))
                    .collect();
                for k in 0..c.tgt_len[i] {
                    let mut logits = vec![(i, k)];
                    logits.extend(&negs);
                    let m = logits.iter().map(|&(z, kk)| score(z, kk)).fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = logits.iter().map(|&(z, kk)| (score(z, kk) - m).exp()).sum();
                    let loss = m + sum.ln() - score(i, k);
                    let grads = logits
                        .iter()
                        .enumerate()
                        .map(|(e, &(z, kk))| {
                            let p = (score(z, kk) - m).exp() / sum;
                            (i * h + j, z * t + kk, if e == 0 { p - 1.0 } else { p })
                        })
                        .collect::<Vec<_>>();
                    terms.push((loss, grads));
                }
            }
        }
        let pairs = terms.len();
        let mut du = vec![0.0; c.users.len()];
        let mut di = vec![0.0; c.items.len()];
        let mut loss = 0.0;
        for (l, grads) in &terms {
            loss += l;
            for &(ur, ir, ds) in grads {
                let w = ds / (c.tau * pairs as f64);
                for e in 0..d {
                    du[ur * d + e] += w * c.items[ir * d + e];
                    di[ir * d + e] += w * c.users[ur * d + e];
                }
            }
        }
        (loss / pairs as f64, pairs, du, di)
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (e, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{e}]: {g} vs {w}");
        }
    }

    fn variants(base: &Case) -> Vec<Case> {
        let mut out = Vec::new();
        for keep in [false, true] {
            for positions in [LossPositions::All, LossPositions::Last] {
                let case = Case { keep, positions, ..base.clone() };
                out.push(case.with_log_q());
                out.push(case);
            }
        }
        out
    }

    #[test]
    fn tiled_matches_the_materialised_definition() {
        for (seed, unit, tau) in [(1, false, 0.5), (2, true, 0.05), (3, true, 0.2)] {
            let base = Case { tau, ..Case::random(seed, 6, 5, 4, 7, 9, unit) };
            for case in variants(&base) {
                let (want_loss, want_pairs, want_du, want_di) = naive(&case);
                // Tiles from one row × one column up to the whole matrix, including sizes that cut users.
                for (rb, cb) in [(1, 1), (3, 5), (7, 2), (64, 512)] {
                    let (out, du, di) = case.run(rb, cb);
                    assert_eq!(out.pairs, want_pairs);
                    assert!((out.loss - want_loss).abs() < 1e-12 * (1.0 + want_loss), "{} vs {want_loss}", out.loss);
                    assert_close(&du, &want_du, 1e-11, "d_users");
                    assert_close(&di, &want_di, 1e-11, "d_items");
                }
            }
        }
    }

    #[test]
    fn the_log_q_correction_changes_the_loss() {
        let case = Case::random(13, 6, 5, 4, 7, 9, false);
        assert!((case.run(4, 4).0.loss - case.with_log_q().run(4, 4).0.loss).abs() > 1e-3);
    }

    #[test]
    fn masking_changes_the_loss_when_users_share_items() {
        let case = Case::random(4, 6, 5, 4, 7, 5, false);
        let kept = Case { keep: true, ..case.clone() }.run(4, 4).0.loss;
        assert!((case.run(4, 4).0.loss - kept).abs() > 1e-3);
    }

    #[test]
    fn gradients_match_central_differences() {
        for base in [Case::random(5, 4, 4, 3, 5, 6, false), Case { tau: 0.1, ..Case::random(6, 3, 3, 3, 4, 4, true) }] {
            for case in variants(&base) {
                let (_, du, di) = case.run(3, 4);
                let eps = 1e-6;
                for (which, grad) in [(0, &du), (1, &di)] {
                    for (e, &analytic) in grad.iter().enumerate() {
                        let bumped = |delta: f64| {
                            let mut c = case.clone();
                            if which == 0 {
                                c.users[e] += delta
                            } else {
                                c.items[e] += delta
                            }
                            c.run(3, 4).0.loss
                        };
                        let fd = (bumped(eps) - bumped(-eps)) / (2.0 * eps);
                        assert!(
                            (fd - analytic).abs() < 1e-7 * (1.0 + fd.abs()),
                            "input {which} element {e}: fd {fd} vs {analytic}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn padded_and_unused_rows_get_zero_gradient() {
        let case = Case { positions: LossPositions::Last, ..Case::random(7, 5, 6, 5, 3, 40, false) };
        let (_, du, di) = case.run(2, 3);
        for i in 0..5 {
            for j in 0..case.h {
                let row = &du[(i * case.h + j) * 3..(i * case.h + j + 1) * 3];
                assert_eq!(row.iter().all(|&x| x == 0.0), j != case.hist_len[i] - 1, "user {i} row {j}");
            }
            for k in case.tgt_len[i]..case.t {
                assert!(di[(i * case.t + k) * 3..(i * case.t + k + 1) * 3].iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn no_negatives_gives_exactly_zero() {
        // One user: nothing to contrast with.
        let one = Case::random(8, 1, 4, 3, 5, 10, true);
        let (out, du, di) = Case { tau: 0.05, ..one }.run(2, 2);
        assert_eq!(out.loss, 0.0);
        assert!(out.pairs > 0);
        assert!(du.iter().chain(&di).all(|&x| x == 0.0));

        // Two users with the same single item: each one's only negative is masked.
        let mut two = Case::random(9, 2, 3, 2, 4, 1, true);
        two.tau = 0.05;
        let (out, du, di) = two.run(2, 2);
        assert_eq!(out.loss, 0.0);
        assert!(du.iter().chain(&di).all(|&x| x == 0.0));
        // Kept, they are ordinary negatives again.
        let (out, _, _) = Case { keep: true, ..two }.run(2, 2);
        assert!(out.loss > 0.0);
    }

    #[test]
    fn bits_do_not_depend_on_the_thread_count() {
        // Enough rows and columns for several blocks in both directions of pass 3.
        let case = Case::random(12, 24, 6, 5, 8, 40, true);
        let in_pool = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
            pool.install(|| case.run(4, 16))
        };
        let bits = |(out, du, di): (InfoNceOut<f64>, Vec<f64>, Vec<f64>)| {
            let grads: Vec<u64> = du.iter().chain(&di).map(|x| x.to_bits()).collect();
            (out.loss.to_bits(), grads)
        };
        let want = bits(in_pool(1));
        for threads in [1, 2, 3, 5, 8] {
            assert!(bits(in_pool(threads)) == want, "{threads} threads changed the bits");
        }
    }

    #[test]
    fn stable_at_large_scores_in_f32() {
        // τ = 0.05 on unit rows: scores up to ±20, exp(20) ≈ 5e8; the f32 result must stay close to f64.
        let case = Case { tau: 0.05, ..Case::random(10, 8, 6, 5, 16, 30, true) };
        let (want, du64, di64) = case.run(4, 8);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (users, items) = (f(&case.users), f(&case.items));
        let b = InfoNceBatch {
            users: &users,
            hist_len: &case.hist_len,
            items: &items,
            tgt_len: &case.tgt_len,
            target_ids: &case.ids,
            h: case.h,
            t: case.t,
            d: case.d,
            tau: 0.05f32,
            keep_false_negatives: false,
            positions: LossPositions::All,
            log_q: None,
        };
        let mut du = vec![f32::NAN; users.len()];
        let mut di = vec![f32::NAN; items.len()];
        let out = infonce_tiled(&b, &mut du, &mut di, 4, 8);
        assert!(out.loss.is_finite() && ((out.loss as f64 - want.loss) / want.loss).abs() < 1e-4);
        let scale = du64.iter().chain(&di64).fold(0.0f64, |a, &x| a.max(x.abs()));
        for (g, w) in du.iter().chain(&di).zip(du64.iter().chain(&di64)) {
            assert!((*g as f64 - w).abs() < 1e-4 * scale, "{g} vs {w}");
        }
    }
}
