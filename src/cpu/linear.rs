//! Linear layers `y = x Wᵀ + b` over all rows of a batch at once, weights in PyTorch's `[out, in]` layout.

use super::{Real, gemm};
use rayon::prelude::*;

/// Rows per task in the bias-gradient reduction: large enough to amortise a task, fixed so that the sum is
/// grouped the same way whatever the thread count (results are reproducible bit for bit).
const SUM_ROWS: usize = 64;

/// `y[rows, d_out] = x[rows, d_in] · w[d_out, d_in]ᵀ + b[d_out]`.
pub fn forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: &[T], rows: usize, d_in: usize, d_out: usize) {
    assert_eq!(b.len(), d_out, "linear: bias length");
    y[..rows * d_out].par_chunks_mut(d_out * SUM_ROWS).for_each(|chunk| {
        for row in chunk.chunks_mut(d_out) {
            row.copy_from_slice(b);
        }
    });
    gemm::a_bt(y, x, w, rows, d_out, d_in, true);
}

/// Column sums of `x[rows, cols]` added to `acc[cols]`.
pub fn add_column_sums<T: Real>(acc: &mut [T], x: &[T], rows: usize, cols: usize) {
    assert_eq!(acc.len(), cols, "column sums: accumulator length");
    let partial: Vec<Vec<T>> = x[..rows * cols]
        .par_chunks(cols * SUM_ROWS)
        .map(|chunk| {
            let mut sum = vec![T::zero(); cols];
            for row in chunk.chunks(cols) {
                for (s, &v) in sum.iter_mut().zip(row) {
                    *s = *s + v;
                }
            }
            sum
        })
        .collect();
    for sum in partial {
        for (a, s) in acc.iter_mut().zip(sum) {
            *a = *a + s;
        }
    }
}

/// Gradients of [`forward`] given `dy[rows, d_out]`: `dw += dyᵀ x`, `db += Σ_rows dy`, and, when `dx` is
/// given, `dx = dy · w` (or `dx += dy · w` with `accumulate_dx`).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dx: Option<(&mut [T], bool)>,
    dw: &mut [T],
    db: &mut [T],
    dy: &[T],
    x: &[T],
    w: &[T],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    gemm::at_b(dw, dy, x, d_out, d_in, rows, true);
    add_column_sums(db, dy, rows, d_out);
    if let Some((dx, accumulate)) = dx {
        gemm::a_b(dx, dy, w, rows, d_in, d_out, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_check, random};

    #[test]
    fn forward_matches_naive_loops() {
        let (rows, d_in, d_out) = (131, 37, 23);
        let (x, w, b) = (random(rows * d_in, 1), random(d_out * d_in, 2), random(d_out, 3));
        let mut y = vec![f64::NAN; rows * d_out];
        forward(&mut y, &x, &w, &b, rows, d_in, d_out);
        let mut want = vec![0.0; rows * d_out];
        for r in 0..rows {
            for o in 0..d_out {
                want[r * d_out + o] = b[o] + (0..d_in).map(|i| x[r * d_in + i] * w[o * d_in + i]).sum::<f64>();
            }
        }
        assert_close(&y, &want, 1e-12);
    }

    #[test]
    fn backward_matches_finite_differences_and_accumulates() {
        let (rows, d_in, d_out) = (70, 9, 5);
        let (x, w, b) = (random(rows * d_in, 4), random(d_out * d_in, 5), random(d_out, 6));
        let dy = random(rows * d_out, 7);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; rows * d_out];
            forward(&mut y, x, w, b, rows, d_in, d_out);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        let prior_w = random(d_out * d_in, 8);
        let prior_b = random(d_out, 9);
        let prior_x = random(rows * d_in, 10);
        let (mut dw, mut db, mut dx) = (prior_w.clone(), prior_b.clone(), prior_x.clone());
        backward(Some((&mut dx, true)), &mut dw, &mut db, &dy, &x, &w, rows, d_in, d_out);
        let minus = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p - q).collect::<Vec<_>>();
        fd_check(&x, &minus(&dx, &prior_x), |x| loss(x, &w, &b), 1e-8);
        fd_check(&w, &minus(&dw, &prior_w), |w| loss(&x, w, &b), 1e-8);
        fd_check(&b, &minus(&db, &prior_b), |b| loss(&x, &w, b), 1e-8);

        let mut dx2 = vec![f64::NAN; rows * d_in];
        backward(Some((&mut dx2, false)), &mut dw, &mut db, &dy, &x, &w, rows, d_in, d_out);
        assert_close(&dx2, &minus(&dx, &prior_x), 1e-12);
    }
}
