//! Properties of the PCH forward pass: masking (padded inputs and future positions cannot leak), finite
//! padded outputs, the diagonal mask as single-item inference, dropout and RNG handling, cache reuse,
//! f32 against f64, and input errors.

use learn_kern::error::is_input_error;
use learn_kern::pch::{
    InputKind, MaskKind, PchBatchShape, PchCache, PchConfig, PchInput, PchParams, Positions, backward, forward,
    forward_reusing,
};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn cfg() -> PchConfig {
    PchConfig { n_layers: 3, positions: Positions::Learned, max_len: Some(12), ..PchConfig::tiny().with_d_content(24) }
}

fn shape(lengths: &[usize], len: usize) -> PchBatchShape {
    PchBatchShape { batch: lengths.len(), len, lengths: lengths.to_vec() }
}

fn run(p: &PchParams<f32>, content: &[f32], s: &PchBatchShape, mask: MaskKind) -> Vec<f32> {
    forward(p, PchInput::Content(content), s, mask, None).unwrap().0
}

#[test]
fn padded_inputs_do_not_reach_valid_outputs_and_padded_outputs_are_zero() {
    let cfg = cfg();
    let p = PchParams::<f32>::init(&cfg, 1).unwrap();
    let s = shape(&[10, 4, 0, 1], 10);
    let (dc, o) = (cfg.d_content, cfg.d_out);
    let content = uniform(s.rows() * dc, 2);
    for mask in [MaskKind::Causal, MaskKind::Diagonal] {
        let base = run(&p, &content, &s, mask);
        assert!(base.iter().all(|v| v.is_finite()), "{mask:?}: a non-finite output");
        let mut other = content.clone();
        let noise = uniform(other.len(), 3);
        for r in 0..s.rows() {
            if !s.is_valid(r / s.len, r % s.len) {
                other[r * dc..(r + 1) * dc].copy_from_slice(&noise[r * dc..(r + 1) * dc]);
            }
        }
        let changed = run(&p, &other, &s, mask);
        for r in 0..s.rows() {
            let (a, b) = (&base[r * o..(r + 1) * o], &changed[r * o..(r + 1) * o]);
            if s.is_valid(r / s.len, r % s.len) {
                assert_eq!(a, b, "{mask:?}: valid row {r} changed with padded content");
            } else {
                assert!(b.iter().all(|&v| v == 0.0), "padded row {r} is not computed and reads zero");
            }
        }
    }
}

#[test]
fn causal_outputs_do_not_depend_on_later_positions() {
    let cfg = cfg();
    let p = PchParams::<f32>::init(&cfg, 4).unwrap();
    let s = shape(&[9, 7], 9);
    let (dc, o) = (cfg.d_content, cfg.d_out);
    let content = uniform(s.rows() * dc, 5);
    let base = run(&p, &content, &s, MaskKind::Causal);
    let cut = 4;
    let mut other = content.clone();
    for b in 0..s.batch {
        for i in cut + 1..s.len {
            let at = (b * s.len + i) * dc;
            other[at..at + dc].iter_mut().for_each(|v| *v = -*v + 0.5);
        }
    }
    let changed = run(&p, &other, &s, MaskKind::Causal);
    for b in 0..s.batch {
        for i in 0..s.lengths[b] {
            let at = (b * s.len + i) * o;
            let same = base[at..at + o] == changed[at..at + o];
            assert_eq!(same, i <= cut, "sequence {b} position {i}");
        }
    }
}

#[test]
fn diagonal_mask_equals_each_item_alone() {
    // Variant 2 and single-item inference agree: a diagonal-mask batch is L independent items (no
    // positions, so that an item's output does not depend on where it sits).
    let cfg = PchConfig::tiny().with_d_content(24);
    let p = PchParams::<f32>::init(&cfg, 6).unwrap();
    let s = shape(&[6, 3], 6);
    let (dc, o) = (cfg.d_content, cfg.d_out);
    let content = uniform(s.rows() * dc, 7);
    let batch = run(&p, &content, &s, MaskKind::Diagonal);
    let singles = run(&p, &content, &shape(&vec![1; s.rows()], 1), MaskKind::Causal);
    for r in s.valid_rows() {
        for (a, b) in batch[r * o..(r + 1) * o].iter().zip(&singles[r * o..(r + 1) * o]) {
            assert!((a - b).abs() < 1e-5, "row {r}: {a} vs {b}");
        }
    }
    assert!(batch[..o] != batch[o..2 * o], "different items give different embeddings");
}

