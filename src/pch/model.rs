//! The PCH forward pass (SPEC §3.1) over a right-padded batch, keeping what the backward pass needs. Only
//! the valid positions are computed, packed without padding: padded positions cost nothing.

use super::config::{InputKind, PchConfig, Positions};
use super::layer::{self, LayerCache};
use super::params::PchParams;
use crate::bail_input;
use crate::cpu::masked_attention::{MaskKind, Varlen};
use crate::cpu::{Real, l2norm, linear};
use anyhow::Result;
use rand::Rng;

/// The epsilon of `F.normalize` on the head output.
pub const NORMALIZE_EPS: f64 = 1e-12;

/// The inputs of one batch, `B` sequences of `L` positions, row-major.
#[derive(Clone, Copy, Debug)]
pub enum PchInput<'a, T> {
    /// Content embeddings `[B, L, d_content]` (`input = "content"`).
    Content(&'a [T]),
    /// Item ids `[B, L]` (`input = "id"`); ids at padded positions are ignored.
    Ids(&'a [u32]),
}

/// A right-padded batch: `batch` sequences of `len` positions, of which the first `lengths[b]` are real.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PchBatchShape {
    pub batch: usize,
    pub len: usize,
    pub lengths: Vec<usize>,
}

impl PchBatchShape {
    /// Positions of the padded layout, `B·L`.
    pub fn rows(&self) -> usize {
        self.batch * self.len
    }

    /// True when position `i` of sequence `b` is real.
    pub fn is_valid(&self, b: usize, i: usize) -> bool {
        i < self.lengths[b]
    }

    /// Indices `b·len + i` of the real positions, in order: the rows the model computes.
    pub fn valid_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.lengths.iter().enumerate().flat_map(move |(b, &n)| b * self.len..b * self.len + n)
    }
}

/// The input of the valid positions, packed, as the backward pass needs it.
#[derive(Debug, Default)]
pub(crate) enum CachedInput<T> {
    #[default]
    Empty,
    Content(Vec<T>),
    Ids(Vec<u32>),
}

/// Activations of one forward pass, for [`super::backward`]. Only valid positions are computed: every
/// activation holds their rows, packed in (sequence, position) order. Reusable: [`forward_reusing`] keeps
/// its buffers when the next batch has the same shape.
#[derive(Debug)]
pub struct PchCache<T> {
    /// The configuration of the model that filled the cache.
    pub(crate) config: Option<PchConfig>,
    pub(crate) shape: PchBatchShape,
    pub(crate) seqs: Varlen,
    pub(crate) mask: MaskKind,
    pub(crate) input: CachedInput<T>,
    pub(crate) layers: Vec<LayerCache<T>>,
    /// Output of the last layer, the head's input `[rows, d_model]`.
    pub(crate) last: Vec<T>,
    pub(crate) norms: Vec<T>,
    /// Outputs of the valid positions `[rows, d_out]`.
    pub(crate) out: Vec<T>,
    /// The outputs in the batch layout `[B, L, d_out]`, zero at padded positions.
    padded: Vec<T>,
    scratch: layer::ForwardScratch<T>,
}

impl<T: Real> Default for PchCache<T> {
    fn default() -> Self {
        Self {
            config: None,
            shape: PchBatchShape { batch: 0, len: 0, lengths: Vec::new() },
            seqs: Varlen::default(),
            mask: MaskKind::Causal,
            input: CachedInput::Empty,
            layers: Vec::new(),
            last: Vec::new(),
            norms: Vec::new(),
            out: Vec::new(),
            padded: Vec::new(),
            scratch: Default::default(),
        }
    }
}

impl<T: Real> PchCache<T> {
    /// The outputs `[B, L, d_out]` of the pass that filled this cache (zero at padded positions).
    pub fn output(&self) -> &[T] {
        &self.padded
    }

    pub fn shape(&self) -> &PchBatchShape {
        &self.shape
    }
}

/// Sets `v` to `n` values, keeping its contents when the length already matches (callers overwrite them).
pub(crate) fn sized<T: Real>(v: &mut Vec<T>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, T::zero());
    }
}

/// Runs the model over a batch: outputs `[B, L, d_out]` (unit rows at valid positions, zeros at padded ones,
/// which are never computed) and the cache for the backward pass. `dropout` is the training-mode RNG: when it is given and the
/// config's dropout is above 0, masks are drawn from it (see `layer` for the order); otherwise no
/// dropout is applied and no RNG is touched.
pub fn forward<T: Real>(
    params: &PchParams<T>,
    input: PchInput<T>,
    shape: &PchBatchShape,
    mask: MaskKind,
    dropout: Option<&mut dyn Rng>,
) -> Result<(Vec<T>, PchCache<T>)> {
    let mut cache = PchCache::default();
    forward_reusing(params, input, shape, mask, dropout, &mut cache)?;
    Ok((cache.padded.clone(), cache))
}

