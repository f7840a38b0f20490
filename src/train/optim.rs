//! Adam / AdamW as PyTorch's `torch.optim.Adam` and `torch.optim.AdamW` compute them (the single-tensor
//! path: no fused kernel, no amsgrad), and global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_`.
//!
//! SPEC §4.3: `--weight-decay W` makes Adam into AdamW, so weight decay here is always decoupled
//! (`p *= 1 − lr·wd` before the update); with wd = 0 the two are the same algorithm. Per element, in the
//! order PyTorch's CPU kernels use (scalars computed in f64, then rounded to f32 as PyTorch does when a
//! Python float meets an f32 tensor):
//!
//! ```text
//! p  = p · (1 − lr·wd)
//! m  = lerp(m, g, 1 − β1)                 fma(w, g − m, m), or fma(w − 1, g − m, g) when w ≥ 0.5
//! v  = v·β2 + ((1 − β2)·g)·g              the add fused with the last product
//! p  = p + (−lr/(1 − β1^t))·m / (√v / √(1 − β2^t) + ε)
//! ```
//!
//! PyTorch's CPU build fuses those two multiply-adds (its vectorised lerp is an explicit FMA), so the
//! moments match it bit for bit. The parameters match to an ulp or two: PyTorch's f32 `sqrt` on the CPU
//! is not correctly rounded, and this one is.

use crate::bail_input;
use anyhow::Result;
use rayon::prelude::*;

/// Elements per parallel job: large enough that scheduling is noise, small enough to balance two threads
/// on a small tensor.
const CHUNK: usize = 1 << 14;

/// The hyper-parameters that do not change during a run (the learning rate comes from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 gives plain Adam.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamConfig {
    /// Rejects values PyTorch rejects, naming the flag.
    pub fn check(&self) -> Result<()> {
        for (flag, beta) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail_input!("{flag} must be in [0, 1), got {beta}");
            }
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            bail_input!("--eps must be a non-negative number, got {}", self.eps);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail_input!("--weight-decay must be a non-negative number, got {}", self.weight_decay);
        }
        Ok(())
    }
}

/// Adam state over a fixed list of f32 parameter tensors. The fields are public so that a checkpoint can
/// save them and [`Adam::restore`] can bring them back.
#[derive(Clone, Debug)]
pub struct Adam {
    pub config: AdamConfig,
    /// Updates applied so far (PyTorch's `state["step"]`); the next update uses t = step + 1.
    pub step: u64,
    /// First moments, one vector per parameter tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one vector per parameter tensor.
    pub v: Vec<Vec<f32>>,
}

impl Adam {
    /// Fresh state (zero moments, step 0) for tensors of the given element counts.
    pub fn new(config: AdamConfig, sizes: &[usize]) -> Adam {
        let zeros = || sizes.iter().map(|&n| vec![0.0f32; n]).collect();
        Adam { config, step: 0, m: zeros(), v: zeros() }
    }

    /// Saved state, checked against the element counts of the model's tensors.
    pub fn restore(config: AdamConfig, step: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>, sizes: &[usize]) -> Result<Adam> {
        for (name, moments) in [("m", &m), ("v", &v)] {
            if moments.len() != sizes.len() {
                bail_input!(
                    "optimizer state holds {} {name} moment tensors, the model has {} parameter tensors",
                    moments.len(),
                    sizes.len()
                );
            }
            for (i, (moment, &n)) in moments.iter().zip(sizes).enumerate() {
                if moment.len() != n {
                    bail_input!(
                        "optimizer state: {name} moment of parameter tensor {i} holds {} values, expected {n}",
                        moment.len()
                    );
                }
            }
        }
        Ok(Adam { config, step, m, v })
    }

    /// One update of every parameter with learning rate `lr`. `params` and `grads` are in the order the
    /// state was made for.
    pub fn update(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f64) {
        assert_eq!(params.len(), self.m.len(), "adam: {} parameter tensors, state has {}", params.len(), self.m.len());
        assert_eq!(grads.len(), self.m.len(), "adam: {} gradient tensors, state has {}", grads.len(), self.m.len());
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        let k = Coefficients {
            decay: (1.0 - lr * c.weight_decay) as f32,
            w1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            neg_step: (-(lr / (1.0 - c.beta1.powf(t)))) as f32,
            bc2_sqrt: ((1.0 - c.beta2.powf(t)).sqrt()) as f32,
            eps: c.eps as f32,
        };
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            assert!(p.len() == m.len() && g.len() == m.len(), "adam: tensor sizes differ from the state");
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| update_chunk(p, g, m, v, &k));
        }
    }
}

