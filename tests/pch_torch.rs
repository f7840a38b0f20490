//! The PCH model against PyTorch: `tests/fixtures/pch_torch.safetensors`, written by `tools/pch_fixture.py`
//! from `transformers.BertEncoder` under BERT's additive causal (and diagonal) mask, as the official LEARN
//! code builds the module, in float64. Outputs and every parameter gradient must match: to 1e-10 in f64,
//! and to the SPEC's 1e-4 in f32.

use learn_kern::pch::{MaskKind, PchBatchShape, PchConfig, PchInput, PchParams, backward, forward};
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pch_torch.safetensors");

fn f64s(st: &SafeTensors, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

struct Fixture {
    params: PchParams<f64>,
    shape: PchBatchShape,
    content: Vec<f64>,
    weights: Vec<f64>,
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        let bytes = std::fs::read(FIXTURE).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let config = meta.metadata().as_ref().and_then(|m| m.get("config")).expect("config metadata");
        let cfg = PchConfig::from_json(config, FIXTURE).unwrap();
        let mut params = PchParams::<f64>::zeros(&cfg).unwrap();
        for (name, shape, values) in params.tensors_mut() {
            assert_eq!(st.tensor(name).unwrap().shape(), shape, "{name}");
            values.copy_from_slice(&f64s(&st, name));
        }
        let lengths: Vec<usize> = st
            .tensor("input.lengths")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        let len = st.tensor("input.content").unwrap().shape()[1];
        let shape = PchBatchShape { batch: lengths.len(), len, lengths };
        let (content, weights) = (f64s(&st, "input.content"), f64s(&st, "loss.weights"));
        Self { params, shape, content, weights, bytes }
    }

    /// The valid rows of a `[B, L, width]` tensor, flattened.
    fn valid(&self, x: &[f64], width: usize) -> Vec<f64> {
        (0..self.shape.rows())
            .filter(|&r| self.shape.is_valid(r / self.shape.len, r % self.shape.len))
            .flat_map(|r| x[r * width..(r + 1) * width].to_vec())
            .collect()
    }
}

fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: an all-zero reference");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs PyTorch {w} (scale {scale})");
    }
}

fn check<T: learn_kern::cpu::Real>(fx: &Fixture, rel_out: f64, rel_grad: f64) {
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    let params = fx.params.cast::<T>();
    let content: Vec<T> = fx.content.iter().map(|&v| T::c(v)).collect();
    let weights: Vec<T> = fx.weights.iter().map(|&v| T::c(v)).collect();
    let d_out = params.config().d_out;
    for (kind, mask) in [("causal", MaskKind::Causal), ("diagonal", MaskKind::Diagonal)] {
        let (out, cache) = forward(&params, PchInput::Content(&content), &fx.shape, mask, None).unwrap();
        let out: Vec<f64> = out.iter().map(|v| v.to_f64().unwrap()).collect();
        let want = f64s(&st, &format!("out.{kind}"));
        assert_close(&fx.valid(&out, d_out), &fx.valid(&want, d_out), rel_out, &format!("out.{kind}"));
        let mut grads = params.zeros_like();
        backward(&params, &cache, &weights, &mut grads);
        for (name, _, g) in grads.tensors() {
            let g: Vec<f64> = g.iter().map(|v| v.to_f64().unwrap()).collect();
            let key = format!("grad.{kind}.{name}");
            assert_close(&g, &f64s(&st, &key), rel_grad, &key);
        }
    }
}

#[test]
fn f64_matches_pytorch_to_rounding() {
    check::<f64>(&Fixture::load(), 1e-10, 1e-10);
}

#[test]
fn f32_matches_pytorch_within_the_spec_tolerance() {
    check::<f32>(&Fixture::load(), 1e-4, 1e-4);
}
