//! Rotary position embeddings, rotate-half style (Llama, Baichuan2): within a head of size `dh`, dimension
//! `i < dh/2` pairs with `i + dh/2` and both turn by the angle `pos · θ^(-2i/dh)`.

use rayon::prelude::*;

/// cos and sin of every angle for positions `0..len`, `[len, dh/2]` each.
///
/// The frequencies are computed as the reference code does, in f32: `1 / θ^(2i/dh)`, then `pos · freq`
/// rounded to f32. cos and sin of that f32 angle are taken in f64 and rounded, so the table is correctly
/// rounded whatever the platform's f32 sin is.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, len: usize) -> Self {
        assert!(head_dim.is_multiple_of(2), "rope: head size {head_dim} is odd");
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in 0..len {
            for &f in &inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Positions the table covers.
    pub fn len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let span = pos * self.half..(pos + 1) * self.half;
        (&self.cos[span.clone()], &self.sin[span])
    }
}

/// Rotates, in place, the first `heads` head-sized slices of every row of `x` (rows of `row_len` values);
/// row `t` is at position `positions[t]`. With `heads = 2·H` on a packed `[T, 3D]` Q | K | V matrix this
/// turns both Q and K in one pass.
pub fn rope(x: &mut [f32], row_len: usize, heads: usize, positions: &[usize], table: &RopeTable) {
    let (half, dh) = (table.half, 2 * table.half);
    assert!(heads * dh <= row_len, "rope: {heads} heads of {dh} do not fit rows of {row_len}");
    assert_eq!(x.len(), positions.len() * row_len, "rope: one position per row");
    let rows_per_task = (1 << 14) / (heads * dh).max(1) + 1;
    x.par_chunks_mut(row_len).zip(positions).with_min_len(rows_per_task).for_each(|(row, &pos)| {
        let (cos, sin) = table.at(pos);
        for head in row[..heads * dh].chunks_exact_mut(dh) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_each_pair_by_its_angle_and_leaves_the_rest() {
        let (dh, heads, row_len, theta) = (8, 2, 2 * 8 + 5, 10000.0);
        let positions = [0usize, 1, 7, 300];
        let x: Vec<f32> = (0..positions.len() * row_len).map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0).collect();
        let table = RopeTable::new(dh, theta, 301);
        assert_eq!(table.len(), 301);
        let mut y = x.clone();
        rope(&mut y, row_len, heads, &positions, &table);
        for (t, &pos) in positions.iter().enumerate() {
            let row = &x[t * row_len..(t + 1) * row_len];
            let out = &y[t * row_len..(t + 1) * row_len];
            for h in 0..heads {
                for i in 0..dh / 2 {
                    let angle = pos as f64 * theta.powf(-2.0 * i as f64 / dh as f64);
                    let (x0, x1) = (row[h * dh + i] as f64, row[h * dh + i + dh / 2] as f64);
                    let want0 = x0 * angle.cos() - x1 * angle.sin();
                    let want1 = x1 * angle.cos() + x0 * angle.sin();
                    // The f32 angle of position 300 is off by up to half an ulp of 300 (1.5e-5 rad).
                    assert!((out[h * dh + i] as f64 - want0).abs() < 1e-4, "t {t} h {h} i {i}");
                    assert!((out[h * dh + i + dh / 2] as f64 - want1).abs() < 1e-4, "t {t} h {h} i {i}");
                }
            }
            // Columns past the rotated heads (V in the packed layout) are untouched.
            assert_eq!(&out[heads * dh..], &row[heads * dh..]);
        }
        // Position 0 is the identity.
        assert_eq!(&y[..row_len], &x[..row_len]);
    }

    #[test]
    fn frequencies_follow_the_f32_reference_formula() {
        let table = RopeTable::new(128, 10000.0, 4096);
        // Position 1 holds cos/sin of the frequencies themselves; the last pair turns slowest.
        let (cos, sin) = table.at(1);
        assert_eq!(sin[0], 1f64.sin() as f32);
        let last = 1.0f32 / 10000f32.powf(126.0 / 128.0);
        assert_eq!(sin[63], (last as f64).sin() as f32);
        assert_eq!(cos[63], (last as f64).cos() as f32);
        let (cos, _) = table.at(4095);
        assert_eq!(cos[0], (4095f64).cos() as f32);
    }
}
