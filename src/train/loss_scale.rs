//! Dynamic loss scaling for fp16 training on the GPU (SPEC §4.3): the loss (in practice the loss's
//! gradient) is multiplied by a power of two so that small gradients survive fp16, and the optimiser divides
//! it out. A step whose gradients overflow is skipped, never applied, and the scale halves; after
//! [`GROWTH_INTERVAL`] clean steps in a row it doubles. The same policy and constants as PyTorch's
//! `GradScaler`, so the two peers train alike.
//!
//! Powers of two only: multiplying and dividing by them is exact in binary floating point, so a scaled
//! step computes what an unscaled one would, wherever neither overflows nor underflows.

use serde::{Deserialize, Serialize};

/// The first scale (2^16, GradScaler's default).
pub const INITIAL_SCALE: f64 = 65536.0;
/// Clean steps before the scale doubles.
pub const GROWTH_INTERVAL: u32 = 2000;
/// The scale never goes below 1: a step that overflows at scale 1 overflows in fp32 terms too.
pub const MIN_SCALE: f64 = 1.0;
/// Nor above 2^24: the largest power of two that keeps every fp16 gradient bounded away from inf for a
/// unit-norm loss gradient.
pub const MAX_SCALE: f64 = 16_777_216.0;

/// The scale and its growth counter; saved with the optimiser state so a resumed run continues exactly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Clean steps since the last change.
    pub clean_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale { scale: INITIAL_SCALE, clean_steps: 0 }
    }
}

impl LossScale {
    /// A scale read back from a saved state: clamped to the range and rounded down to a power of two, so a
    /// damaged or foreign value can never make scaling inexact.
    pub fn restore(scale: f64, clean_steps: u32) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 { scale.clamp(MIN_SCALE, MAX_SCALE) } else { INITIAL_SCALE };
        LossScale { scale: 2f64.powi(scale.log2().floor() as i32), clean_steps: clean_steps.min(GROWTH_INTERVAL) }
    }

    /// Records how the step at the current scale went.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale = (self.scale / 2.0).max(MIN_SCALE);
            self.clean_steps = 0;
        } else {
            self.clean_steps += 1;
            if self.clean_steps >= GROWTH_INTERVAL {
                self.scale = (self.scale * 2.0).min(MAX_SCALE);
                self.clean_steps = 0;
            }
        }
    }

    /// True when the scale can go no lower: another overflow means the gradients themselves are not finite.
    pub fn at_minimum(&self) -> bool {
        self.scale <= MIN_SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_a_clean_run_doubles() {
        let mut s = LossScale::default();
        s.update(true);
        assert_eq!(s, LossScale { scale: 32768.0, clean_steps: 0 });
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!(s, LossScale { scale: 32768.0, clean_steps: GROWTH_INTERVAL - 1 });
        s.update(false);
        assert_eq!(s, LossScale { scale: 65536.0, clean_steps: 0 });
        // An overflow resets the count of clean steps.
        (0..10).for_each(|_| s.update(false));
        s.update(true);
        assert_eq!(s.clean_steps, 0);
    }

    #[test]
    fn the_scale_stays_a_power_of_two_within_its_range() {
        let mut s = LossScale { scale: 2.0, clean_steps: 0 };
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, MIN_SCALE);
        assert!(s.at_minimum());
        let mut s = LossScale { scale: MAX_SCALE, clean_steps: GROWTH_INTERVAL - 1 };
        s.update(false);
        assert_eq!(s.scale, MAX_SCALE);
        assert_eq!(LossScale::restore(1000.0, 7), LossScale { scale: 512.0, clean_steps: 7 });
        assert_eq!(LossScale::restore(f64::NAN, 0).scale, INITIAL_SCALE);
        assert_eq!(LossScale::restore(1e30, 99_999).scale, MAX_SCALE);
        assert_eq!(LossScale::restore(0.25, 0).scale, MIN_SCALE);
        assert_eq!(LossScale::restore(1.0, 99_999).clean_steps, GROWTH_INTERVAL);
    }
}
