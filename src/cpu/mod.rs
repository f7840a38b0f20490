//! The CPU reference: plain, readable operations in f32 (f64 for gradient checks), parallel with rayon.
//! Every CUDA kernel is held to these functions.

pub mod causal_attention;
pub mod gelu;
pub mod gemm;
pub mod infonce;
pub mod l2norm;
pub mod layernorm;
pub mod linear;
pub mod masked_attention;
pub mod pool;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
mod testutil;

/// The floating-point types the reference runs in: f32 for real work, f64 for finite-difference checks.
pub trait Real:
    num_traits::Float + num_traits::FromPrimitive + std::iter::Sum + std::fmt::Debug + Default + Send + Sync + 'static
{
    /// Converts an f64 constant (epsilons, scales) to this type.
    fn c(x: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(x).unwrap_or_else(Self::nan)
    }
}

impl Real for f32 {}
impl Real for f64 {}

/// `Σ a[i]·b[i]` in f32 over eight independent partial sums, which lets the compiler keep them in SIMD
/// lanes (a single running sum is a serial dependency chain it may not reorder).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
