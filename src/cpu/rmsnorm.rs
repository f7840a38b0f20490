//! RMSNorm as Llama and Baichuan2 apply it: `y = w · x / sqrt(mean(x²) + eps)` per row, statistics in f32.

use super::dot;
use rayon::prelude::*;

/// Rows per rayon task: enough work per task that scheduling stays negligible for narrow rows.
fn rows_per_task(width: usize) -> usize {
    (1 << 14) / width.max(1) + 1
}

/// `out[t] = (x[t] · rsqrt(mean(x[t]²) + eps)) · w` for every row `t` of `x` (rows of `w.len()` values).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rmsnorm: {} values are not rows of {d}", x.len());
    assert_eq!(out.len(), x.len(), "rmsnorm: output and input lengths differ");
    out.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(rows_per_task(d)).for_each(|(out, x)| {
        let inv_rms = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            *o = w * (x * inv_rms);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_f64_evaluation() {
        // 37 columns: not a multiple of the 8 lanes of `dot`, so its tail is covered.
        let (rows, d, eps) = (9, 37, 1e-6);
        let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 13.0).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect();
        let mut out = vec![f32::NAN; rows * d];
        rmsnorm(&mut out, &x, &w, eps);
        for t in 0..rows {
            let row = &x[t * d..(t + 1) * d];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            for i in 0..d {
                let want = w[i] as f64 * row[i] as f64 / (ms + eps as f64).sqrt();
                let got = out[t * d + i] as f64;
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "row {t} col {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn eps_keeps_a_zero_row_finite_and_a_small_row_is_damped() {
        let w = [2.0f32; 4];
        let mut out = [f32::NAN; 8];
        rmsnorm(&mut out, &[0.0, 0.0, 0.0, 0.0, 1e-3, -1e-3, 1e-3, -1e-3], &w, 1e-6);
        assert_eq!(&out[..4], &[0.0; 4]);
        // mean(x²) = 1e-6 equals eps, so each value is scaled by 1/sqrt(2e-6) rather than 1/sqrt(1e-6).
        let want = 2.0 * 1e-3 / (2e-6f64).sqrt();
        assert!((out[4] as f64 - want).abs() < 1e-5 && (out[5] as f64 + want).abs() < 1e-5, "{out:?}");
    }
}
