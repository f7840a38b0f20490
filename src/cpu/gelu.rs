//! GELU in its exact form, `gelu(x) = x·Φ(x) = x/2 · (1 + erf(x/√2))`, as BERT's `hidden_act = "gelu"`.
//!
//! The standard library has no `erf`, so this file carries two: a fast one for f32 (a Taylor polynomial
//! below 1, `1 - exp(-x²)·R(1/x)` above, R fitted by `tools/fit_erfc.py`; within two f32 epsilons) and a
//! slow one for f64 gradient checks (a series of positive terms, no cancellation; within a few ulps).
//! The f32 one is written over blocks of lanes without branches so that it vectorises, and is compiled a
//! second time for AVX2 and FMA, chosen at run time: GELU is the one elementwise op of the model that costs
//! as much as a few percent of a training step.

use super::Real;
use rayon::prelude::*;
use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// 1/√(2π), the peak of the standard normal density.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Elements per parallel task.
const TASK: usize = 4096;

/// `2/√π · (-1)ⁿ / (n!·(2n+1))`: the Taylor series of erf about 0, in powers of x².
const TAYLOR: [f32; 11] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -0.376_126_38,
    0.112_837_92,
    -0.026_866_171,
    0.005_223_977_6,
    -8.548_327e-4,
    1.205_533_3e-4,
    -1.492_565e-5,
    1.646_211_4e-6,
    -1.636_584_5e-7,
    1.480_719_3e-8,
];

/// `erfc(x)·exp(x²)` on [1, 4] as a polynomial in `1/x`, lowest degree first (from `tools/fit_erfc.py`).
const ERFC_SCALED: [f32; 10] = [
    1.146_692_9e-4,
    0.561_885_7,
    0.019_603_915,
    -0.371_693_6,
    0.218_765_48,
    0.259_326_6,
    -0.561_503_9,
    0.456_214,
    -0.187_195_15,
    0.032_065_836,
];

/// The f32 path works on blocks of this many values: each step of a polynomial is one operation across the
/// block, so the dependent chains of several SIMD registers overlap instead of waiting on one another.
const LANES: usize = 16;
type Lanes = [f32; LANES];

#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    // A plain loop rather than `std::array::from_fn`, which is not always inlined.
    let mut out = [0.0; LANES];
    for (l, v) in out.iter_mut().enumerate() {
        *v = f(l);
    }
    out
}

/// A polynomial (coefficients lowest degree first) at every lane, by Horner's rule; with `FMA` each step is
/// one fused multiply-add (only where the CPU has them: elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn horner<const FMA: bool>(coefficients: &[f32], x: &Lanes) -> Lanes {
    let mut acc = [0.0f32; LANES];
    for &c in coefficients.iter().rev() {
        for l in 0..LANES {
            acc[l] = if FMA { acc[l].mul_add(x[l], c) } else { acc[l] * x[l] + c };
        }
    }
    acc
}

/// `exp(y)` for `y <= 0`, without branches or integer conversions so that it vectorises: `y = k·ln2 + r` with
/// `|r| <= ln2/2`, `exp(r)` from its Taylor polynomial (degree 7, relative error below 1e-8), `2^k` built in
/// the exponent bits. Arguments below -87 are raised to -87, where the result is already negligible (about
/// 1.6e-38), and so is NaN: callers keep NaN through their other terms.
#[inline(always)]
fn exp_neg<const FMA: bool>(y: &Lanes) -> Lanes {
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in the default rounding mode.
    const ROUND: f32 = 12_582_912.0;
    // Adding 2^23 + 127 leaves k + 127 in the low mantissa bits; shifted into the exponent field it is 2^k.
    const EXPONENT: f32 = 8_388_735.0;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that k·LN2_HI is exact for |k| < 2^11
    const LN2_LO: f32 = 1.428_606_8e-6;
    const TAYLOR_EXP: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    let y = lanes(|l| y[l].max(-87.0));
    let k = lanes(|l| (y[l] * std::f32::consts::LOG2_E + ROUND) - ROUND);
    let r = lanes(|l| (y[l] - k[l] * LN2_HI) - k[l] * LN2_LO);
    let p = horner::<FMA>(&TAYLOR_EXP, &r);
    lanes(|l| p[l] * f32::from_bits((k[l] + EXPONENT).to_bits() << 23))
}

/// erf at every lane. Both branches are computed and one is selected per lane.
#[inline(always)]
fn erf_lanes<const FMA: bool>(x: &Lanes) -> Lanes {
    let a = lanes(|l| x[l].abs());
    let small = horner::<FMA>(&TAYLOR, &lanes(|l| x[l] * x[l]));
    // Beyond 4, erfc is below half an ulp of 1 and the large branch rounds to exactly ±1.
    // max and min rather than clamp: they compile to the packed instructions whatever the NaN handling.
    #[allow(clippy::manual_clamp)]
    let c = lanes(|l| a[l].max(1.0).min(4.0));
    let e = exp_neg::<FMA>(&lanes(|l| -c[l] * c[l]));
    let r = horner::<FMA>(&ERFC_SCALED, &lanes(|l| 1.0 / c[l]));
    // A NaN takes the small branch, which keeps it.
    lanes(|l| if a[l] >= 1.0 { (1.0 - e[l] * r[l]).copysign(x[l]) } else { x[l] * small[l] })
}

