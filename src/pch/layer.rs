//! One post-LN BERT layer, forward and backward:
//! ```text
//! qkv = x Wqkvᵀ + b;  a = attention(q, k, v);  x1 = LN(x + drop(a Woᵀ + bo))
//! u = x1 Wupᵀ + b;    g = gelu(u);            x2 = LN(x1 + drop(g Wdownᵀ + bdown))
//! ```
//! Rows are the valid positions of the batch, packed (no padding); every product is one GEMM over all of
//! them, and attention runs per (sequence, head) in parallel.
//!
//! Dropout, when on, draws three masks per layer from the caller's RNG, in this order: attention
//! probabilities (one `n_b × n_b` block per (sequence, head) pair, in that order, row-major), attention
//! output `[rows, d_model]`, FFN output `[rows, d_model]`; an element is kept when
//! `next_u32() >= round(p·2³²)` and kept values are scaled by 1/(1-p).

use super::config::PchConfig;
use super::model::sized;
use super::params::LayerTensors;
use crate::cpu::masked_attention::{self, Heads, MaskKind, Varlen, from_heads, to_heads};
use crate::cpu::{Real, gelu, layernorm, linear};
use rand::Rng;
use rayon::prelude::*;

/// Elements per task of the elementwise passes.
const TASK: usize = 8192;

/// Dropout multipliers (0 or 1/(1-p)) of one layer.
#[derive(Debug, Default)]
pub(crate) struct DropMasks<T> {
    pub attn: Vec<T>,
    pub out: Vec<T>,
    pub ffn: Vec<T>,
}

/// What one layer keeps for its backward pass.
#[derive(Debug, Default)]
pub(crate) struct LayerCache<T> {
    /// The layer input `[rows, d_model]`.
    pub x: Vec<T>,
    /// Head-major projections (see [`masked_attention`]).
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
    /// Attention output with heads merged, the input of the output projection.
    ctx: Vec<T>,
    xhat1: Vec<T>,
    rstd1: Vec<T>,
    x1: Vec<T>,
    u: Vec<T>,
    g: Vec<T>,
    xhat2: Vec<T>,
    rstd2: Vec<T>,
    drop: Option<DropMasks<T>>,
}

/// Buffers the forward pass needs only transiently, kept between calls.
#[derive(Debug, Default)]
pub(crate) struct ForwardScratch<T> {
    qkv: Vec<T>,
    heads: Vec<T>,
    sum: Vec<T>,
    /// The head's pre-normalisation output `[rows, d_out]`.
    pub head: Vec<T>,
}

/// Gradient buffers of the backward pass, shared by all layers.
pub(crate) struct BackwardScratch<T> {
    dh: Vec<T>,
    dtmp: Vec<T>,
    dg: Vec<T>,
    dctx: Vec<T>,
    dheads: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    dqkv: Vec<T>,
}

impl<T: Real> BackwardScratch<T> {
    pub fn new(rows: usize, cfg: &PchConfig) -> Self {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let z = |n: usize| vec![T::zero(); n];
        Self {
            dh: z(rows * d),
            dtmp: z(rows * d),
            dg: z(rows * f),
            dctx: z(rows * d),
            dheads: z(rows * d),
            dq: z(rows * d),
            dk: z(rows * d),
            dv: z(rows * d),
            dqkv: z(rows * 3 * d),
        }
    }
}

