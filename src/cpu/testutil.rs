//! Helpers shared by the CPU unit tests: random inputs, closeness, central finite differences.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` values uniform in [-1, 1), reproducible from `seed`.
pub fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Elementwise `|got - want| <= tol * max(1, |want|)`.
pub fn assert_close<T: Into<f64> + Copy>(got: &[T], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "element {i}: got {g}, want {w}");
    }
}

/// Checks `grad` (the analytic gradient of `f` at `x`) against central differences on every element.
pub fn fd_check(x: &[f64], grad: &[f64], f: impl Fn(&[f64]) -> f64, tol: f64) {
    assert_eq!(x.len(), grad.len(), "gradient length");
    let h = 1e-5;
    let mut probe = x.to_vec();
    for i in 0..x.len() {
        probe[i] = x[i] + h;
        let up = f(&probe);
        probe[i] = x[i] - h;
        let down = f(&probe);
        probe[i] = x[i];
        let fd = (up - down) / (2.0 * h);
        assert!((fd - grad[i]).abs() <= tol * grad[i].abs().max(1.0), "element {i}: analytic {}, fd {fd}", grad[i]);
    }
}
