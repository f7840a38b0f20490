//! LayerNorm over the last dimension, as `torch.nn.LayerNorm`: biased variance, `eps` inside the root.

use super::Real;
use rayon::prelude::*;

/// Rows per parallel task; fixed so that the parameter-gradient sums are grouped the same way whatever the
/// thread count.
const TASK_ROWS: usize = 32;

/// `y = (x - mean) / sqrt(var + eps) * w + b` per row of `x[rows, dim]`. Keeps the normalised input
/// `xhat[rows, dim]` and `rstd[rows] = 1 / sqrt(var + eps)` for [`backward`].
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    y: &mut [T],
    xhat: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    b: &[T],
    rows: usize,
    dim: usize,
    eps: f64,
) {
    assert!(w.len() == dim && b.len() == dim, "layernorm: parameter length");
    let (eps, n) = (T::c(eps), T::c(dim as f64));
    y[..rows * dim]
        .par_chunks_mut(dim)
        .zip(xhat[..rows * dim].par_chunks_mut(dim))
        .zip(rstd[..rows].par_iter_mut())
        .zip(x[..rows * dim].par_chunks(dim))
        .with_min_len(TASK_ROWS)
        .for_each(|(((y, xhat), rstd), x)| {
            let mean = x.iter().copied().sum::<T>() / n;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
            let r = T::one() / (var + eps).sqrt();
            *rstd = r;
            for (((y, h), &v), (&w, &b)) in y.iter_mut().zip(xhat.iter_mut()).zip(x).zip(w.iter().zip(b)) {
                *h = (v - mean) * r;
                *y = *h * w + b;
            }
        });
}

/// Gradients of [`forward`] given `dy[rows, dim]`: `dx` is overwritten, `dw += Σ dy·xhat`, `db += Σ dy`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    dy: &[T],
    xhat: &[T],
    rstd: &[T],
    w: &[T],
    rows: usize,
    dim: usize,
) {
    assert!(w.len() == dim && dw.len() == dim && db.len() == dim, "layernorm: parameter length");
    let n = T::c(dim as f64);
    let task = TASK_ROWS * dim;
    let partial: Vec<(Vec<T>, Vec<T>)> = dx[..rows * dim]
        .par_chunks_mut(task)
        .zip(dy[..rows * dim].par_chunks(task))
        .zip(xhat[..rows * dim].par_chunks(task))
        .zip(rstd[..rows].par_chunks(TASK_ROWS))
        .map(|(((dx, dy), xhat), rstd)| {
            let (mut dw, mut db) = (vec![T::zero(); dim], vec![T::zero(); dim]);
            for (((dx, dy), xhat), &r) in dx.chunks_mut(dim).zip(dy.chunks(dim)).zip(xhat.chunks(dim)).zip(rstd) {
                // With g = dy·w: dx = r · (g - mean(g) - xhat · mean(g·xhat)).
                let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
                for i in 0..dim {
                    let g = dy[i] * w[i];
                    sum_g = sum_g + g;
                    sum_gx = sum_gx + g * xhat[i];
                    dw[i] = dw[i] + dy[i] * xhat[i];
                    db[i] = db[i] + dy[i];
                }
                let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                for i in 0..dim {
                    dx[i] = r * (dy[i] * w[i] - mean_g - xhat[i] * mean_gx);
                }
            }
            (dw, db)
        })
        .collect();
    for (pw, pb) in partial {
        for i in 0..dim {
            dw[i] = dw[i] + pw[i];
            db[i] = db[i] + pb[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_check, random};

    #[test]
    fn forward_matches_a_hand_written_reference() {
        let (rows, dim, eps) = (45, 19, 1e-5);
        let x: Vec<f64> = random(rows * dim, 1).iter().map(|v| 3.0 * v + 0.7).collect();
        let (w, b) = (random(dim, 2), random(dim, 3));
        let (mut y, mut xhat, mut rstd) =
            (vec![f64::NAN; rows * dim], vec![f64::NAN; rows * dim], vec![f64::NAN; rows]);
        forward(&mut y, &mut xhat, &mut rstd, &x, &w, &b, rows, dim, eps);
        let mut want = vec![0.0; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let mean = row.iter().sum::<f64>() / dim as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                want[r * dim + i] = (row[i] - mean) / (var + eps).sqrt() * w[i] + b[i];
            }
            assert!((rstd[r] - 1.0 / (var + eps).sqrt()).abs() < 1e-12);
        }
        assert_close(&y, &want, 1e-12);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim, eps) = (70, 13, 1e-12);
        let x: Vec<f64> = random(rows * dim, 4).iter().map(|v| 2.0 * v - 0.3).collect();
        let (w, b, dy) = (random(dim, 5), random(dim, 6), random(rows * dim, 7));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (mut y, mut xhat, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows * dim], vec![0.0; rows]);
            forward(&mut y, &mut xhat, &mut rstd, x, w, b, rows, dim, eps);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut y, mut xhat, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows * dim], vec![0.0; rows]);
        forward(&mut y, &mut xhat, &mut rstd, &x, &w, &b, rows, dim, eps);
        let mut dx = vec![f64::NAN; rows * dim];
        let (prior_w, prior_b) = (random(dim, 8), random(dim, 9));
        let (mut dw, mut db) = (prior_w.clone(), prior_b.clone());
        backward(&mut dx, &mut dw, &mut db, &dy, &xhat, &rstd, &w, rows, dim);
        let minus = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p - q).collect::<Vec<_>>();
        fd_check(&x, &dx, |x| loss(x, &w, &b), 1e-7);
        fd_check(&w, &minus(&dw, &prior_w), |w| loss(&x, w, &b), 1e-7);
        fd_check(&b, &minus(&db, &prior_b), |b| loss(&x, &w, b), 1e-7);
    }
}
