//! Row-wise L2 normalisation as `torch.nn.functional.normalize`: `y = x / max(‖x‖, eps)`.

use super::Real;
use rayon::prelude::*;

/// Rows per parallel task.
const TASK_ROWS: usize = 64;

/// `y = x / max(‖x‖, eps)` per row of `x[rows, dim]`; keeps `norms[rows] = ‖x‖` for [`backward`].
pub fn forward<T: Real>(y: &mut [T], norms: &mut [T], x: &[T], rows: usize, dim: usize, eps: f64) {
    let eps = T::c(eps);
    y[..rows * dim]
        .par_chunks_mut(dim)
        .zip(norms[..rows].par_iter_mut())
        .zip(x[..rows * dim].par_chunks(dim))
        .with_min_len(TASK_ROWS)
        .for_each(|((y, norm), x)| {
            *norm = x.iter().map(|&v| v * v).sum::<T>().sqrt();
            let inv = T::one() / norm.max(eps);
            for (y, &v) in y.iter_mut().zip(x) {
                *y = v * inv;
            }
        });
}

/// `dx` (overwritten) from `dy[rows, dim]`, the outputs `y` and the norms of [`forward`]. Where the norm
/// reaches `eps`, `dx = (dy - y·(y·dy)) / ‖x‖`; below it the divisor is the constant `eps`, so `dx = dy / eps`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(dx: &mut [T], dy: &[T], y: &[T], norms: &[T], rows: usize, dim: usize, eps: f64) {
    let eps = T::c(eps);
    dx[..rows * dim]
        .par_chunks_mut(dim)
        .zip(dy[..rows * dim].par_chunks(dim))
        .zip(y[..rows * dim].par_chunks(dim))
        .zip(norms[..rows].par_iter())
        .with_min_len(TASK_ROWS)
        .for_each(|(((dx, dy), y), &norm)| {
            if norm >= eps {
                let dot = dy.iter().zip(y).map(|(&a, &b)| a * b).sum::<T>();
                let inv = T::one() / norm;
                for ((dx, &g), &v) in dx.iter_mut().zip(dy).zip(y) {
                    *dx = (g - v * dot) * inv;
                }
            } else {
                for (dx, &g) in dx.iter_mut().zip(dy) {
                    *dx = g / eps;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_check, random};

    #[test]
    fn forward_gives_unit_rows_and_clamps_tiny_ones() {
        let (rows, dim, eps) = (67, 11, 1e-12);
        let mut x: Vec<f64> = random(rows * dim, 1).iter().map(|v| 5.0 * v).collect();
        x[dim..2 * dim].iter_mut().for_each(|v| *v *= 1e-14); // row 1: norm below eps
        let (mut y, mut norms) = (vec![f64::NAN; rows * dim], vec![f64::NAN; rows]);
        forward(&mut y, &mut norms, &x, rows, dim, eps);
        let mut want = vec![0.0; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((norms[r] - n).abs() <= 1e-14 * n);
            for i in 0..dim {
                want[r * dim + i] = row[i] / n.max(eps);
            }
        }
        assert_close(&y, &want, 1e-14);
        assert!(y[dim..2 * dim].iter().map(|v| v * v).sum::<f64>() < 0.5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim) = (70, 7);
        let x: Vec<f64> = random(rows * dim, 2).iter().map(|v| 2.0 * v).collect();
        let dy = random(rows * dim, 3);
        let loss = |x: &[f64], eps: f64| {
            let (mut y, mut norms) = (vec![0.0; rows * dim], vec![0.0; rows]);
            forward(&mut y, &mut norms, x, rows, dim, eps);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        // A large eps clamps some rows, exercising both branches.
        for eps in [1e-12, 2.5] {
            let (mut y, mut norms) = (vec![0.0; rows * dim], vec![0.0; rows]);
            forward(&mut y, &mut norms, &x, rows, dim, eps);
            if eps > 1.0 {
                assert!(norms.iter().any(|&n| n < eps) && norms.iter().any(|&n| n > eps));
            }
            let mut dx = vec![f64::NAN; rows * dim];
            backward(&mut dx, &dy, &y, &norms, rows, dim, eps);
            fd_check(&x, &dx, |x| loss(x, eps), 1e-7);
        }
    }
}
