//! The PCH tower on the GPU (src/cuda/pch) against the CPU reference in f64 (src/pch): outputs and every
//! parameter's gradient on a small random model, for the causal and the diagonal mask, from fp32 and fp16
//! content, over a padded batch with a length-1 sequence and one longer than an attention tile. The bar is
//! the for fp16: 1e-2 relative. Without a GPU each test says why and skips.

mod cuda_support;

use cuda_support::{assert_rel, f16s, gpu, rng, upload, widen};
use learn_kern::cuda::Gpu;
use learn_kern::cuda::pch::{GpuContent, GpuPch};
use learn_kern::pch::{self, MaskKind, PchBatchShape, PchConfig, PchInput, PchParams};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// d_model 128 in two heads of 64 (the attention kernels' head size), widths that are multiples of 8.
fn config() -> PchConfig {
    PchConfig { d_content: 96, d_model: 128, n_layers: 2, n_heads: 2, d_ff: 256, d_out: 64, ..PchConfig::base() }
}

/// BERT's initialisation plus noise on every tensor, so that biases and LayerNorm parameters are not the
/// zeros and ones a wrong index could hide behind, and attention is far from uniform.
fn random_params(cfg: &PchConfig, rng: &mut ChaCha8Rng) -> PchParams<f32> {
    let mut p = PchParams::init(cfg, rng.random()).unwrap();
    p.flat_mut().iter_mut().for_each(|v| *v += rng.random_range(-0.15..0.15));
    p
}

fn shape(rng: &mut ChaCha8Rng) -> PchBatchShape {
    let len = 70;
    let lengths = vec![len, 1, rng.random_range(2..len), 64, rng.random_range(1..=len)];
    PchBatchShape { batch: lengths.len(), len, lengths }
}

fn check(gpu: &Gpu, rng: &mut ChaCha8Rng, mask: MaskKind, half: bool) {
    let cfg = config();
    let params = random_params(&cfg, rng);
    let shape = shape(rng);
    let (b, l, o, dc) = (shape.batch, shape.len, cfg.d_out, cfg.d_content);
    let what = format!("{mask:?} mask, {} content, lengths {:?}", if half { "fp16" } else { "fp32" }, shape.lengths);
    let mut content: Vec<f32> = (0..b * l * dc).map(|_| rng.random_range(-1.0..1.0)).collect();
    if half {
        content = widen(&f16s(&content));
    }

    // The reference in f64.
    let p64 = params.cast::<f64>();
    let c64: Vec<f64> = content.iter().map(|&v| v as f64).collect();
    let (want_padded, cache) = pch::forward(&p64, PchInput::Content(&c64), &shape, mask, None).unwrap();
    let d_out: Vec<f64> = (0..b * l * o).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut want_grads = PchParams::<f64>::zeros(&cfg).unwrap();
    pch::backward(&p64, &cache, &d_out, &mut want_grads);

    // The GPU, with NaN in every gradient before the backward: it must write each one, not add to it.
    let rows: usize = shape.lengths.iter().sum();
    let model = GpuPch::new(gpu, &params).unwrap();
    let mut acts = model.activations(gpu, rows + 13, b + 1).unwrap();
    let (_c, content_dev) = if half {
        let (buf, view) = upload(gpu, &f16s(&content));
        (buf, GpuContent::F16(view))
    } else {
        let (buf, view) = upload(gpu, &content);
        (buf, GpuContent::F32(view))
    };
    let out = model.forward(gpu, &mut acts, content_dev, &shape, mask).unwrap();
    let got: Vec<f64> = gpu.download(out).unwrap().iter().map(|&v| v as f64).collect();
    let want: Vec<f64> = shape.valid_rows().flat_map(|r| want_padded[r * o..(r + 1) * o].to_vec()).collect();
    assert_rel(&got, &want, 1e-2, &format!("{what}: outputs"));

    let packed: Vec<f32> =
        shape.valid_rows().flat_map(|r| d_out[r * o..(r + 1) * o].iter().map(|&v| v as f32)).collect();
    let (_d, d_out_dev) = upload(gpu, &packed);
    gpu.fill_bytes(model.buffers().2, 0xff).unwrap();
    model.backward(gpu, &acts, d_out_dev).unwrap();
    let got_grads = model.download_grads(gpu).unwrap();
    for ((name, _, got), (_, _, want)) in got_grads.tensors().zip(want_grads.tensors()) {
        let got: Vec<f64> = got.iter().map(|&g| g as f64).collect();
        assert_rel(&got, want, 1e-2, &format!("{what}: d {name}"));
    }

    // The same batch given as packed fp16 rows (what training gathers) computes the same bits.
    if half {
        let packed_content: Vec<f32> =
            shape.valid_rows().flat_map(|r| content[r * dc..(r + 1) * dc].to_vec()).collect();
        let (_p, packed_dev) = upload(gpu, &f16s(&packed_content));
        let grads_padded = gpu.download(model.buffers().2).unwrap();
        let out_padded = gpu.download(out).unwrap();
        let mut acts2 = model.activations(gpu, rows, b).unwrap();
        let out2 = model.forward(gpu, &mut acts2, GpuContent::PackedF16(packed_dev), &shape, mask).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&gpu.download(out2).unwrap()), bits(&out_padded), "{what}: packed content outputs");
        gpu.fill_bytes(model.buffers().2, 0xff).unwrap();
        model.backward(gpu, &acts2, d_out_dev).unwrap();
        assert_eq!(bits(&gpu.download(model.buffers().2).unwrap()), bits(&grads_padded), "{what}: packed gradients");
    }
}

