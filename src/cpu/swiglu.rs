//! The gated feed-forward activation of Llama and Baichuan2: `silu(gate) · up`.

use rayon::prelude::*;

/// `silu(g) = g · sigmoid(g)`, written so that a large negative `g` gives -0 rather than NaN.
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// `out[t, j] = silu(gate_up[t, j]) · gate_up[t, F + j]`: each row of `gate_up` holds the gate projection
/// then the up projection (one GEMM against the stacked `[2F, D]` weights), `out` has rows of `F`.
pub fn swiglu(out: &mut [f32], gate_up: &[f32], f: usize) {
    assert!(f > 0 && out.len().is_multiple_of(f), "swiglu: {} values are not rows of {f}", out.len());
    assert_eq!(gate_up.len(), 2 * out.len(), "swiglu: gate_up must hold two values per output");
    let rows_per_task = (1 << 13) / f + 1;
    out.par_chunks_mut(f).zip(gate_up.par_chunks(2 * f)).with_min_len(rows_per_task).for_each(|(out, gu)| {
        let (gate, up) = gu.split_at(f);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_in_f64() {
        let (rows, f) = (5, 19);
        let gu: Vec<f32> = (0..rows * 2 * f).map(|i| ((i * 37 % 53) as f32 - 26.0) / 4.0).collect();
        let mut out = vec![f32::NAN; rows * f];
        swiglu(&mut out, &gu, f);
        for t in 0..rows {
            for j in 0..f {
                let (g, u) = (gu[t * 2 * f + j] as f64, gu[t * 2 * f + f + j] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let got = out[t * f + j] as f64;
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "row {t} col {j}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn silu_is_finite_at_the_extremes() {
        assert_eq!(silu(-200.0), 0.0);
        assert_eq!(silu(200.0), 200.0);
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
