//! Top-K retrieval (SPEC §5): the K best gallery rows for a user, in one pass with a bounded heap.
//!
//! Ranking order everywhere: higher score first, equal scores by lower row first (item row order), NaN
//! after every number. Excluded rows (a user's history) never appear.

use crate::cpu::gemm;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Gallery rows scored per product in [`top_k_block`]: the score buffer is users × this, so memory does
/// not grow with the gallery.
const GALLERY_CHUNK: usize = 8192;

/// One retrieved row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit<S> {
    pub row: usize,
    pub score: S,
}

/// `Less` when (a, row_a) ranks ahead of (b, row_b).
fn rank<S: PartialOrd>(a: &S, row_a: usize, b: &S, row_b: usize) -> Ordering {
    let is_nan = |x: &S| x.partial_cmp(x).is_none();
    let by_score = match (is_nan(a), is_nan(b)) {
        (false, false) => b.partial_cmp(a).unwrap_or(Ordering::Equal),
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
    };
    by_score.then(row_a.cmp(&row_b))
}

/// Heap entry ordered so that the heap's maximum is the hit that ranks last.
struct Entry<S>(Hit<S>);

impl<S: PartialOrd> Ord for Entry<S> {
    fn cmp(&self, other: &Self) -> Ordering {
        rank(&self.0.score, self.0.row, &other.0.score, other.0.row)
    }
}

impl<S: PartialOrd> PartialOrd for Entry<S> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<S: PartialOrd> PartialEq for Entry<S> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<S: PartialOrd> Eq for Entry<S> {}

/// The K best (row, score) pairs pushed so far, in any push order.
pub struct TopK<S> {
    k: usize,
    heap: BinaryHeap<Entry<S>>,
}