/// One update's scalars, rounded to f32 as PyTorch rounds a Python float meeting an f32 tensor.
struct Coefficients {
    decay: f32,
    w1: f32,
    beta2: f32,
    w2: f32,
    neg_step: f32,
    bc2_sqrt: f32,
    eps: f32,
}

/// The update of one run of elements, with AVX2 and FMA where the CPU has them. Either way each `mul_add`
/// is one correctly rounded fused multiply-add and `sqrt` and `/` are IEEE operations, so the bits are the
/// same; the hardware instructions only let the loop vectorise where a library `fmaf` call would not.
fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coefficients) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { update_chunk_fma(p, g, m, v, k) };
    }
    update_elements(p, g, m, v, k);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn update_chunk_fma(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coefficients) {
    update_elements(p, g, m, v, k);
}

#[inline(always)]
fn update_elements(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coefficients) {
    let small_w1 = k.w1 < 0.5;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p *= k.decay; // exactly 1 without weight decay
        *m = if small_w1 { k.w1.mul_add(g - *m, *m) } else { (k.w1 - 1.0).mul_add(g - *m, g) };
        *v = (k.w2 * g).mul_add(g, *v * k.beta2);
        *p += k.neg_step * *m / (v.sqrt() / k.bc2_sqrt + k.eps);
    }
}

