//! PCH parameters (SPEC §3.3): every tensor by its checkpoint name and shape, in one canonical order, stored
//! back to back in one flat buffer so that optimisers, norms and conversions are single loops.
//!
//! Gradients use the same type and layout ([`PchParams::zeros_like`]), so the two can be zipped tensor by
//! tensor or element by element.

use super::config::{InputKind, PchConfig, Positions};
use crate::cpu::Real;
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Standard deviation of BERT's normal initialisation of weights and embeddings.
pub const INIT_STD: f64 = 0.02;

/// The tensors of a configuration as `(name, shape)`, in canonical order: the embedding (adaptor or item
/// table), positions, each layer's attention, attention norm, FFN and FFN norm, then the head.
pub fn names_and_shapes(cfg: &PchConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let mut out: Vec<(String, Vec<usize>)> = Vec::with_capacity(4 + 12 * cfg.n_layers);
    match cfg.input {
        InputKind::Content => {
            out.push(("adaptor.weight".into(), vec![d, cfg.d_content]));
            out.push(("adaptor.bias".into(), vec![d]));
        }
        InputKind::Id => out.push(("item_emb.weight".into(), vec![cfg.n_items.unwrap_or(0), d])),
    }
    if cfg.positions == Positions::Learned {
        out.push(("pos_emb.weight".into(), vec![cfg.max_len.unwrap_or(0), d]));
    }
    for l in 0..cfg.n_layers {
        let p = format!("layers.{l}.");
        for (name, shape) in [
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.out.weight", vec![d, d]),
            ("attn.out.bias", vec![d]),
            ("attn_norm.weight", vec![d]),
            ("attn_norm.bias", vec![d]),
            ("ffn.up.weight", vec![f, d]),
            ("ffn.up.bias", vec![f]),
            ("ffn.down.weight", vec![d, f]),
            ("ffn.down.bias", vec![d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_norm.bias", vec![d]),
        ] {
            out.push((format!("{p}{name}"), shape));
        }
    }
    out.push(("head.weight".into(), vec![cfg.d_out, d]));
    out.push(("head.bias".into(), vec![cfg.d_out]));
    out
}

/// The number of parameters of a configuration: the elements of every tensor of [`names_and_shapes`].
pub fn parameter_count(cfg: &PchConfig) -> usize {
    names_and_shapes(cfg).iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
}

#[derive(Debug, Clone, PartialEq)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// All parameters (or all gradients) of one PCH model.
#[derive(Debug, Clone, PartialEq)]
pub struct PchParams<T> {
    config: PchConfig,
    slots: Vec<Slot>,
    data: Vec<T>,
}

/// Borrowed views of one layer's tensors (shared or mutable slices), in canonical order.
pub(crate) struct LayerTensors<S> {
    pub qkv_w: S,
    pub qkv_b: S,
    pub out_w: S,
    pub out_b: S,
    pub attn_norm_w: S,
    pub attn_norm_b: S,
    pub up_w: S,
    pub up_b: S,
    pub down_w: S,
    pub down_b: S,
    pub ffn_norm_w: S,
    pub ffn_norm_b: S,
}

/// Borrowed views of every tensor, grouped as the model uses them.
pub(crate) struct Tensors<S> {
    /// `adaptor.weight` or `item_emb.weight`.
    pub embed: S,
    /// `adaptor.bias` (content input only).
    pub embed_b: Option<S>,
    pub pos: Option<S>,
    pub layers: Vec<LayerTensors<S>>,
    pub head_w: S,
    pub head_b: S,
}

/// Groups slices that arrive in canonical order (see [`names_and_shapes`]).
pub(crate) fn assemble<S>(cfg: &PchConfig, mut it: impl Iterator<Item = S>) -> Tensors<S> {
    // The iterator comes from the layout of this very config, so it has exactly one slice per tensor.
    let mut next = || it.next().expect("parameter layout and config agree");
    let embed = next();
    let embed_b = (cfg.input == InputKind::Content).then(&mut next);
    let pos = (cfg.positions == Positions::Learned).then(&mut next);
    let layers = (0..cfg.n_layers)
        .map(|_| LayerTensors {
            qkv_w: next(),
            qkv_b: next(),
            out_w: next(),
            out_b: next(),
            attn_norm_w: next(),
            attn_norm_b: next(),
            up_w: next(),
            up_b: next(),
            down_w: next(),
            down_b: next(),
            ffn_norm_w: next(),
            ffn_norm_b: next(),
        })
        .collect();
    let head_w = next();
    let head_b = next();
    Tensors { embed, embed_b, pos, layers, head_w, head_b }
}

impl<T: Real> PchParams<T> {
    /// All-zero tensors for a validated config: the starting point of gradient accumulation.
    pub fn zeros(cfg: &PchConfig) -> Result<Self> {
        cfg.validate()?;
        let mut offset = 0;
        let slots = names_and_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let slot = Slot { name, shape, offset, len };
                offset += len;
                slot
            })
            .collect();
        Ok(Self { config: cfg.clone(), slots, data: vec![T::zero(); offset] })
    }

    /// BERT's initialisation, reproducible from `seed`: LayerNorm weights 1, biases 0, every other tensor
    /// (linear weights, embedding tables) drawn from Normal(0, 0.02). The draws come from one
    /// `ChaCha8Rng::seed_from_u64(seed)` stream through `rand_distr::Normal<f64>`, tensor after tensor in
    /// canonical order and row-major within a tensor, then rounded to `T` — so f32 and f64 models from one
    /// seed agree to f32 rounding.
    pub fn init(cfg: &PchConfig, seed: u64) -> Result<Self> {
        let mut params = Self::zeros(cfg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0, INIT_STD).expect("a positive, finite standard deviation");
        for (name, _, values) in params.tensors_mut() {
            if name.ends_with("norm.weight") {
                values.fill(T::one());
            } else if !name.ends_with(".bias") {
                for v in values.iter_mut() {
                    *v = T::c(normal.sample(&mut rng));
                }
            }
        }
        Ok(params)
    }

    /// Zeros in the same layout, for gradients.
    pub fn zeros_like(&self) -> Self {
        Self { config: self.config.clone(), slots: self.slots.clone(), data: vec![T::zero(); self.data.len()] }
    }

    /// The same values in another precision (f32 ↔ f64 for gradient checks).
    pub fn cast<U: Real>(&self) -> PchParams<U> {
        let data = self.data.iter().map(|&v| U::from(v).unwrap_or_else(U::nan)).collect();
        PchParams { config: self.config.clone(), slots: self.slots.clone(), data }
    }

    pub fn config(&self) -> &PchConfig {
        &self.config
    }

    /// Sets every value to zero (clears accumulated gradients).
    pub fn fill_zero(&mut self) {
        self.data.fill(T::zero());
    }

    /// Every value, tensors back to back in canonical order.
    pub fn flat(&self) -> &[T] {
        &self.data
    }

    pub fn flat_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// `(name, shape, values)` of every tensor in canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], &[T])> {
        self.slots.iter().map(|s| (s.name.as_str(), s.shape.as_slice(), &self.data[s.offset..s.offset + s.len]))
    }

    /// `(name, shape, values)` of every tensor in canonical order, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = (&str, &[usize], &mut [T])> {
        let mut rest = self.data.as_mut_slice();
        self.slots.iter().map(move |s| {
            let (values, tail) = std::mem::take(&mut rest).split_at_mut(s.len);
            rest = tail;
            (s.name.as_str(), s.shape.as_slice(), values)
        })
    }

    /// One tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&[T]> {
        self.tensors().find(|(n, _, _)| *n == name).map(|(_, _, v)| v)
    }

    /// One tensor by name, mutably.
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut [T]> {
        self.tensors_mut().find(|(n, _, _)| *n == name).map(|(_, _, v)| v)
    }

    pub(crate) fn views(&self) -> Tensors<&[T]> {
        assemble(&self.config, self.tensors().map(|(_, _, v)| v))
    }

    pub(crate) fn views_mut(&mut self) -> Tensors<&mut [T]> {
        let cfg = self.config.clone();
        assemble(&cfg, self.tensors_mut().map(|(_, _, v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learned_ids() -> PchConfig {
        PchConfig {
            positions: Positions::Learned,
            max_len: Some(7),
            input: InputKind::Id,
            n_items: Some(11),
            ..PchConfig::tiny()
        }
    }

    #[test]
    fn layout_follows_the_checkpoint_names_and_shapes() {
        let cfg = PchConfig::tiny().with_d_content(24);
        let names = names_and_shapes(&cfg);
        assert_eq!(names.len(), 2 + 12 * cfg.n_layers + 2);
        assert_eq!(names[0], ("adaptor.weight".to_string(), vec![64, 24]));
        assert_eq!(names[2], ("layers.0.attn.qkv.weight".to_string(), vec![192, 64]));
        assert_eq!(names[10], ("layers.0.ffn.down.weight".to_string(), vec![64, 128]));
        assert_eq!(names[13], ("layers.0.ffn_norm.bias".to_string(), vec![64]));
        assert_eq!(names.last().unwrap(), &("head.bias".to_string(), vec![16]));
        // Adaptor 64·24 + 64, two layers of 33,472, head 16·64 + 16.
        assert_eq!(parameter_count(&cfg), 69_584);
        assert_eq!(parameter_count(&cfg), PchParams::<f32>::zeros(&cfg).unwrap().flat().len());

        let names = names_and_shapes(&learned_ids());
        assert_eq!(names[0], ("item_emb.weight".to_string(), vec![11, 64]));
        assert_eq!(names[1], ("pos_emb.weight".to_string(), vec![7, 64]));

        let p = PchParams::<f32>::zeros(&learned_ids()).unwrap();
        let total: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(p.flat().len(), total);
        for ((name, shape, values), (want_name, want_shape)) in p.tensors().zip(&names) {
            assert_eq!((name, shape), (want_name.as_str(), want_shape.as_slice()));
            assert_eq!(values.len(), shape.iter().product::<usize>());
        }
    }

    #[test]
    fn views_group_the_tensors_their_names_say() {
        let mut p = PchParams::<f64>::zeros(&learned_ids()).unwrap();
        // Tag every tensor with its index so each view can be traced back to its name.
        for (i, (_, _, v)) in p.tensors_mut().enumerate() {
            v.fill(i as f64);
        }
        let names: Vec<String> = p.tensors().map(|(n, _, _)| n.to_string()).collect();
        let index = |s: &[f64]| names[s[0] as usize].clone();
        let v = p.views();
        assert_eq!(index(v.embed), "item_emb.weight");
        assert!(v.embed_b.is_none());
        assert_eq!(index(v.pos.unwrap()), "pos_emb.weight");
        assert_eq!(index(v.layers[1].qkv_w), "layers.1.attn.qkv.weight");
        assert_eq!(index(v.layers[1].attn_norm_b), "layers.1.attn_norm.bias");
        assert_eq!(index(v.layers[0].down_w), "layers.0.ffn.down.weight");
        assert_eq!(index(v.layers[1].ffn_norm_w), "layers.1.ffn_norm.weight");
        assert_eq!(index(v.head_w), "head.weight");
        assert_eq!(index(v.head_b), "head.bias");
        let v = p.views_mut();
        assert_eq!(v.layers.len(), 2);
        assert_eq!(index(v.layers[0].up_b), "layers.0.ffn.up.bias");
    }

    #[test]
    fn init_is_bert_style_and_reproducible() {
        let cfg = PchConfig::tiny().with_d_content(32);
        let a = PchParams::<f32>::init(&cfg, 7).unwrap();
        assert_eq!(a, PchParams::<f32>::init(&cfg, 7).unwrap());
        assert_ne!(a, PchParams::<f32>::init(&cfg, 8).unwrap());
        for (name, _, v) in a.tensors() {
            if name.ends_with("norm.weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{name}");
            } else if name.ends_with(".bias") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
            } else {
                let n = v.len() as f64;
                let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
                let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                assert!(mean.abs() < 4.0 * INIT_STD / n.sqrt(), "{name}: mean {mean}");
                assert!((std / INIT_STD - 1.0).abs() < 0.1, "{name}: std {std}");
            }
        }
        // f64 from the same seed equals the f32 draws up to f32 rounding.
        let b = PchParams::<f64>::init(&cfg, 7).unwrap();
        assert_eq!(b.cast::<f32>(), a);
        assert_eq!(a.cast::<f64>().cast::<f32>(), a);
        let g = a.zeros_like();
        assert!(g.flat().iter().all(|&x| x == 0.0) && g.flat().len() == a.flat().len());
    }

    #[test]
    fn lookup_by_name() {
        let mut p = PchParams::<f32>::zeros(&PchConfig::tiny()).unwrap();
        p.tensor_mut("layers.1.ffn.up.bias").unwrap()[3] = 2.5;
        assert_eq!(p.tensor("layers.1.ffn.up.bias").unwrap()[3], 2.5);
        assert!(p.tensor("layers.2.ffn.up.bias").is_none());
        p.fill_zero();
        assert!(p.flat().iter().all(|&x| x == 0.0));
    }
}
