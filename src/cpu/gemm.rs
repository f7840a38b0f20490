//! Dense matrix products on row-major slices, through the `gemm` crate (SIMD micro-kernels, rayon threads).
//!
//! Three shapes cover every linear layer, with weights in PyTorch's `[out, in]` layout:
//! - [`a_bt`]: `C[m,n] = A[m,k] · B[n,k]ᵀ` — forward `y = x Wᵀ`;
//! - [`a_b`]:  `C[m,n] = A[m,k] · B[k,n]`  — input gradient `dx = dy W`;
//! - [`at_b`]: `C[m,n] = A[k,m]ᵀ · B[k,n]` — weight gradient `dW = dyᵀ x`.
//!
//! With `accumulate` the product is added to `C`, otherwise `C` is overwritten.

use super::Real;
use gemm::Parallelism;

/// Below this many multiply-adds a product runs on the calling thread: spawning costs more than it saves.
const PARALLEL_THRESHOLD: usize = 1 << 18;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Strides are in elements: `(column stride, row stride)` of each operand.
#[allow(clippy::too_many_arguments)]
fn product<T: Real>(
    c: &mut [T],
    c_strides: (isize, isize),
    a: &[T],
    a_strides: (isize, isize),
    b: &[T],
    b_strides: (isize, isize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(c.len() >= m * n, "gemm: C holds {} values, needs {m}×{n}", c.len());
    assert!(a.len() >= m * k, "gemm: A holds {} values, needs {m}×{k}", a.len());
    assert!(b.len() >= k * n, "gemm: B holds {} values, needs {k}×{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    // SAFETY: the asserts above bound every index the strides can reach; C does not alias A or B
    // (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_strides.0,
            c_strides.1,
            accumulate,
            a.as_ptr(),
            a_strides.0,
            a_strides.1,
            b.as_ptr(),
            b_strides.0,
            b_strides.1,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

/// `C[m,n] (+)= A[m,k] · B[n,k]ᵀ`.
pub fn a_bt<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, accumulate: bool) {
    product(c, (1, n as isize), a, (1, k as isize), b, (k as isize, 1), (m, n, k), accumulate);
}

/// `C[m,n] (+)= A[m,k] · B[k,n]`.
pub fn a_b<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, accumulate: bool) {
    product(c, (1, n as isize), a, (1, k as isize), b, (1, n as isize), (m, n, k), accumulate);
}

/// `C[m,n] (+)= A[k,m]ᵀ · B[k,n]`.
///
/// When C is wider than tall (a weight gradient `dWᵀ`-shaped, e.g. the FFN down projection's [d, d_ff]),
/// the crate runs the same product as `Cᵀ = Bᵀ · A` written through transposed strides: measured at
/// 2,400 × 768 × 3,072 on 2 AVX2 cores, 131 GFLOP/s as posed against 170 transposed (docs/perf.md).
pub fn at_b<T: Real>(c: &mut [T], a: &[T], b: &[T], m: usize, n: usize, k: usize, accumulate: bool) {
    if m < n {
        product(c, (n as isize, 1), b, (n as isize, 1), a, (1, m as isize), (n, m, k), accumulate);
    } else {
        product(c, (1, n as isize), a, (m as isize, 1), b, (1, n as isize), (m, n, k), accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    fn filled(len: usize, seed: u64) -> Vec<f64> {
        // A small LCG keeps the test free of RNG crates and gives non-trivial, non-zero values.
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
            })
            .collect()
    }

    fn close(x: &[f64], y: &[f64]) {
        assert_eq!(x.len(), y.len());
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            assert!((p - q).abs() < 1e-10, "element {i}: {p} vs {q}");
        }
    }

    #[test]
    fn all_three_layouts_match_a_naive_product_and_accumulate() {
        let (m, n, k) = (37, 29, 61); // odd sizes exercise the micro-kernel edges
        for &(rows, cols) in &[(m, n), (70, 90)] {
            let (m, n) = (rows, cols);
            let a = filled(m * k, 1);
            let bt = filled(n * k, 2);
            let b = filled(k * n, 3);
            let at = filled(k * m, 4);
            let prior = filled(m * n, 5);

            let mut c = prior.clone();
            a_bt(&mut c, &a, &bt, m, n, k, false);
            close(&c, &naive(|i, p| a[i * k + p], |p, j| bt[j * k + p], m, n, k));

            let mut c = prior.clone();
            a_b(&mut c, &a, &b, m, n, k, true);
            let want: Vec<f64> = naive(|i, p| a[i * k + p], |p, j| b[p * n + j], m, n, k)
                .iter()
                .zip(&prior)
                .map(|(x, y)| x + y)
                .collect();
            close(&c, &want);

            // Both orientations of at_b (C taller or wider than the other), overwriting and accumulating.
            let product = naive(|i, p| at[p * m + i], |p, j| b[p * n + j], m, n, k);
            let mut c = prior.clone();
            at_b(&mut c, &at, &b, m, n, k, false);
            close(&c, &product);
            let mut c = prior.clone();
            at_b(&mut c, &at, &b, m, n, k, true);
            close(&c, &product.iter().zip(&prior).map(|(x, y)| x + y).collect::<Vec<_>>());
        }
    }

    #[test]
    fn empty_inner_dimension_clears_or_keeps() {
        let mut c = vec![1.0f32; 6];
        a_bt(&mut c, &[], &[], 2, 3, 0, true);
        assert_eq!(c, vec![1.0; 6]);
        a_bt(&mut c, &[], &[], 2, 3, 0, false);
        assert_eq!(c, vec![0.0; 6]);
    }
}