/// Global L2 norm of all gradients, accumulated in f64. The sum runs over fixed chunks in a fixed order,
/// so the result does not depend on the number of threads.
pub fn grad_norm(grads: &[&[f32]]) -> f64 {
    let partial: Vec<f64> = grads
        .iter()
        .flat_map(|g| g.chunks(CHUNK))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|chunk| chunk.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Scales the gradients so that their global norm is at most `max_norm`, as `clip_grad_norm_` does
/// (coefficient `max_norm / (norm + 1e-6)`, clamped to 1), and returns the norm before clipping. Given
/// the same f32 norm the scaled gradients equal PyTorch's bit for bit; PyTorch's norm itself is summed in
/// f32, so it can differ from this f64 one in the last place. A norm that is not finite leaves the
/// gradients as they are: the caller skips that step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = grad_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    // PyTorch forms the coefficient from f32 tensors, `max_norm / x` as `x.reciprocal() * max_norm`;
    // doing the same keeps the scaled gradients equal to its own.
    let coef = (1.0 / (norm as f32 + 1e-6)) * max_norm as f32;
    if norm.is_finite() && coef < 1.0 {
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK).for_each(|chunk| chunk.iter_mut().for_each(|x| *x *= coef));
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The algorithm as the Adam and AdamW papers write it, in f64, one scalar at a time.
    fn scalar_reference(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, t: u64, lr: f64, c: AdamConfig) {
        *p -= lr * c.weight_decay * *p;
        *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
        let m_hat = *m / (1.0 - c.beta1.powi(t as i32));
        let v_hat = *v / (1.0 - c.beta2.powi(t as i32));
        *p -= lr * m_hat / (v_hat.sqrt() + c.eps);
    }

    #[test]
    fn updates_follow_the_scalar_algorithm() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let sizes = [37usize, 1, CHUNK + 5]; // one tensor spans two parallel chunks
        for (config, lrs) in [
            (AdamConfig::default(), [1e-3, 5e-3, 2e-3, 1e-3, 5e-4]),
            (AdamConfig { weight_decay: 0.1, ..AdamConfig::default() }, [1e-2, 3e-2, 2e-2, 1e-2, 1e-3]),
            (AdamConfig { beta1: 0.3, beta2: 0.9, eps: 1e-6, weight_decay: 0.01 }, [1e-1; 5]),
        ] {
            let mut params: Vec<Vec<f32>> =
                sizes.iter().map(|&n| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
            let mut want: Vec<Vec<(f64, f64, f64)>> =
                params.iter().map(|p| p.iter().map(|&x| (x as f64, 0.0, 0.0)).collect()).collect();
            let mut adam = Adam::new(config, &sizes);
            for (step, &lr) in lrs.iter().enumerate() {
                let grads: Vec<Vec<f32>> =
                    sizes.iter().map(|&n| (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()).collect();
                let mut views: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
                adam.update(&mut views, &grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>(), lr);
                for ((w, g), p) in want.iter_mut().zip(&grads).zip(&params) {
                    for ((w, &g), &p) in w.iter_mut().zip(g).zip(p) {
                        scalar_reference(&mut w.0, &mut w.1, &mut w.2, g as f64, step as u64 + 1, lr, config);
                        assert!((p as f64 - w.0).abs() < 1e-5 * (1.0 + w.0.abs()), "step {step}: {p} vs {}", w.0);
                    }
                }
            }
            assert_eq!(adam.step, 5);
        }
    }

    type ChunkUpdate = fn(&mut [f32], &[f32], &mut [f32], &mut [f32], &Coefficients);

    #[test]
    fn the_vectorised_update_gives_the_portable_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 4099; // vector lanes and a remainder
        let mut random = |scale: f32| (0..n).map(|_| rng.random_range(-scale..scale)).collect::<Vec<f32>>();
        let (p0, g, m0) = (random(1.0), random(3.0), random(0.1));
        let v0: Vec<f32> = random(0.1).iter().map(|x| x * x).collect();
        // w1 below and above 0.5 take the two forms of lerp; weight decay makes the first product matter.
        for (beta1, wd) in [(0.9, 0.0), (0.3, 0.01)] {
            let k = Coefficients {
                decay: (1.0 - 1e-3 * wd) as f32,
                w1: (1.0 - beta1) as f32,
                beta2: 0.999,
                w2: 0.001,
                neg_step: -0.0123,
                bc2_sqrt: 0.0447,
                eps: 1e-8,
            };
            let run = |f: ChunkUpdate| {
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                f(&mut p, &g, &mut m, &mut v, &k);
                [p, m, v].map(|x| x.iter().map(|y| y.to_bits()).collect::<Vec<u32>>())
            };
            assert!(run(update_chunk) == run(update_elements), "beta1 {beta1}");
            // The products are fused: an unfused update differs somewhere.
            let unfused = run(|p, g, m, v, k| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *p *= k.decay;
                    *m = if k.w1 < 0.5 { k.w1 * (g - *m) + *m } else { (k.w1 - 1.0) * (g - *m) + g };
                    *v = k.w2 * g * g + *v * k.beta2;
                    *p += k.neg_step * *m / (v.sqrt() / k.bc2_sqrt + k.eps);
                }
            });
            assert!(unfused != run(update_elements), "beta1 {beta1}");
        }
    }

    #[test]
    fn grad_norm_and_clipping() {
        let a: Vec<f32> = (0..CHUNK * 2 + 3).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
        let b = vec![3.0f32, -4.0];
        let want = a.iter().chain(&b).map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((grad_norm(&[&a, &b]) - want).abs() < 1e-12 * want);

        // Under the limit nothing changes; over it the norm becomes max_norm (less the 1e-6 guard).
        let (mut a2, mut b2) = (a.clone(), b.clone());
        assert_eq!(clip_grad_norm(&mut [&mut a2, &mut b2], want * 2.0), grad_norm(&[&a, &b]));
        assert_eq!((a2.clone(), b2.clone()), (a.clone(), b.clone()));
        let norm = clip_grad_norm(&mut [&mut a2, &mut b2], 1.5);
        assert!((norm - want).abs() < 1e-12 * want);
        let coef = 1.5 / (want + 1e-6);
        assert!((grad_norm(&[&a2, &b2]) - want * coef).abs() < 1e-6);

        // A non-finite norm is reported and the gradients are left for the caller to discard.
        let mut c = vec![1.0f32, f32::INFINITY];
        assert!(clip_grad_norm(&mut [&mut c], 1.0).is_infinite());
        assert_eq!(c, vec![1.0, f32::INFINITY]);
    }

    #[test]
    fn restore_checks_shapes_and_config_checks_ranges() {
        let ok = Adam::restore(AdamConfig::default(), 7, vec![vec![0.5; 3]], vec![vec![0.25; 3]], &[3]);
        assert_eq!(ok.map(|a| a.step).ok(), Some(7));
        let err = Adam::restore(AdamConfig::default(), 7, vec![vec![0.5; 3]], vec![vec![0.25; 2]], &[3]).unwrap_err();
        assert!(crate::error::is_input_error(&err));
        assert!(err.to_string().contains("v moment of parameter tensor 0 holds 2 values, expected 3"), "{err}");
        let err = Adam::restore(AdamConfig::default(), 0, vec![], vec![], &[3]).unwrap_err();
        assert!(err.to_string().contains("0 m moment tensors"), "{err}");

        assert!(AdamConfig::default().check().is_ok());
        for bad in [
            AdamConfig { beta1: 1.0, ..AdamConfig::default() },
            AdamConfig { beta2: -0.1, ..AdamConfig::default() },
            AdamConfig { eps: f64::NAN, ..AdamConfig::default() },
            AdamConfig { weight_decay: -1.0, ..AdamConfig::default() },
        ] {
            assert!(crate::error::is_input_error(&bad.check().unwrap_err()));
        }
    }
}