#[inline(always)]
fn gelu_lanes<const FMA: bool>(x: &Lanes) -> Lanes {
    let e = erf_lanes::<FMA>(&lanes(|l| x[l] * FRAC_1_SQRT_2 as f32));
    lanes(|l| 0.5 * x[l] * (1.0 + e[l]))
}

#[inline(always)]
fn slope_lanes<const FMA: bool>(x: &Lanes) -> Lanes {
    let e = erf_lanes::<FMA>(&lanes(|l| x[l] * FRAC_1_SQRT_2 as f32));
    let g = exp_neg::<FMA>(&lanes(|l| -0.5 * x[l] * x[l]));
    lanes(|l| 0.5 * (1.0 + e[l]) + x[l] * g[l] * INV_SQRT_2PI as f32)
}

fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    if a >= 6.0 {
        // erfc(6) ≈ 2e-17, below half an ulp of 1.
        return 1.0f64.copysign(x);
    }
    // erf(a) = 2/√π · exp(-a²) · Σₙ a·(2a²)ⁿ / (1·3·…·(2n+1)); every term is positive.
    let (mut term, mut sum, mut n) = (a, a, 0.0);
    while term > sum * 1e-18 {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    (2.0 / PI.sqrt() * (-a * a).exp() * sum).copysign(x)
}

fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_f64(x * FRAC_1_SQRT_2))
}

fn slope_f64(x: f64) -> f64 {
    0.5 * (1.0 + erf_f64(x * FRAC_1_SQRT_2)) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

/// True when `T` is f64-like; resolved at compile time.
#[inline(always)]
fn is_double<T: Real>() -> bool {
    T::epsilon() < T::c(1e-10)
}

/// The error function, to a few ulps of `T`.
pub fn erf<T: Real>(x: T) -> T {
    if is_double::<T>() {
        T::c(erf_f64(x.to_f64().unwrap_or(f64::NAN)))
    } else {
        T::c(erf_lanes::<false>(&[x.to_f32().unwrap_or(f32::NAN); LANES])[0] as f64)
    }
}

/// The elementwise functions of this file.
#[derive(Clone, Copy)]
enum Op {
    Gelu,
    Slope,
}

/// `out[i] = combine(out[i], op(x[i]))` for f32 values, a block of lanes at a time.
#[inline(always)]
fn f32_blocks<T: Real, const FMA: bool>(out: &mut [T], x: &[T], op: Op, combine: &impl Fn(T, T) -> T) {
    for (out, x) in out.chunks_mut(LANES).zip(x.chunks(LANES)) {
        let mut v = [0.0f32; LANES];
        v.iter_mut().zip(x).for_each(|(v, &x)| *v = x.to_f32().unwrap_or(f32::NAN));
        let r = match op {
            Op::Gelu => gelu_lanes::<FMA>(&v),
            Op::Slope => slope_lanes::<FMA>(&v),
        };
        out.iter_mut().zip(r).for_each(|(o, r)| *o = combine(*o, T::c(r as f64)));
    }
}

/// [`f32_blocks`] compiled for AVX2 and FMA: eight lanes per instruction and fused Horner steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn f32_blocks_avx2<T: Real>(out: &mut [T], x: &[T], op: Op, combine: &impl Fn(T, T) -> T) {
    f32_blocks::<T, true>(out, x, op, combine);
}