impl<S: PartialOrd + Copy> TopK<S> {
    pub fn new(k: usize) -> TopK<S> {
        TopK { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    /// Offers one row; most rows are turned away by a single comparison with the current K-th.
    pub fn push(&mut self, row: usize, score: S) {
        if self.heap.len() < self.k {
            self.heap.push(Entry(Hit { row, score }));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && rank(&score, row, &worst.0.score, worst.0.row) == Ordering::Less
        {
            *worst = Entry(Hit { row, score });
        }
    }

    /// The kept hits, best first.
    pub fn into_sorted(self) -> Vec<Hit<S>> {
        self.heap.into_sorted_vec().into_iter().map(|e| e.0).collect()
    }
}

/// Sorted, deduplicated copy of a user's excluded rows.
fn sorted(exclude: &[usize]) -> Vec<usize> {
    let mut rows = exclude.to_vec();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Pushes `scores` (rows `first..first + scores.len()`) into `top`, skipping the rows in `exclude`
/// (sorted).
fn select<S: PartialOrd + Copy>(top: &mut TopK<S>, scores: &[S], first: usize, exclude: &[usize]) {
    let mut skip = exclude[exclude.partition_point(|&r| r < first)..].iter().peekable();
    for (row, &score) in (first..).zip(scores) {
        if skip.next_if_eq(&&row).is_none() {
            top.push(row, score);
        }
    }
}

/// The `k` best rows of `scores`, best first, leaving out the rows in `exclude` (any order).
pub fn top_k<S: PartialOrd + Copy>(scores: &[S], k: usize, exclude: &[usize]) -> Vec<Hit<S>> {
    let mut top = TopK::new(k);
    select(&mut top, scores, 0, &sorted(exclude));
    top.into_sorted()
}

/// For each of a block of users (`users`: `[n, d]`), the `k` best rows of `gallery` (`[m, d]`) by dot
/// product, best first, leaving out that user's `exclude` rows. The gallery is scored in chunks, one
/// product per chunk, and each user's selection runs in parallel.
pub fn top_k_block(users: &[f32], gallery: &[f32], d: usize, k: usize, exclude: &[&[usize]]) -> Vec<Vec<Hit<f32>>> {
    assert!(
        d > 0 && users.len().is_multiple_of(d) && gallery.len().is_multiple_of(d),
        "top_k_block: rows are not {d} wide"
    );
    let (n, m) = (users.len() / d, gallery.len() / d);
    assert_eq!(exclude.len(), n, "top_k_block: {n} users but {} exclusion lists", exclude.len());
    let exclude: Vec<Vec<usize>> = exclude.iter().map(|e| sorted(e)).collect();
    let mut tops: Vec<TopK<f32>> = (0..n).map(|_| TopK::new(k)).collect();
    let mut scores = vec![0.0f32; n * GALLERY_CHUNK.min(m)];
    for first in (0..m).step_by(GALLERY_CHUNK) {
        let w = GALLERY_CHUNK.min(m - first);
        let scores = &mut scores[..n * w];
        gemm::a_bt(scores, users, &gallery[first * d..(first + w) * d], n, w, d, false);
        tops.par_iter_mut()
            .zip(scores.par_chunks(w))
            .zip(&exclude)
            .for_each(|((top, row), exclude)| select(top, row, first, exclude));
    }
    tops.into_iter().map(TopK::into_sorted).collect()
}

/// How often each of `n_items` rows occurs in `rows` (e.g. every training interaction): the scores of the
/// popularity baseline. Panics on a row ≥ `n_items`; the caller maps ids to rows.
pub fn counts(n_items: usize, rows: impl IntoIterator<Item = usize>) -> Vec<u64> {
    let mut counts = vec![0u64; n_items];
    for row in rows {
        assert!(row < n_items, "popularity: row {row} is past the {n_items} items");
        counts[row] += 1;
    }
    counts
}

/// The popularity baseline: every user gets the most frequent items, minus their own exclusions. The
/// gallery is sorted once, so each user costs O(k + |exclude|) instead of a pass over the gallery.
pub struct Popularity {
    order: Vec<Hit<u64>>,
}

impl Popularity {
    pub fn new(counts: &[u64]) -> Popularity {
        let mut order: Vec<Hit<u64>> = counts.iter().enumerate().map(|(row, &score)| Hit { row, score }).collect();
        order.sort_unstable_by(|a, b| rank(&a.score, a.row, &b.score, b.row));
        Popularity { order }
    }

    /// The `k` most frequent rows not in `exclude`, most frequent first, ties by row.
    pub fn top_k(&self, k: usize, exclude: &[usize]) -> Vec<Hit<u64>> {
        let exclude = sorted(exclude);
        self.order.iter().filter(|h| exclude.binary_search(&h.row).is_err()).take(k).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rows<S>(hits: &[Hit<S>]) -> Vec<usize> {
        hits.iter().map(|h| h.row).collect()
    }

    /// The definition: sort everything (stable, so ties keep row order) and cut.
    fn by_sorting(scores: &[f32], k: usize, exclude: &[usize]) -> Vec<usize> {
        let mut all: Vec<usize> = (0..scores.len()).filter(|r| !exclude.contains(r)).collect();
        all.sort_by(|&a, &b| rank(&scores[a], a, &scores[b], b));
        all.truncate(k);
        all
    }

    #[test]
    fn hand_computed_with_ties_and_exclusions() {
        let s = [0.5f32, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5];
        assert_eq!(rows(&top_k(&s, 4, &[])), vec![1, 4, 5, 0]);
        assert_eq!(rows(&top_k(&s, 5, &[4, 0])), vec![1, 5, 2, 6, 3]);
        // Exclusions out of order and repeated; k past what is left.
        assert_eq!(rows(&top_k(&s, 10, &[5, 1, 5, 6])), vec![4, 0, 2, 3]);
        assert_eq!(top_k(&s, 0, &[]), vec![]);
        let hits = top_k(&s, 2, &[1]);
        assert_eq!(hits, vec![Hit { row: 4, score: 0.9 }, Hit { row: 5, score: 0.7 }]);
        // NaN ranks after every number.
        assert_eq!(rows(&top_k(&[f32::NAN, -1.0, f32::NAN, f32::NEG_INFINITY], 4, &[])), vec![1, 3, 0, 2]);
    }

    #[test]
    fn push_order_does_not_matter() {
        let s = [3u64, 1, 3, 2, 3];
        let mut top = TopK::new(3);
        for row in [4, 2, 3, 1, 0] {
            top.push(row, s[row]);
        }
        assert_eq!(rows(&top.into_sorted()), vec![0, 2, 4]);
    }

    #[test]
    fn matches_a_full_sort_on_random_scores_with_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for _ in 0..50 {
            let n = rng.random_range(1..300);
            // Few distinct values: many ties.
            let s: Vec<f32> = (0..n).map(|_| rng.random_range(0..12) as f32 * 0.25).collect();
            let exclude: Vec<usize> = (0..rng.random_range(0..20)).map(|_| rng.random_range(0..n + 5)).collect();
            let k = rng.random_range(0..n + 3);
            assert_eq!(rows(&top_k(&s, k, &exclude)), by_sorting(&s, k, &exclude));
        }
    }

    #[test]
    fn block_version_matches_per_user_selection() {
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let (n, m, d, k) = (5, GALLERY_CHUNK + 300, 8, 20); // two gallery chunks
        // Coordinates on a 1/4 grid keep the products exact, so equal scores are equal and ties occur.
        let mut grid = |len: usize| (0..len).map(|_| rng.random_range(-2..3) as f32 * 0.25).collect::<Vec<f32>>();
        let (users, gallery) = (grid(n * d), grid(m * d));
        let exclude: Vec<Vec<usize>> = (0..n).map(|u| (0..30).map(|e| (e * 997 + u * 13) % m).collect()).collect();
        let views: Vec<&[usize]> = exclude.iter().map(|e| e.as_slice()).collect();
        let got = top_k_block(&users, &gallery, d, k, &views);
        for u in 0..n {
            let scores: Vec<f32> = gallery
                .chunks_exact(d)
                .map(|g| g.iter().zip(&users[u * d..(u + 1) * d]).map(|(a, b)| a * b).sum())
                .collect();
            assert_eq!(rows(&got[u]), by_sorting(&scores, k, &exclude[u]), "user {u}");
            assert!(got[u].iter().all(|h| h.score == scores[h.row]));
        }
    }

    #[test]
    fn popularity_ranks_by_count_then_row() {
        let c = counts(6, [3, 1, 3, 5, 1, 0, 3]);
        assert_eq!(c, vec![1, 2, 0, 3, 0, 1]);
        let pop = Popularity::new(&c);
        assert_eq!(rows(&pop.top_k(4, &[])), vec![3, 1, 0, 5]);
        assert_eq!(rows(&pop.top_k(10, &[1, 5])), vec![3, 0, 2, 4]);
        assert_eq!(pop.top_k(2, &[3]), top_k(&c, 2, &[3]));
    }
}
