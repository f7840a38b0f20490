//! The whole CUDA embedding path against the CPU reference (SPEC §6: cosine ≥ 0.999 per embedding): the
//! `tiny` and `small` shapes with random weights scaled so every part of the model matters, the golden
//! fixtures (transformers' LlamaModel in f64), the pipelined submit/flush order, bad batches, running out of
//! memory, and `learn-kern embed --device cuda` end to end. Without a GPU each test says why and skips.

mod cuda_support;

use cuda_support::{binary, cosine, gpu, rng};
use learn_kern::cuda::encoder::CudaEncoder;
use learn_kern::cuda::model::GpuModel;
use learn_kern::embed::encoder::{ContentEncoder, CpuEncoder};
use learn_kern::error::is_input_error;
use learn_kern::llm::{Llm, LlmConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

/// SPEC §6: GPU vs CPU, per embedding.
const MIN_COSINE: f64 = 0.999;

/// The repository root: `LEARN_KERN_REPO` when the tests run from a copy (tools/gpu-check.sh), else the
/// directory they were built in.
fn repo() -> PathBuf {
    std::env::var_os("LEARN_KERN_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Random weights in the Baichuan2 layout, uniform and scaled so activations stay O(1) while attention is
/// sharp (W_pack doubled) and the residual branches move the result: with the N(0, 0.02²) weights of
/// init-model, attention is near uniform and a broken kernel could hide.
fn write_weights(path: &Path, config: &LlmConfig, dtype: Dtype, seed: u64) {
    let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let lin = |fan_in: usize| 2.0 * (3.0 / fan_in as f32).sqrt();
    let mut specs: Vec<(String, Vec<usize>, f32, f32)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, d], 0.0, 2.0),
        ("model.norm.weight".into(), vec![d], 1.0, 0.6),
    ];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        specs.push((format!("{p}input_layernorm.weight"), vec![d], 1.0, 0.6));
        specs.push((format!("{p}self_attn.W_pack.weight"), vec![3 * d, d], 0.0, 2.0 * lin(d)));
        specs.push((format!("{p}self_attn.o_proj.weight"), vec![d, d], 0.0, lin(d)));
        specs.push((format!("{p}post_attention_layernorm.weight"), vec![d], 1.0, 0.6));
        specs.push((format!("{p}mlp.gate_proj.weight"), vec![f, d], 0.0, lin(d)));
        specs.push((format!("{p}mlp.up_proj.weight"), vec![f, d], 0.0, lin(d)));
        specs.push((format!("{p}mlp.down_proj.weight"), vec![d, f], 0.0, lin(f)));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(_, shape, centre, spread)| {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| centre + spread * (rng.random::<f32>() - 0.5));
            match dtype {
                Dtype::BF16 => values.flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                _ => values.flat_map(f32::to_le_bytes).collect(),
            }
        })
        .collect();
    let views = specs
        .iter()
        .zip(&data)
        .map(|((name, shape, _, _), bytes)| (name.clone(), TensorView::new(dtype, shape.clone(), bytes).unwrap()));
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A model directory for `preset` with a small vocabulary and room for 512 positions.
fn model(preset: &str, dtype: Dtype, seed: u64) -> (tempfile::TempDir, Llm) {
    let config = LlmConfig { max_position_embeddings: 512, ..LlmConfig::preset(preset).unwrap() }.with_vocab_size(777);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_json()).unwrap();
    write_weights(&dir.path().join("model.safetensors"), &config, dtype, seed);
    let llm = Llm::load(dir.path()).unwrap();
    (dir, llm)
}

/// Sequences of random ids whose lengths straddle the attention tiles, plus random lengths.
fn sequences(rng: &mut ChaCha8Rng, vocab: u32, count: usize) -> Vec<Vec<u32>> {
    let fixed = [1usize, 2, 17, 63, 64, 65, 128, 129, 300, 512];
    (0..count)
        .map(|i| {
            let len = fixed.get(i).copied().unwrap_or_else(|| rng.random_range(1..=200));
            (0..len).map(|_| rng.random_range(0..vocab)).collect()
        })
        .collect()
}

