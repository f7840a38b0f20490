//! The PCH backward pass (SPEC §3.2): hand-written gradients of every parameter, accumulated in the
//! parameters' own layout.

use super::layer::{self, BackwardScratch};
use super::model::{CachedInput, NORMALIZE_EPS, PchCache};
use super::params::PchParams;
use crate::cpu::{Real, l2norm, linear};

/// Adds to `grads` the gradients of `Σ d_out · out` for the pass recorded in `cache`. `d_out` is
/// `[B, L, d_out]`; its values at padded positions are ignored (those outputs are not computed). Accumulating
/// lets the user-tower and item-tower passes of one step add into the same buffers.
pub fn backward<T: Real>(params: &PchParams<T>, cache: &PchCache<T>, d_out: &[T], grads: &mut PchParams<T>) {
    run(params, cache, d_out, grads, None);
}

/// [`backward`], also writing the gradient with respect to the content input, `d_content [B, L, d_content]`
/// (one more GEMM of the adaptor's size; zeros at padded positions). For models with `input = "content"` only.
pub fn backward_to_content<T: Real>(
    params: &PchParams<T>,
    cache: &PchCache<T>,
    d_out: &[T],
    grads: &mut PchParams<T>,
    d_content: &mut [T],
) {
    run(params, cache, d_out, grads, Some(d_content));
}

fn run<T: Real>(
    params: &PchParams<T>,
    cache: &PchCache<T>,
    d_out: &[T],
    grads: &mut PchParams<T>,
    d_content: Option<&mut [T]>,
) {
    let cfg = params.config();
    assert!(grads.config() == cfg, "PCH backward: gradients have another layout than the parameters");
    let shape = &cache.shape;
    let (rows, d, o) = (cache.seqs.rows(), cfg.d_model, cfg.d_out);
    assert_eq!(d_out.len(), shape.rows() * o, "PCH backward: d_out length");
    assert!(cache.config.as_ref() == Some(cfg), "PCH backward: the cache holds no forward pass of this model");
    let w = params.views();
    let g = grads.views_mut();

    // Head: normalisation, then the linear layer, over the valid rows only.
    let mut dy = Vec::with_capacity(rows * o);
    for r in shape.valid_rows() {
        dy.extend_from_slice(&d_out[r * o..(r + 1) * o]);
    }
    let mut dz = vec![T::zero(); rows * o];
    l2norm::backward(&mut dz, &dy, &cache.out, &cache.norms, rows, o, NORMALIZE_EPS);
    let mut dx = vec![T::zero(); rows * d];
    linear::backward(Some((&mut dx, false)), g.head_w, g.head_b, &dz, &cache.last, w.head_w, rows, d, o);

    let mut scratch = BackwardScratch::new(rows, cfg);
    for ((lw, gw), c) in w.layers.iter().zip(g.layers).zip(&cache.layers).rev() {
        layer::backward(lw, gw, c, &mut dx, &mut scratch, cfg, &cache.seqs);
    }

    if let Some(dpos) = g.pos {
        for (row, r) in dx.chunks(d).zip(shape.valid_rows()) {
            let i = r % shape.len;
            dpos[i * d..(i + 1) * d].iter_mut().zip(row).for_each(|(p, &g)| *p = *p + g);
        }
    }
    match &cache.input {
        CachedInput::Content(c) => {
            let db = g.embed_b.expect("content models have an adaptor bias");
            let dc = cfg.d_content;
            linear::backward(None, g.embed, db, &dx, c, w.embed, rows, dc, d);
            if let Some(out) = d_content {
                assert_eq!(out.len(), shape.rows() * dc, "PCH backward: d_content length");
                // The packed content gradient, spread to the batch layout with zeros at padded positions.
                let mut packed = vec![T::zero(); rows * dc];
                crate::cpu::gemm::a_b(&mut packed, &dx, w.embed, rows, dc, d, false);
                out.fill(T::zero());
                for (src, r) in packed.chunks(dc).zip(shape.valid_rows()) {
                    out[r * dc..(r + 1) * dc].copy_from_slice(src);
                }
            }
        }
        CachedInput::Ids(ids) => {
            assert!(d_content.is_none(), "PCH backward: no content gradient for a model with input = \"id\"");
            for (row, &id) in dx.chunks(d).zip(ids) {
                let id = id as usize;
                let e = &mut g.embed[id * d..(id + 1) * d];
                e.iter_mut().zip(row).for_each(|(e, &g)| *e = *e + g);
            }
        }
        CachedInput::Empty => unreachable!("a forward pass always stores its input"),
    }
}
