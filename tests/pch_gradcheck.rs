//! The PCH backward pass against central finite differences in f64: every parameter tensor (sampled
//! entries), on a padded batch of unequal lengths, for each input kind, position kind, mask and dropout.

use learn_kern::pch::{
    InputKind, MaskKind, PchBatchShape, PchConfig, PchInput, PchParams, Positions, backward, backward_to_content,
    forward,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 3;
const L: usize = 5;
const LENGTHS: [usize; B] = [5, 2, 3];
const DROPOUT_SEED: u64 = 99;

fn config(input: InputKind, positions: Positions, dropout: f64) -> PchConfig {
    PchConfig {
        d_content: 6,
        d_model: 8,
        n_layers: 2,
        n_heads: 2,
        d_ff: 12,
        d_out: 5,
        ln_eps: 1e-12,
        positions,
        max_len: Some(7),
        input,
        n_items: Some(9),
        dropout,
        ..PchConfig::tiny()
    }
}

fn uniform(n: usize, rng: &mut ChaCha8Rng, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Parameters far from the tiny BERT initialisation, so that every nonlinearity is exercised.
fn random_params(cfg: &PchConfig, seed: u64) -> PchParams<f64> {
    let mut p = PchParams::<f64>::zeros(cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, shape, values) in p.tensors_mut() {
        let fan_in = if shape.len() == 2 && !name.contains("emb") { shape[1] } else { 1 };
        let scale = 1.5 / (fan_in as f64).sqrt();
        for v in values.iter_mut() {
            *v = rng.random_range(-scale..scale) + if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
        }
    }
    p
}

struct Case {
    cfg: PchConfig,
    mask: MaskKind,
    params: PchParams<f64>,
    content: Vec<f64>,
    ids: Vec<u32>,
    /// Loss weights `[B, L, d_out]`; padded positions hold junk that backward must ignore.
    weights: Vec<f64>,
}

impl Case {
    fn new(cfg: PchConfig, mask: MaskKind, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = random_params(&cfg, seed + 1);
        let content = uniform(B * L * cfg.d_content, &mut rng, 1.0);
        let ids = (0..B * L).map(|_| rng.random_range(0..cfg.n_items.unwrap() as u32)).collect();
        let weights = uniform(B * L * cfg.d_out, &mut rng, 1.0);
        Self { cfg, mask, params, content, ids, weights }
    }

    fn input(&self) -> PchInput<'_, f64> {
        match self.cfg.input {
            InputKind::Content => PchInput::Content(&self.content),
            InputKind::Id => PchInput::Ids(&self.ids),
        }
    }

    fn shape() -> PchBatchShape {
        PchBatchShape { batch: B, len: L, lengths: LENGTHS.to_vec() }
    }

    /// `Σ w · out` over valid positions; dropout masks are redrawn from the same seed on every call.
    fn loss(&self, params: &PchParams<f64>, content: &[f64]) -> f64 {
        let mut rng = ChaCha8Rng::seed_from_u64(DROPOUT_SEED);
        let input = match self.cfg.input {
            InputKind::Content => PchInput::Content(content),
            InputKind::Id => PchInput::Ids(&self.ids),
        };
        let (out, _) = forward(params, input, &Self::shape(), self.mask, Some(&mut rng)).unwrap();
        let o = self.cfg.d_out;
        let mut sum = 0.0;
        for (b, &n) in LENGTHS.iter().enumerate() {
            for i in 0..n {
                let at = (b * L + i) * o;
                sum += (0..o).map(|k| out[at + k] * self.weights[at + k]).sum::<f64>();
            }
        }
        sum
    }

    fn analytic(&self) -> PchParams<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(DROPOUT_SEED);
        let (_, cache) = forward(&self.params, self.input(), &Self::shape(), self.mask, Some(&mut rng)).unwrap();
        let mut grads = self.params.zeros_like();
        backward(&self.params, &cache, &self.weights, &mut grads);
        grads
    }
}

fn close(fd: f64, analytic: f64) -> bool {
    (fd - analytic).abs() <= 1e-7 + 1e-6 * analytic.abs()
}