fn assert_embeddings_agree(gpu: &[f32], cpu: &[f32], dim: usize, what: &str) {
    let mut worst = 1.0f64;
    for (i, (g, c)) in gpu.chunks_exact(dim).zip(cpu.chunks_exact(dim)).enumerate() {
        let cos = cosine(g, c);
        assert!(cos >= MIN_COSINE, "{what}: item {i}: cosine {cos}");
        worst = worst.min(cos);
    }
    eprintln!("{what}: {} items, worst cosine {worst:.6}", gpu.len() / dim);
}

#[test]
fn tiny_and_small_match_the_cpu_path() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("model");
    for (preset, dtype) in [("tiny", Dtype::F32), ("tiny", Dtype::BF16), ("small", Dtype::BF16)] {
        let (_dir, llm) = model(preset, dtype, rng.random());
        let d = llm.config().hidden_size;
        let seqs = sequences(&mut rng, 777, 40);
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let cpu = CpuEncoder { llm: &llm }.encode(&refs).unwrap();
        let mut encoder = CudaEncoder::load(0, &llm, 8192, true).unwrap();
        let got = encoder.encode(&refs).unwrap();
        assert_eq!(got.len(), cpu.len());
        assert_embeddings_agree(&got, &cpu, d, &format!("{preset} {dtype:?}"));
        // The model is not degenerate: distinct items are far apart, so agreement above means something.
        let mean_cross: f64 =
            (1..seqs.len()).map(|i| cosine(&cpu[(i - 1) * d..i * d], &cpu[i * d..(i + 1) * d])).sum::<f64>()
                / (seqs.len() - 1) as f64;
        assert!(mean_cross < 0.9, "{preset}: neighbouring items have mean cosine {mean_cross}");
    }
}