#[test]
fn forward_and_gradients_match_the_cpu_for_both_masks() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("cuda_pch");
    for mask in [MaskKind::Causal, MaskKind::Diagonal] {
        for half in [false, true] {
            check(&gpu, &mut rng, mask, half);
        }
    }
}

#[test]
fn what_the_gpu_tower_does_not_implement_is_refused() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("cuda_pch refusals");
    for cfg in [
        PchConfig { dropout: 0.1, ..config() },
        PchConfig { n_heads: 4, ..config() },
        PchConfig { positions: pch::Positions::Learned, max_len: Some(8), ..config() },
        PchConfig { d_content: 100, ..config() },
    ] {
        let params = random_params(&cfg, &mut rng);
        assert!(GpuPch::new(&gpu, &params).is_err(), "{cfg:?} was accepted");
    }
    let cfg = config();
    let model = GpuPch::new(&gpu, &random_params(&cfg, &mut rng)).unwrap();
    let mut acts = model.activations(&gpu, 16, 2).unwrap();
    let (_o, d_out) = upload(&gpu, &vec![0.0f32; 4 * cfg.d_out]);
    assert!(model.backward(&gpu, &acts, d_out).is_err(), "a backward before any forward");
    let shape = PchBatchShape { batch: 2, len: 4, lengths: vec![4, 0] };
    let (_c, content) = upload(&gpu, &vec![0.0f32; 2 * 4 * cfg.d_content]);
    let (_s, short) = upload(&gpu, &vec![0.0f32; 8 * cfg.d_content - 8]);
    assert!(model.forward(&gpu, &mut acts, GpuContent::F32(short), &shape, MaskKind::Causal).is_err(), "short content");
    let long = PchBatchShape { batch: 2, len: 4, lengths: vec![4, 5] };
    assert!(
        model.forward(&gpu, &mut acts, GpuContent::F32(content), &long, MaskKind::Causal).is_err(),
        "length beyond L"
    );
    let big = PchBatchShape { batch: 3, len: 4, lengths: vec![4, 4, 4] };
    let (_b, big_content) = upload(&gpu, &vec![0.0f32; 12 * cfg.d_content]);
    assert!(
        model.forward(&gpu, &mut acts, GpuContent::F32(big_content), &big, MaskKind::Causal).is_err(),
        "past the arena"
    );
    model.forward(&gpu, &mut acts, GpuContent::F32(content), &shape, MaskKind::Causal).unwrap();
    let (_w, wrong) = upload(&gpu, &vec![0.0f32; 3 * cfg.d_out]);
    assert!(model.backward(&gpu, &acts, wrong).is_err(), "d_out of the wrong length");
    model.backward(&gpu, &acts, d_out).unwrap();
}