/// [`forward`] into an existing cache, reusing its buffers; returns the outputs, which live in the cache.
pub fn forward_reusing<'c, T: Real>(
    params: &PchParams<T>,
    input: PchInput<T>,
    shape: &PchBatchShape,
    mask: MaskKind,
    dropout: Option<&mut dyn Rng>,
    cache: &'c mut PchCache<T>,
) -> Result<&'c [T]> {
    let cfg = params.config();
    check_batch(params, input, shape)?;
    let w = params.views();
    let seqs = Varlen::new(&shape.lengths);
    let (rows, d) = (seqs.rows(), cfg.d_model);
    if cache.config.as_ref() != Some(cfg) {
        cache.config = Some(cfg.clone());
    }
    cache.shape.clone_from(shape);
    cache.seqs = seqs;
    cache.mask = mask;
    cache.layers.resize_with(cfg.n_layers, Default::default);

    // Embedding of the valid positions: the adaptor over content, or a gather from the item table.
    let x0 = &mut cache.layers[0].x;
    sized(x0, rows * d);
    match input {
        PchInput::Content(c) => {
            let dc = cfg.d_content;
            let mut packed = match std::mem::take(&mut cache.input) {
                CachedInput::Content(v) => v,
                _ => Vec::new(),
            };
            packed.clear();
            for r in shape.valid_rows() {
                packed.extend_from_slice(&c[r * dc..(r + 1) * dc]);
            }
            let b = w.embed_b.expect("content models have an adaptor bias");
            linear::forward(x0, &packed, w.embed, b, rows, dc, d);
            cache.input = CachedInput::Content(packed);
        }
        PchInput::Ids(ids) => {
            let packed: Vec<u32> = shape.valid_rows().map(|r| ids[r]).collect();
            for (row, &id) in x0.chunks_mut(d).zip(&packed) {
                let id = id as usize;
                row.copy_from_slice(&w.embed[id * d..(id + 1) * d]);
            }
            cache.input = CachedInput::Ids(packed);
        }
    }
    if let Some(pos) = w.pos {
        for (row, r) in x0.chunks_mut(d).zip(shape.valid_rows()) {
            let i = r % shape.len;
            row.iter_mut().zip(&pos[i * d..(i + 1) * d]).for_each(|(x, &p)| *x = *x + p);
        }
    }

    let mut rng = dropout.filter(|_| cfg.dropout > 0.0);
    for l in 0..cfg.n_layers {
        let (this, rest) = cache.layers[l..].split_first_mut().expect("a layer per index");
        let next = match rest.first_mut() {
            Some(next) => &mut next.x,
            None => &mut cache.last,
        };
        let drop = rng.as_deref_mut().map(|r| (r, cfg.dropout));
        layer::forward(&w.layers[l], this, next, &mut cache.scratch, cfg, &cache.seqs, mask, drop);
    }

    // Head and L2 normalisation, then the outputs spread back to the padded layout.
    let o = cfg.d_out;
    let z = &mut cache.scratch.head;
    sized(z, rows * o);
    linear::forward(z, &cache.last, w.head_w, w.head_b, rows, d, o);
    sized(&mut cache.out, rows * o);
    sized(&mut cache.norms, rows);
    l2norm::forward(&mut cache.out, &mut cache.norms, z, rows, o, NORMALIZE_EPS);
    cache.padded.clear();
    cache.padded.resize(shape.rows() * o, T::zero());
    for (src, r) in cache.out.chunks(o).zip(shape.valid_rows()) {
        cache.padded[r * o..(r + 1) * o].copy_from_slice(src);
    }
    Ok(&cache.padded)
}

/// Checks a batch against the model, naming what is wrong.
fn check_batch<T: Real>(params: &PchParams<T>, input: PchInput<T>, shape: &PchBatchShape) -> Result<()> {
    let cfg = params.config();
    let (b, l) = (shape.batch, shape.len);
    if b == 0 || l == 0 {
        bail_input!("PCH batch of {b} sequences × {l} positions is empty");
    }
    if shape.lengths.len() != b {
        bail_input!("PCH batch has {} sequence lengths for {b} sequences", shape.lengths.len());
    }
    if let Some(s) = shape.lengths.iter().position(|&n| n > l) {
        bail_input!("PCH batch: sequence {s} has length {} beyond the padded length {l}", shape.lengths[s]);
    }
    if cfg.positions == Positions::Learned {
        let max_len = cfg.max_len.unwrap_or(0);
        if let Some(s) = shape.lengths.iter().position(|&n| n > max_len) {
            bail_input!(
                "PCH batch: sequence {s} has length {} beyond the model's max_len {max_len} (learned positions)",
                shape.lengths[s]
            );
        }
    }
    match (input, cfg.input) {
        (PchInput::Content(c), InputKind::Content) => {
            if c.len() != b * l * cfg.d_content {
                bail_input!(
                    "PCH batch: content holds {} values, expected {b} × {l} × d_content {}",
                    c.len(),
                    cfg.d_content
                );
            }
        }
        (PchInput::Ids(ids), InputKind::Id) => {
            if ids.len() != b * l {
                bail_input!("PCH batch: {} item ids, expected {b} × {l}", ids.len());
            }
            let n_items = cfg.n_items.unwrap_or(0);
            for (r, &id) in ids.iter().enumerate() {
                if shape.is_valid(r / l, r % l) && id as usize >= n_items {
                    bail_input!(
                        "PCH batch: item id {id} at sequence {}, position {} is outside the item table of {n_items} rows",
                        r / l,
                        r % l
                    );
                }
            }
        }
        (PchInput::Content(_), InputKind::Id) => {
            bail_input!("PCH batch: content embeddings given to a model with input = \"id\"")
        }
        (PchInput::Ids(_), InputKind::Content) => {
            bail_input!("PCH batch: item ids given to a model with input = \"content\"")
        }
    }
    Ok(())
}
