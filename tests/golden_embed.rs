//! The CPU forward pass and pooling held to transformers.LlamaModel in float64, and the tokenizer to Python's,
//! on the fixtures that tools/golden/make_embed_fixtures.py writes (see there to regenerate them).

use learn_kern::llm::Llm;
use learn_kern::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Per-element tolerance against the float64 reference (SPEC §6 asks 1e-4 of the CPU in f32).
const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed").join(name)
}

fn expected(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn check_embeddings(name: &str, expect_bos: bool) {
    let dir = fixture(name);
    let want = expected(&dir);
    let llm = Llm::load(&dir).unwrap();
    let tok = TextTokenizer::load(&dir, want["max_tokens"].as_u64().unwrap() as usize).unwrap();
    let items = want["items"].as_array().unwrap();

    let mut seqs = Vec::new();
    for item in items {
        let ids = tok.encode(item["text"].as_str().unwrap()).unwrap();
        let py: Vec<u32> = item["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, py, "{name}: token ids of {:?}", item["text"]);
        assert_eq!(ids[0] == 1, expect_bos, "{name}: BOS of {:?}", item["text"]);
        seqs.push(ids);
    }
    assert!(seqs.iter().any(|s| s.len() == tok.max_tokens()), "{name}: no item reaches max_tokens");

    // One packed batch of every item.
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let got = llm.embed(&refs).unwrap();
    let mut worst = 0.0f64;
    for (item, e) in items.iter().zip(&got) {
        let r = floats(&item["embedding"]);
        assert_eq!(e.len(), r.len());
        let diff = e.iter().zip(&r).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        let cos = e.iter().zip(&r).map(|(a, b)| *a as f64 * b).sum::<f64>()
            / (e.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt() * r.iter().map(|b| b * b).sum::<f64>().sqrt());
        assert!(diff <= TOL, "{name}: {:?}: max abs difference {diff:e}", item["text"]);
        assert!(cos >= 1.0 - 1e-6, "{name}: {:?}: cosine {cos}", item["text"]);
        worst = worst.max(diff);
    }
    eprintln!("{name}: {} items, worst element difference {worst:e}", items.len());
}

#[test]
fn f32_single_file_with_bos_matches_llama_in_f64() {
    check_embeddings("f32_single", true);
}

#[test]
fn bf16_sharded_without_bos_matches_llama_in_f64() {
    check_embeddings("bf16_sharded", false);
}

#[test]
fn last_hidden_state_matches_llama_in_f64() {
    for name in ["f32_single", "bf16_sharded"] {
        let dir = fixture(name);
        let want = expected(&dir);
        let llm = Llm::load(&dir).unwrap();
        let hidden = &want["last_hidden_state"];
        let item = &want["items"][hidden["item"].as_u64().unwrap() as usize];
        let ids: Vec<u32> = item["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let rows = hidden["values"].as_array().unwrap();
        let d = llm.config().hidden_size;
        let y = llm.last_hidden_state(&ids).unwrap();
        assert_eq!((y.len(), rows.len()), (ids.len() * d, ids.len()));
        for (t, row) in rows.iter().enumerate() {
            for (c, r) in floats(row).iter().enumerate() {
                let got = y[t * d + c] as f64;
                // Hidden states are O(1) (the final norm's weights scale them), so 1e-4 is relative too.
                assert!((got - r).abs() <= TOL * r.abs().max(1.0), "{name}: token {t} dim {c}: {got} vs {r}");
            }
        }
    }
}