#[test]
fn ids_at_padded_positions_are_ignored_but_valid_ones_are_checked() {
    let cfg = PchConfig { input: InputKind::Id, n_items: Some(50), ..PchConfig::tiny() };
    let p = PchParams::<f32>::init(&cfg, 8).unwrap();
    let s = shape(&[3, 1], 4);
    let ids = [4, 9, 49, 7, 0, u32::MAX, 123, 2];
    let (a, _) = forward(&p, PchInput::Ids(&ids), &s, MaskKind::Causal, None).unwrap();
    let other = [4, 9, 49, 0, 0, 1, 2, 3];
    let (b, _) = forward(&p, PchInput::Ids(&other), &s, MaskKind::Causal, None).unwrap();
    let o = cfg.d_out;
    assert_eq!(a[..3 * o], b[..3 * o]);
    assert_eq!(a[4 * o..5 * o], b[4 * o..5 * o]);
    let bad = [4, 50, 0, 0, 0, 0, 0, 0];
    let err = forward(&p, PchInput::Ids(&bad), &s, MaskKind::Causal, None).unwrap_err();
    assert!(is_input_error(&err));
    assert!(err.to_string().contains("item id 50 at sequence 0, position 1"), "{err}");
}

#[test]
fn bad_batches_are_input_errors() {
    let cfg = cfg();
    let p = PchParams::<f32>::init(&cfg, 9).unwrap();
    let dc = cfg.d_content;
    let content = vec![0.5f32; 2 * 13 * dc];
    let cases: Vec<(PchBatchShape, usize, &str)> = vec![
        (shape(&[3, 2], 4), 2 * 4 * dc - 1, "content holds"),
        (shape(&[5, 2], 4), 2 * 4 * dc, "beyond the padded length"),
        (PchBatchShape { batch: 2, len: 4, lengths: vec![1] }, 2 * 4 * dc, "sequence lengths"),
        (shape(&[13, 2], 13), 2 * 13 * dc, "sequence 0 has length 13 beyond the model's max_len 12"),
        (shape(&[], 4), 0, "empty"),
    ];
    for (s, n, needle) in cases {
        let err = forward(&p, PchInput::Content(&content[..n]), &s, MaskKind::Causal, None).unwrap_err();
        assert!(is_input_error(&err) && err.to_string().contains(needle), "{err}");
    }
    // Learned positions bound the real lengths, not the padding.
    let s = shape(&[12, 2], 13);
    assert!(forward(&p, PchInput::Content(&content[..2 * 13 * dc]), &s, MaskKind::Causal, None).is_ok());
    let err = forward(&p, PchInput::Ids(&[1, 2]), &shape(&[2], 2), MaskKind::Causal, None).unwrap_err();
    assert!(is_input_error(&err) && err.to_string().contains("input = \"content\""), "{err}");
}

#[test]
fn dropout_uses_the_rng_only_when_on() {
    let s = shape(&[5, 3], 5);
    let eval_cfg = cfg();
    let content = uniform(s.rows() * eval_cfg.d_content, 10);
    let eval = PchParams::<f32>::init(&eval_cfg, 11).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let untouched = rng.clone();
    let (a, _) = forward(&eval, PchInput::Content(&content), &s, MaskKind::Causal, Some(&mut rng)).unwrap();
    assert_eq!(rng, untouched, "dropout 0 must not draw");

    let train = PchParams::<f32>::init(&PchConfig { dropout: 0.25, ..eval_cfg }, 11).unwrap();
    let (b, _) = forward(&train, PchInput::Content(&content), &s, MaskKind::Causal, None).unwrap();
    assert_eq!(a, b, "without an RNG, dropout is off (evaluation mode)");
    let (c, _) = forward(&train, PchInput::Content(&content), &s, MaskKind::Causal, Some(&mut rng)).unwrap();
    assert_ne!(rng, untouched);
    assert!(a != c, "training-mode dropout changes the outputs");
    let mut again = ChaCha8Rng::seed_from_u64(12);
    let (d, _) = forward(&train, PchInput::Content(&content), &s, MaskKind::Causal, Some(&mut again)).unwrap();
    assert_eq!(c, d, "the same seed draws the same masks");
    assert_eq!(rng.next_u64(), again.next_u64(), "both runs drew the same amount");
}