/// Fills `keep` with `n` dropout multipliers drawn from `rng` (see the module notes for the rule).
fn draw<T: Real>(keep: &mut Vec<T>, n: usize, rng: &mut (dyn Rng + '_), p: f64) {
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let scale = T::c(1.0 / (1.0 - p));
    keep.clear();
    keep.extend((0..n).map(|_| if u64::from(rng.next_u32()) >= threshold { scale } else { T::zero() }));
}

/// `sum = x + sum ∘ keep` (or `x + sum`): the residual add after an optional dropout.
fn residual<T: Real>(sum: &mut [T], x: &[T], keep: Option<&[T]>) {
    match keep {
        Some(keep) => {
            sum.par_chunks_mut(TASK).zip(x.par_chunks(TASK)).zip(keep.par_chunks(TASK)).for_each(|((s, x), m)| {
                s.iter_mut().zip(x).zip(m).for_each(|((s, &x), &m)| *s = x + *s * m);
            })
        }
        None => sum.par_chunks_mut(TASK).zip(x.par_chunks(TASK)).for_each(|(s, x)| {
            s.iter_mut().zip(x).for_each(|(s, &x)| *s = x + *s);
        }),
    }
}

/// `out = x ∘ keep`.
fn masked<T: Real>(out: &mut [T], x: &[T], keep: &[T]) {
    out.par_chunks_mut(TASK).zip(x.par_chunks(TASK)).zip(keep.par_chunks(TASK)).for_each(|((o, x), m)| {
        o.iter_mut().zip(x).zip(m).for_each(|((o, &x), &m)| *o = x * m);
    });
}

/// Runs one layer on `c.x`, writing its output to `next` and keeping activations in `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Real>(
    w: &LayerTensors<&[T]>,
    c: &mut LayerCache<T>,
    next: &mut Vec<T>,
    s: &mut ForwardScratch<T>,
    cfg: &PchConfig,
    seqs: &Varlen,
    mask: MaskKind,
    dropout: Option<(&mut (dyn Rng + '_), f64)>,
) {
    let (n, d, f) = (seqs.rows(), cfg.d_model, cfg.d_ff);
    let hd = Heads { count: cfg.n_heads, dim: cfg.head_dim() };
    let n_probs = seqs.prob_len(hd.count);
    match dropout {
        Some((rng, p)) => {
            let m = c.drop.get_or_insert_with(Default::default);
            draw(&mut m.attn, n_probs, rng, p);
            draw(&mut m.out, n * d, rng, p);
            draw(&mut m.ffn, n * d, rng, p);
        }
        None => c.drop = None,
    }
    let keep = |pick: fn(&DropMasks<T>) -> &Vec<T>| c.drop.as_ref().map(|m| pick(m).as_slice());
    let (keep_attn, keep_out, keep_ffn) = (keep(|m| &m.attn), keep(|m| &m.out), keep(|m| &m.ffn));

    // Attention block.
    sized(&mut s.qkv, n * 3 * d);
    linear::forward(&mut s.qkv, &c.x, w.qkv_w, w.qkv_b, n, d, 3 * d);
    for (part, buf) in [&mut c.q, &mut c.k, &mut c.v].into_iter().enumerate() {
        sized(buf, n * d);
        to_heads(buf, &s.qkv, 3 * d, part * d, seqs, hd);
    }
    sized(&mut c.probs, n_probs);
    sized(&mut s.heads, n * d);
    masked_attention::forward(&mut s.heads, &mut c.probs, &c.q, &c.k, &c.v, keep_attn, seqs, hd, mask);
    sized(&mut c.ctx, n * d);
    from_heads(&mut c.ctx, d, 0, &s.heads, seqs, hd);
    sized(&mut s.sum, n * d);
    linear::forward(&mut s.sum, &c.ctx, w.out_w, w.out_b, n, d, d);
    residual(&mut s.sum, &c.x, keep_out);
    for buf in [&mut c.xhat1, &mut c.x1] {
        sized(buf, n * d);
    }
    sized(&mut c.rstd1, n);
    layernorm::forward(&mut c.x1, &mut c.xhat1, &mut c.rstd1, &s.sum, w.attn_norm_w, w.attn_norm_b, n, d, cfg.ln_eps);

    // Feed-forward block.
    sized(&mut c.u, n * f);
    sized(&mut c.g, n * f);
    linear::forward(&mut c.u, &c.x1, w.up_w, w.up_b, n, d, f);
    gelu::forward(&mut c.g, &c.u);
    linear::forward(&mut s.sum, &c.g, w.down_w, w.down_b, n, f, d);
    residual(&mut s.sum, &c.x1, keep_ffn);
    sized(next, n * d);
    sized(&mut c.xhat2, n * d);
    sized(&mut c.rstd2, n);
    layernorm::forward(next, &mut c.xhat2, &mut c.rstd2, &s.sum, w.ffn_norm_w, w.ffn_norm_b, n, d, cfg.ln_eps);
}

/// Backward through one layer: `dx` holds the gradient with respect to the layer output on entry and with
/// respect to its input on return; parameter gradients are added to `gw`.
pub(crate) fn backward<T: Real>(
    w: &LayerTensors<&[T]>,
    gw: LayerTensors<&mut [T]>,
    c: &LayerCache<T>,
    dx: &mut [T],
    s: &mut BackwardScratch<T>,
    cfg: &PchConfig,
    seqs: &Varlen,
) {
    let (n, d, f) = (seqs.rows(), cfg.d_model, cfg.d_ff);
    let hd = Heads { count: cfg.n_heads, dim: cfg.head_dim() };

    // Feed-forward block; s.dh becomes the gradient with respect to x1.
    layernorm::backward(&mut s.dh, gw.ffn_norm_w, gw.ffn_norm_b, dx, &c.xhat2, &c.rstd2, w.ffn_norm_w, n, d);
    let dffn: &[T] = match &c.drop {
        Some(m) => {
            masked(&mut s.dtmp, &s.dh, &m.ffn);
            &s.dtmp
        }
        None => &s.dh,
    };
    linear::backward(Some((&mut s.dg, false)), gw.down_w, gw.down_b, dffn, &c.g, w.down_w, n, f, d);
    gelu::backward_in_place(&mut s.dg, &c.u);
    linear::backward(Some((&mut s.dh, true)), gw.up_w, gw.up_b, &s.dg, &c.x1, w.up_w, n, d, f);

    // Attention block; dx becomes the gradient with respect to the layer input.
    layernorm::backward(dx, gw.attn_norm_w, gw.attn_norm_b, &s.dh, &c.xhat1, &c.rstd1, w.attn_norm_w, n, d);
    let dattn: &[T] = match &c.drop {
        Some(m) => {
            masked(&mut s.dtmp, dx, &m.out);
            &s.dtmp
        }
        None => dx,
    };
    linear::backward(Some((&mut s.dctx, false)), gw.out_w, gw.out_b, dattn, &c.ctx, w.out_w, n, d, d);
    to_heads(&mut s.dheads, &s.dctx, d, 0, seqs, hd);
    let keep_attn = c.drop.as_ref().map(|m| m.attn.as_slice());
    let (q, k, v) = (&c.q, &c.k, &c.v);
    masked_attention::backward(&mut s.dq, &mut s.dk, &mut s.dv, &s.dheads, q, k, v, &c.probs, keep_attn, seqs, hd);
    for (part, src) in [&s.dq, &s.dk, &s.dv].into_iter().enumerate() {
        from_heads(&mut s.dqkv, 3 * d, part * d, src, seqs, hd);
    }
    linear::backward(Some((dx, true)), gw.qkv_w, gw.qkv_b, &s.dqkv, &c.x, w.qkv_w, n, d, 3 * d);
}
