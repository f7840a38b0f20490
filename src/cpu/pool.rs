//! Content-embedding pooling (SPEC §2.3): the mean of a sequence's hidden states, L2-normalised.

use rayon::prelude::*;

/// Floor on the norm, as `torch.nn.functional.normalize` applies it: an all-zero mean stays zero.
pub const NORM_EPS: f32 = 1e-12;

/// `out[s] = m / max(‖m‖, 1e-12)` with `m` the mean of rows `offsets[s]..offsets[s+1]` of `y` (rows of `d`);
/// `out` is `[S, d]` for the `S + 1` offsets. Sums are in f32. An empty sequence has no mean: it is the
/// caller's to reject, here it panics.
pub fn mean_pool_l2(out: &mut [f32], y: &[f32], offsets: &[usize], d: usize) {
    let seqs = offsets.len().saturating_sub(1);
    assert_eq!(out.len(), seqs * d, "pool: out must be [{seqs}, {d}]");
    assert!(y.len() >= offsets.last().copied().unwrap_or(0) * d, "pool: y has too few rows");
    out.par_chunks_mut(d).zip(offsets.par_windows(2)).for_each(|(out, w)| {
        let n = w[1] - w[0];
        assert!(n > 0, "pool: empty sequence at rows {}..{}", w[0], w[1]);
        out.fill(0.0);
        for row in y[w[0] * d..w[1] * d].chunks_exact(d) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        let inv_n = 1.0 / n as f32;
        out.iter_mut().for_each(|o| *o *= inv_n);
        let norm = super::dot(out, out).sqrt().max(NORM_EPS);
        out.iter_mut().for_each(|o| *o /= norm);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_then_unit_length_over_each_sequence_only() {
        let d = 11;
        let offsets = [0, 3, 4, 10];
        let y: Vec<f32> = (0..10 * d).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
        let mut out = vec![f32::NAN; 3 * d];
        mean_pool_l2(&mut out, &y, &offsets, d);
        for (s, w) in offsets.windows(2).enumerate() {
            let mean: Vec<f64> =
                (0..d).map(|c| (w[0]..w[1]).map(|t| y[t * d + c] as f64).sum::<f64>() / (w[1] - w[0]) as f64).collect();
            let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
            for c in 0..d {
                let (got, want) = (out[s * d + c] as f64, mean[c] / norm);
                assert!((got - want).abs() < 1e-6, "seq {s} col {c}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn a_zero_mean_stays_zero() {
        let y = [1.0, -2.0, -1.0, 2.0];
        let mut out = [f32::NAN; 2];
        mean_pool_l2(&mut out, &y, &[0, 2], 2);
        assert_eq!(out, [0.0, 0.0]);
    }
}