#[test]
fn a_reused_cache_gives_the_same_outputs_and_gradients() {
    let cfg = cfg();
    let p = PchParams::<f32>::init(&cfg, 13).unwrap();
    let mut cache = PchCache::default();
    for (lengths, len, seed) in [(vec![4, 2, 3], 4, 14), (vec![6], 6, 15), (vec![1, 3, 2], 4, 16)] {
        let s = shape(&lengths, len);
        let content = uniform(s.rows() * cfg.d_content, seed);
        let d_out = uniform(s.rows() * cfg.d_out, seed + 100);
        let (fresh, fresh_cache) = forward(&p, PchInput::Content(&content), &s, MaskKind::Causal, None).unwrap();
        let reused = forward_reusing(&p, PchInput::Content(&content), &s, MaskKind::Causal, None, &mut cache).unwrap();
        assert_eq!(fresh, reused);
        let (mut g1, mut g2) = (p.zeros_like(), p.zeros_like());
        backward(&p, &fresh_cache, &d_out, &mut g1);
        backward(&p, &cache, &d_out, &mut g2);
        assert_eq!(g1, g2);
    }
}

#[test]
fn f32_agrees_with_f64() {
    let cfg = PchConfig { dropout: 0.1, ..cfg() };
    let p32 = PchParams::<f32>::init(&cfg, 17).unwrap();
    let p64 = p32.cast::<f64>();
    let s = shape(&[8, 5, 2], 8);
    let c32: Vec<f32> = uniform(s.rows() * cfg.d_content, 18).iter().map(|v| 3.0 * v).collect();
    let c64: Vec<f64> = c32.iter().map(|&v| v as f64).collect();
    let w32 = uniform(s.rows() * cfg.d_out, 19);
    let w64: Vec<f64> = w32.iter().map(|&v| v as f64).collect();
    let mut r32 = ChaCha8Rng::seed_from_u64(20);
    let mut r64 = r32.clone();
    let (o32, k32) = forward(&p32, PchInput::Content(&c32), &s, MaskKind::Causal, Some(&mut r32)).unwrap();
    let (o64, k64) = forward(&p64, PchInput::Content(&c64), &s, MaskKind::Causal, Some(&mut r64)).unwrap();
    for (a, b) in o32.iter().zip(&o64) {
        assert!((*a as f64 - b).abs() < 2e-5, "{a} vs {b}");
    }
    let (mut g32, mut g64) = (p32.zeros_like(), p64.zeros_like());
    backward(&p32, &k32, &w32, &mut g32);
    backward(&p64, &k64, &w64, &mut g64);
    for ((name, _, a), (_, _, b)) in g32.tensors().zip(g64.tensors()) {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}");
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() <= 1e-3 * scale, "{name}: {x} vs {y} (scale {scale})");
        }
    }
}

#[test]
fn a_batch_of_empty_sequences_gives_zeros_and_no_gradient() {
    let cfg = cfg();
    let p = PchParams::<f32>::init(&cfg, 21).unwrap();
    let s = shape(&[0, 0], 3);
    let content = uniform(s.rows() * cfg.d_content, 22);
    let (out, cache) = forward(&p, PchInput::Content(&content), &s, MaskKind::Causal, None).unwrap();
    assert!(out.len() == s.rows() * cfg.d_out && out.iter().all(|&v| v == 0.0));
    let mut g = p.zeros_like();
    backward(&p, &cache, &uniform(out.len(), 23), &mut g);
    assert!(g.flat().iter().all(|&v| v == 0.0));
}