/// Checks sampled entries of every tensor, and that every tensor gets a nonzero gradient.
fn check(case: &Case, label: &str) {
    let grads = case.analytic();
    let h = 1e-5;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut checked = 0;
    for ((name, _, g), (_, _, p)) in grads.tensors().zip(case.params.tensors()) {
        assert!(g.iter().any(|v| v.abs() > 1e-6), "{label}: {name} has an all-zero gradient");
        // The largest entry, plus random ones.
        let top = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let picks: Vec<usize> = std::iter::once(top).chain((0..5).map(|_| rng.random_range(0..g.len()))).collect();
        for i in picks {
            let mut probe = case.params.clone();
            let base = p[i];
            probe.tensor_mut(name).unwrap()[i] = base + h;
            let up = case.loss(&probe, &case.content);
            probe.tensor_mut(name).unwrap()[i] = base - h;
            let down = case.loss(&probe, &case.content);
            let fd = (up - down) / (2.0 * h);
            assert!(close(fd, g[i]), "{label}: {name}[{i}]: analytic {} vs finite difference {fd}", g[i]);
            checked += 1;
        }
    }
    assert_eq!(checked, 6 * grads.tensors().count());
}

#[test]
fn content_input_without_positions_causal() {
    check(&Case::new(config(InputKind::Content, Positions::None, 0.0), MaskKind::Causal, 1), "content/none/causal");
}

#[test]
fn content_input_learned_positions_diagonal() {
    let cfg = config(InputKind::Content, Positions::Learned, 0.0);
    check(&Case::new(cfg, MaskKind::Diagonal, 2), "content/learned/diagonal");
}

#[test]
fn id_input_learned_positions_causal() {
    check(&Case::new(config(InputKind::Id, Positions::Learned, 0.0), MaskKind::Causal, 3), "id/learned/causal");
}

#[test]
fn id_input_without_positions_diagonal() {
    check(&Case::new(config(InputKind::Id, Positions::None, 0.0), MaskKind::Diagonal, 4), "id/none/diagonal");
}

#[test]
fn dropout_with_fixed_masks() {
    let cfg = config(InputKind::Content, Positions::Learned, 0.3);
    check(&Case::new(cfg.clone(), MaskKind::Causal, 5), "dropout/causal");
    check(&Case::new(cfg, MaskKind::Diagonal, 6), "dropout/diagonal");
}

#[test]
fn content_gradient_matches_finite_differences_and_is_zero_when_padded() {
    let case = Case::new(config(InputKind::Content, Positions::None, 0.0), MaskKind::Causal, 7);
    let (_, cache) = forward(&case.params, case.input(), &Case::shape(), case.mask, None).unwrap();
    let mut grads = case.params.zeros_like();
    let mut dc = vec![f64::NAN; case.content.len()];
    backward_to_content(&case.params, &cache, &case.weights, &mut grads, &mut dc);
    assert_eq!(grads, case.analytic(), "the parameter gradients do not depend on the content gradient");
    let dim = case.cfg.d_content;
    let h = 1e-5;
    for (r, row) in dc.chunks(dim).enumerate() {
        let (b, i) = (r / L, r % L);
        if i >= LENGTHS[b] {
            assert!(row.iter().all(|&v| v == 0.0), "padded row {r}");
            continue;
        }
        for k in [0, dim - 1] {
            let mut probe = case.content.clone();
            probe[r * dim + k] += h;
            let up = case.loss(&case.params, &probe);
            probe[r * dim + k] -= 2.0 * h;
            let down = case.loss(&case.params, &probe);
            let fd = (up - down) / (2.0 * h);
            assert!(close(fd, row[k]), "content[{r}, {k}]: analytic {} vs finite difference {fd}", row[k]);
        }
    }
}

#[test]
fn gradients_accumulate() {
    let case = Case::new(config(InputKind::Id, Positions::Learned, 0.0), MaskKind::Causal, 8);
    let (_, cache) = forward(&case.params, case.input(), &Case::shape(), case.mask, None).unwrap();
    let once = case.analytic();
    let mut twice = case.params.zeros_like();
    backward(&case.params, &cache, &case.weights, &mut twice);
    backward(&case.params, &cache, &case.weights, &mut twice);
    for (a, b) in once.flat().iter().zip(twice.flat()) {
        assert!((2.0 * a - b).abs() <= 1e-12 * a.abs().max(1.0));
    }
}