/// `out[i] = combine(out[i], op(x[i]))`, in parallel; in f64 element by element, in f32 by blocks, with AVX2
/// and FMA where the CPU has them.
fn apply<T: Real>(out: &mut [T], x: &[T], op: Op, combine: impl Fn(T, T) -> T + Sync) {
    out[..x.len()].par_chunks_mut(TASK).zip(x.par_chunks(TASK)).for_each(|(out, x)| {
        if is_double::<T>() {
            let f = match op {
                Op::Gelu => gelu_f64,
                Op::Slope => slope_f64,
            };
            for (o, &v) in out.iter_mut().zip(x) {
                *o = combine(*o, T::c(f(v.to_f64().unwrap_or(f64::NAN))));
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { f32_blocks_avx2(out, x, op, &combine) };
        }
        f32_blocks::<T, false>(out, x, op, &combine);
    });
}

/// `y = gelu(x)` elementwise.
pub fn forward<T: Real>(y: &mut [T], x: &[T]) {
    apply(y, x, Op::Gelu, |_, g| g);
}

/// `d = d · gelu'(x)` in place, with `gelu'(x) = Φ(x) + x·φ(x)`: `d` holds the gradient with respect to the
/// output on entry and with respect to the input on return.
pub fn backward_in_place<T: Real>(d: &mut [T], x: &[T]) {
    apply(d, x, Op::Slope, |d, s| d * s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, fd_check, random};

    #[test]
    fn erf_matches_high_precision_values() {
        // From mpmath at 30 digits.
        let known: [(f64, f64); 7] = [
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (1.3, 0.9340079449406524),
            (2.0, 0.9953222650189527),
            (3.5, 0.9999992569016276),
            (5.0, 0.9999999999984626),
        ];
        for (x, want) in known {
            for sign in [1.0, -1.0] {
                let got = erf(sign * x);
                assert!((got - sign * want).abs() < 1e-15, "erf({}) = {got}", sign * x);
                let got = erf((sign * x) as f32) as f64;
                assert!((got - sign * want).abs() < 8e-8, "f32 erf({}) = {got}", sign * x);
            }
        }
        assert_eq!(erf(0.0f32), 0.0);
        assert_eq!(erf(7.0f64), 1.0);
        assert_eq!(erf(-9.0f32), -1.0);
        assert!(erf(f32::NAN).is_nan() && erf(f64::NAN).is_nan());
    }

    #[test]
    fn f32_erf_stays_within_two_epsilons_of_the_f64_series_everywhere() {
        // Error in units of f32's epsilon times the value (at least 0.5: absolute below that).
        let mut worst = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let exact = erf(x as f64);
            let err = (erf(x) as f64 - exact).abs() / (f32::EPSILON as f64 * exact.abs().max(0.5));
            worst = worst.max(err);
        }
        assert!(worst < 2.0, "worst error {worst} epsilons");
    }

    #[test]
    fn f64_erf_derivative_is_the_gaussian() {
        // A smooth, accurate erf is what the f64 finite-difference checks of GELU rely on.
        for i in 0..=120 {
            let x = -6.0 + 0.1 * i as f64;
            let h = 1e-5;
            let fd = (erf(x + h) - erf(x - h)) / (2.0 * h);
            let exact = 2.0 / PI.sqrt() * (-x * x).exp();
            assert!((fd - exact).abs() < 1e-9, "x {x}: fd {fd} vs {exact}");
        }
    }

    #[test]
    fn forward_is_x_times_the_normal_cdf() {
        let x: Vec<f64> = random(5000, 1).iter().map(|v| 8.0 * v).collect();
        let mut y = vec![f64::NAN; x.len()];
        forward(&mut y, &x);
        let want: Vec<f64> = x.iter().map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))).collect();
        assert_close(&y, &want, 1e-13);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut y32 = vec![f32::NAN; x.len()];
        forward(&mut y32, &x32);
        assert_close(&y32, &want, 1e-6);
        // Hand-computed points: gelu(1) = Φ(1) = 0.8413447460685429, gelu(-2) = -2·Φ(-2).
        let mut y = [0.0f64; 2];
        forward(&mut y, &[1.0, -2.0]);
        assert!((y[0] - 0.8413447460685429).abs() < 1e-15 && (y[1] + 2.0 * 0.022750131948179195).abs() < 1e-15);
    }

    #[test]
    fn f32_backward_agrees_with_f64() {
        let x: Vec<f64> = random(20_000, 4).iter().map(|v| 14.0 * v).chain([0.0, 1e-3, -87.5, 30.0]).collect();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let (mut d64, mut d32) = (vec![1.0; x.len()], vec![1.0f32; x.len()]);
        backward_in_place(&mut d64, &x32.iter().map(|&v| v as f64).collect::<Vec<_>>());
        backward_in_place(&mut d32, &x32);
        assert_close(&d32, &d64, 3e-7);
        let mut nan = [1.0f32, 1.0];
        backward_in_place(&mut nan, &[f32::NAN, 2.0]);
        assert!(nan[0].is_nan() && nan[1].is_finite());
        let mut y = [0.0f32; 1];
        forward(&mut y, &[f32::NAN]);
        assert!(y[0].is_nan());
    }

    #[test]
    fn portable_and_fused_f32_paths_agree() {
        // The dispatching functions take the AVX2/FMA path where the CPU has it; the portable path must give
        // the same values to rounding.
        let x: Vec<f32> = random(4099, 5).iter().map(|&v| 10.0 * v as f32).collect();
        for op in [Op::Gelu, Op::Slope] {
            let (mut portable, mut dispatched) = (vec![1.0f32; x.len()], vec![1.0f32; x.len()]);
            f32_blocks::<f32, false>(&mut portable, &x, op, &|_, v| v);
            apply(&mut dispatched, &x, op, |_, v| v);
            let want: Vec<f64> = portable.iter().map(|&v| v as f64).collect();
            assert_close(&dispatched, &want, 5e-7);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x: Vec<f64> = random(300, 2).iter().map(|v| 6.0 * v).collect();
        let dy = random(300, 3);
        let mut d = dy.clone();
        backward_in_place(&mut d, &x);
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            forward(&mut y, x);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        fd_check(&x, &d, loss, 1e-8);
    }
}