#[test]
fn queued_batches_come_back_in_order_and_unchanged() {
    let Some(_gpu) = gpu() else { return };
    let mut rng = rng("pipeline");
    let (_dir, llm) = model("tiny", Dtype::BF16, rng.random());
    let mut encoder = CudaEncoder::load(0, &llm, 4096, true).unwrap();
    let batches: Vec<Vec<Vec<u32>>> = (0..5)
        .map(|_| {
            let count = 7 + rng.random_range(0..5);
            sequences(&mut rng, 777, count)
        })
        .collect();
    let alone: Vec<Vec<f32>> =
        batches.iter().map(|b| encoder.encode(&b.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap()).collect();
    let mut returned = Vec::new();
    let mut done = Vec::new();
    for batch in &batches {
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        if encoder.submit(&refs, &mut done).unwrap() {
            returned.push(done.clone());
        }
    }
    assert_eq!(returned.len(), batches.len() - 1, "each submit hands back the batch before it");
    while encoder.flush(&mut done).unwrap() {
        returned.push(done.clone());
    }
    // The same batch through either slot runs the same kernels on the same data: bit for bit.
    assert_eq!(returned, alone);
}

#[test]
fn golden_fixtures_match_on_the_gpu() {
    let Some(_gpu) = gpu() else { return };
    for name in ["f32_single", "bf16_sharded"] {
        let dir = repo().join("tests/fixtures/embed").join(name);
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let llm = Llm::load(&dir).unwrap();
        let items = want["items"].as_array().unwrap();
        let seqs: Vec<Vec<u32>> = items
            .iter()
            .map(|item| item["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let got = CudaEncoder::load(0, &llm, 4096, true).unwrap().encode(&refs).unwrap();
        let expected: Vec<f32> = items
            .iter()
            .flat_map(|item| item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        assert_embeddings_agree(&got, &expected, llm.config().hidden_size, name);
    }
}

#[test]
fn bad_batches_are_input_errors_and_the_encoder_recovers() {
    let Some(_gpu) = gpu() else { return };
    let (_dir, llm) = model("tiny", Dtype::F32, 5);
    let mut encoder = CudaEncoder::load(0, &llm, 600, true).unwrap();
    let too_long = vec![3u32; 513];
    let cases: [(Vec<&[u32]>, &str); 4] = [
        (vec![&[1, 2], &[]], "sequence 1 of the batch has no tokens"),
        (vec![&[1, 777, 3]], "token id 777 at position 1 is outside the vocabulary of 777"),
        (vec![&too_long], "has 513 tokens, more than the model's 512 positions"),
        (vec![&[5; 400], &[6; 400]], "a batch of 800 tokens exceeds the 600"),
    ];
    for (seqs, want) in cases {
        let err = encoder.encode(&seqs).unwrap_err();
        assert!(is_input_error(&err) && err.to_string().contains(want), "{err}");
    }
    let ok = encoder.encode(&[&[1, 2, 3]]).unwrap();
    assert!(ok.iter().all(|v| v.is_finite()) && ok.len() == 128);
}

#[test]
fn running_out_of_memory_names_the_batch_size_and_one_to_try() {
    let Some(gpu) = gpu() else { return };
    let (_dir, llm) = model("tiny", Dtype::F32, 6);
    let model = GpuModel::load(&gpu, &llm, true).unwrap();
    let err = CudaEncoder::new(gpu, model, 1 << 28).err().expect("2^28 tokens cannot fit");
    let msg = err.to_string();
    assert!(msg.contains("out of device memory") && msg.contains("--batch-tokens 268435456"), "{msg}");
    assert!(msg.contains("try --batch-tokens"), "{msg}");
}

#[test]
fn embed_on_the_gpu_writes_the_store_the_cpu_writes() {
    let Some(_gpu) = gpu() else { return };
    let count = learn_kern::cuda::probe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(binary()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let model_dir = root.join("model");
    let model_arg = model_dir.to_str().unwrap();
    run(&["init-model", "--preset", "tiny", "--seed", "3", "--out", model_arg, "--quiet"]);
    // Same shapes as init-model wrote, sharper weights (see write_weights).
    let config = LlmConfig::from_file(&model_dir.join("config.json")).unwrap();
    write_weights(&model_dir.join("model.safetensors"), &config, Dtype::BF16, 11);
    let mut items = String::new();
    for item in learn_kern::demo::catalogue::generate(300, 4) {
        items += &format!("{}\n", item.record);
    }
    std::fs::write(root.join("items.jsonl"), items).unwrap();
    let items_arg = root.join("items.jsonl");
    let embed = |device: &str, out: &str| {
        let out_dir = root.join(out);
        run(&[
            "embed",
            "--model",
            model_arg,
            "--items",
            items_arg.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--dtype",
            "f32",
            "--batch-tokens",
            "2048",
            "--device",
            device,
        ]);
        learn_kern::embed::store::ContentStore::open(&out_dir).unwrap()
    };
    let cpu = embed("cpu", "cpu");
    let mut devices = vec!["cuda".to_string()];
    if count >= 2 {
        devices.push("cuda:0,1".into());
    } else {
        eprintln!("one GPU: --device cuda:0,1 is not exercised");
    }
    for device in devices {
        let store = embed(&device, &device.replace([':', ','], "_"));
        assert_eq!(store.ids, cpu.ids);
        assert!(store.meta["device"].as_str().unwrap().contains("cuda:0"));
        let d = store.dim();
        let (g, c): (Vec<f32>, Vec<f32>) =
            ((0..store.len()).flat_map(|r| store.row(r)).collect(), (0..cpu.len()).flat_map(|r| cpu.row(r)).collect());
        assert_embeddings_agree(&g, &c, d, &format!("embed --device {device}"));
    }
}

#[test]
fn benchmarks_refuse_the_emulator_in_one_sentence() {
    let Some(gpu) = gpu() else { return };
    if !gpu.is_emulated() {
        return; // on a GPU the benchmarks run (tools/gpu-check.sh)
    }
    for args in [
        &["bench", "embed", "--preset", "tiny"][..],
        &["bench", "train", "--preset", "pch-small"],
        &["bench", "kernels", "--preset", "tiny"],
        &["bench", "kernels", "--preset", "pch-small"],
    ] {
        let out = std::process::Command::new(binary()).args(args).env_remove("RUST_BACKTRACE").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("benchmarks need a GPU") && stderr.lines().count() == 1, "{args:?}: {stderr}");
    }
}
