//! Learning-rate schedule (SPEC §4.3): linear warm-up over the first W updates, then half a cosine to 0.
//!
//! For update s = 0, 1, …, S−1 with W = round(warmup_frac · S):
//! s < W → lr·(s+1)/W; otherwise lr·0.5·(1 + cos(π·(s−W)/(S−W))).
//! `round` is Python's: halves go to the even neighbour (round(2.5) = 2), so a Python script that follows
//! the SPEC gets the same W. W = 0 means no warm-up, W = S a run that is all warm-up.

use crate::bail_input;
use anyhow::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate (`--lr`).
    pub lr: f64,
    /// Number of updates S.
    pub total: usize,
    /// Warm-up updates W.
    pub warmup: usize,
}

impl Schedule {
    /// The schedule for `total` updates, checking the flags that feed it.
    pub fn new(lr: f64, total: usize, warmup_frac: f64) -> Result<Schedule> {
        if !(lr >= 0.0 && lr.is_finite()) {
            bail_input!("--lr must be a non-negative number, got {lr}");
        }
        if !(0.0..=1.0).contains(&warmup_frac) {
            bail_input!("--warmup-frac must be in [0, 1], got {warmup_frac}");
        }
        if total == 0 {
            bail_input!("training needs at least one update, but --steps/--epochs give 0");
        }
        // In [0, total] since warmup_frac is in [0, 1].
        let warmup = (warmup_frac * total as f64).round_ties_even() as usize;
        Ok(Schedule { lr, total, warmup })
    }

    /// Learning rate of update `s` (0-based). Past the last update the schedule has ended and gives 0.
    pub fn lr_at(&self, s: usize) -> f64 {
        let (w, total) = (self.warmup, self.total);
        if s >= total {
            0.0
        } else if s < w {
            self.lr * (s + 1) as f64 / w as f64
        } else {
            self.lr * 0.5 * (1.0 + (std::f64::consts::PI * (s - w) as f64 / (total - w) as f64).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs(lr: f64, total: usize, frac: f64) -> Vec<f64> {
        let s = Schedule::new(lr, total, frac).unwrap();
        (0..total).map(|i| s.lr_at(i)).collect()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-15 * w.abs().max(1e-300), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn warmup_then_cosine_by_hand() {
        // S = 10, W = 2: 1/2, 2/2, then 0.5(1 + cos(πk/8)) for k = 0..7.
        let half = std::f64::consts::FRAC_1_SQRT_2;
        let c8 = (std::f64::consts::PI / 8.0).cos();
        let c38 = (3.0 * std::f64::consts::PI / 8.0).cos();
        let want: Vec<f64> = [0.5, 1.0, 1.0, 0.5 * (1.0 + c8), 0.5 * (1.0 + half), 0.5 * (1.0 + c38), 0.5]
            .into_iter()
            .chain([0.5 * (1.0 - c38), 0.5 * (1.0 - half), 0.5 * (1.0 - c8)])
            .map(|x| 2e-3 * x)
            .collect();
        close(&lrs(2e-3, 10, 0.2), &want);
    }

    #[test]
    fn edge_cases() {
        // One update: W = round(0.1) = 0, so cosine from its top.
        close(&lrs(1e-3, 1, 0.1), &[1e-3]);
        // One update, all warm-up: W = 1, lr·1/1.
        close(&lrs(1e-3, 1, 1.0), &[1e-3]);
        // No warm-up: starts at the peak, ends one cosine step above 0.
        close(
            &lrs(1.0, 4, 0.0),
            &[1.0, 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2), 0.5, 0.5 * (1.0 - std::f64::consts::FRAC_1_SQRT_2)],
        );
        // All warm-up: a straight ramp to the peak at the last update.
        close(&lrs(1.0, 4, 1.0), &[0.25, 0.5, 0.75, 1.0]);
        let s = Schedule::new(1.0, 4, 1.0).unwrap();
        assert_eq!(s.lr_at(4), 0.0);
    }

    #[test]
    fn warmup_rounds_half_to_even_as_python() {
        // 0.25·10 = 2.5 → 2, 0.5·5 = 2.5 → 2, 0.5·7 = 3.5 → 4, 0.1·5 = 0.5 → 0, 0.3·5 = 1.5 → 2.
        for (frac, total, w) in [(0.25, 10, 2), (0.5, 5, 2), (0.5, 7, 4), (0.1, 5, 0), (0.3, 5, 2), (0.1, 1000, 100)] {
            assert_eq!(Schedule::new(1.0, total, frac).unwrap().warmup, w, "{frac} × {total}");
        }
    }

    #[test]
    fn bad_flags_are_input_errors() {
        for (lr, total, frac) in
            [(-1.0, 10, 0.1), (f64::NAN, 10, 0.1), (1.0, 0, 0.1), (1.0, 10, 1.5), (1.0, 10, f64::NAN)]
        {
            let err = Schedule::new(lr, total, frac).unwrap_err();
            assert!(crate::error::is_input_error(&err), "{err}");
        }
    }
}
