//! Retrieval metrics (SPEC §5), per user and averaged over users.
//!
//! For a ranked list r_1, r_2, … and a user's distinct targets G:
//! - H@K = 1 when some target is among the first K;
//! - R@K = |first K ∩ G| / |G|;
//! - N@K = DCG@K / IDCG@K, DCG@K = Σ_{r≤K} rel_r / log2(r + 1) with binary relevance and r from 1,
//!   IDCG@K the same sum over min(|G|, K) hits in a row.
//!
//! |G| counts every distinct target in the user's file, including targets that are not in the gallery:
//! those can never be retrieved, but SPEC §5 defines recall over "targets", not over retrievable targets,
//! so leaving them out would inflate R@K and N@K.

use crate::bail_input;
use anyhow::Result;

/// H@K, R@K and N@K of one user at one K.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UserMetrics {
    pub hit: f64,
    pub recall: f64,
    pub ndcg: f64,
}

/// Metrics of one user at each of `ks`. `ranked` holds distinct gallery rows, best first (it may be
/// shorter than K); `targets` the gallery rows of the user's targets (repeats allowed); `absent` the number
/// of distinct targets that are not in the gallery. Panics when the user has no target at all: users
/// without targets are skipped when the sequences are read.
pub fn user_metrics(ranked: &[usize], targets: &[usize], absent: usize, ks: &[usize]) -> Vec<UserMetrics> {
    let mut relevant = targets.to_vec();
    relevant.sort_unstable();
    relevant.dedup();
    let total = relevant.len() + absent;
    assert!(total > 0, "metrics: a user without targets");
    let max_k = ks.iter().copied().max().unwrap_or(0);
    // 0-based positions of the hits within the first max K.
    let hits: Vec<usize> = ranked
        .iter()
        .take(max_k)
        .enumerate()
        .filter(|(_, row)| relevant.binary_search(row).is_ok())
        .map(|(r, _)| r)
        .collect();
    let gain = |r: usize| 1.0 / ((r + 2) as f64).log2();
    ks.iter()
        .map(|&k| {
            let found = hits.partition_point(|&r| r < k);
            let dcg: f64 = hits[..found].iter().map(|&r| gain(r)).sum();
            let idcg: f64 = (0..total.min(k)).map(gain).sum();
            UserMetrics {
                hit: if found > 0 { 1.0 } else { 0.0 },
                recall: found as f64 / total as f64,
                ndcg: if idcg > 0.0 { dcg / idcg } else { 0.0 },
            }
        })
        .collect()
}

/// Sums of the metrics over users, for several K, added in user order.
#[derive(Clone, Debug)]
pub struct MetricsAccumulator {
    ks: Vec<usize>,
    sums: Vec<UserMetrics>,
    users: usize,
}

impl MetricsAccumulator {
    /// Checks the `--k` list: at least one K, each ≥ 1, no repeats.
    pub fn new(ks: &[usize]) -> Result<MetricsAccumulator> {
        if ks.is_empty() {
            bail_input!("--k needs at least one cut-off");
        }
        for (i, &k) in ks.iter().enumerate() {
            if k == 0 {
                bail_input!("--k values must be at least 1, got 0");
            }
            if ks[..i].contains(&k) {
                bail_input!("--k lists {k} twice");
            }
        }
        let zero = UserMetrics { hit: 0.0, recall: 0.0, ndcg: 0.0 };
        Ok(MetricsAccumulator { ks: ks.to_vec(), sums: vec![zero; ks.len()], users: 0 })
    }

    /// The largest K: how many rows to retrieve per user.
    pub fn max_k(&self) -> usize {
        self.ks.iter().copied().max().unwrap_or(0)
    }

    /// Adds one user (arguments as in [`user_metrics`]).
    pub fn add(&mut self, ranked: &[usize], targets: &[usize], absent: usize) {
        for (sum, m) in self.sums.iter_mut().zip(user_metrics(ranked, targets, absent, &self.ks)) {
            sum.hit += m.hit;
            sum.recall += m.recall;
            sum.ndcg += m.ndcg;
        }
        self.users += 1;
    }

    pub fn users(&self) -> usize {
        self.users
    }

    /// Averages keyed "H@K", "R@K", "N@K", for each K in the order given (0 for every metric when no user
    /// was added).
    pub fn averages(&self) -> Vec<(String, f64)> {
        let n = self.users.max(1) as f64;
        self.ks
            .iter()
            .zip(&self.sums)
            .flat_map(|(k, s)| {
                [(format!("H@{k}"), s.hit / n), (format!("R@{k}"), s.recall / n), (format!("N@{k}"), s.ndcg / n)]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-15, "{a} vs {b}");
    }

    #[test]
    fn one_user_by_hand() {
        // Ranked rows 7, 3, 9, 4, 1; targets {3, 4, 8} (8 repeated), plus one target not in the gallery: |G| = 4.
        let m = user_metrics(&[7, 3, 9, 4, 1], &[8, 4, 3, 8], 1, &[1, 2, 4, 10]);
        let g = |r: f64| 1.0 / (r + 1.0).log2(); // gain at 1-based rank r
        // K = 1: no hit.
        assert_eq!(m[0], UserMetrics { hit: 0.0, recall: 0.0, ndcg: 0.0 });
        // K = 2: target 3 at rank 2; IDCG over min(4, 2) = 2 ranks.
        close(m[1].hit, 1.0);
        close(m[1].recall, 0.25);
        close(m[1].ndcg, g(2.0) / (g(1.0) + g(2.0)));
        // K = 4: ranks 2 and 4; IDCG over 4 ranks.
        close(m[2].recall, 0.5);
        close(m[2].ndcg, (g(2.0) + g(4.0)) / (g(1.0) + g(2.0) + g(3.0) + g(4.0)));
        // K = 10 past the list: same hits, IDCG still over min(|G|, K) = 4.
        close(m[3].recall, 0.5);
        close(m[3].ndcg, m[2].ndcg);
    }

    #[test]
    fn perfect_and_empty_rankings() {
        let m = user_metrics(&[2, 5, 0], &[5, 2], 0, &[2, 3]);
        assert_eq!(m, vec![UserMetrics { hit: 1.0, recall: 1.0, ndcg: 1.0 }; 2]);
        let m = user_metrics(&[], &[5], 0, &[3]);
        assert_eq!(m, vec![UserMetrics { hit: 0.0, recall: 0.0, ndcg: 0.0 }]);
        // Only absent targets: nothing can be found.
        let m = user_metrics(&[1, 2], &[], 2, &[2]);
        assert_eq!(m, vec![UserMetrics { hit: 0.0, recall: 0.0, ndcg: 0.0 }]);
    }

    #[test]
    fn accumulator_averages_over_users() {
        let mut a = MetricsAccumulator::new(&[2, 1]).unwrap();
        assert_eq!(a.max_k(), 2);
        a.add(&[4, 2], &[2], 0); // H@2 1, R@2 1, N@2 g(2)/g(1); @1 all 0
        a.add(&[4, 2], &[4, 9], 0); // @2: H 1, R 1/2, N 1/(1+g(2)); @1: 1, 1/2, 1
        assert_eq!(a.users(), 2);
        let g2 = 1.0 / 3f64.log2();
        let want = [
            ("H@2", 1.0),
            ("R@2", 0.75),
            ("N@2", (g2 + 1.0 / (1.0 + g2)) / 2.0),
            ("H@1", 0.5),
            ("R@1", 0.25),
            ("N@1", 0.5),
        ];
        let got = a.averages();
        assert_eq!(got.len(), want.len());
        for ((name, value), (want_name, want_value)) in got.iter().zip(want) {
            assert_eq!(name, want_name);
            close(*value, want_value);
        }
    }

    #[test]
    fn bad_k_lists_are_input_errors() {
        for ks in [&[][..], &[0], &[50, 100, 50]] {
            assert!(crate::error::is_input_error(&MetricsAccumulator::new(ks).unwrap_err()));
        }
    }
}
