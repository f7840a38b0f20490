//! `learn-kern init-model`: random-weight models in the Baichuan2 layout, with a tokenizer, for tests,
//! demos and benchmarks (SPEC §1).

pub mod tokenizer;
pub mod weights;

use crate::embed::text::TextRecipe;
use crate::error::input;
use crate::fsutil::write_atomic;
use crate::llm::config::LlmConfig;
use anyhow::Result;
use std::path::Path;
use weights::InitDtype;

/// Lines added to the tokenizer corpus so common words outside the catalogue are whole pieces too.
const EXTRA_CORPUS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog while the customers compare reviews and prices.",
    "New arrivals this week: limited edition colours, free shipping on orders over 50 dollars.",
    "这款产品质量很好，价格实惠，物流很快，推荐购买。用户评价：非常满意，会再次回购。",
    "适合家庭使用，操作简单，节能环保，赠送精美包装。",
    "fn main() { println!(\"hello, world\"); } // code snippets show up in developer product pages",
];

/// Tokenizer size per preset: small enough for a quick random model, large enough to merge common words.
fn tokenizer_size(preset: &str) -> usize {
    match preset {
        "tiny" => 2048,
        "small" => 4096,
        _ => 8192,
    }
}

/// What was written.
pub struct InitReport {
    pub config: LlmConfig,
    pub dtype: InitDtype,
    pub tokenizer_vocab: usize,
}

/// Writes config.json, tokenizer.json and model.safetensors for `preset` into `out`.
pub fn init_model(out: &Path, preset: &str, seed: u64, dtype: InitDtype, overwrite: bool) -> Result<InitReport> {
    let base = LlmConfig::preset(preset)?;
    let weights_path = out.join("model.safetensors");
    if !overwrite && (weights_path.exists() || out.join("config.json").exists()) {
        return Err(input(format!("{}: already holds a model; use --overwrite to replace it", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| input(format!("{}: cannot create ({e})", out.display())))?;

    let mut corpus: Vec<String> = crate::demo::catalogue::generate(4000, seed)
        .iter()
        .filter_map(|item| item.record.as_object().map(|r| TextRecipe::Default.render(r)))
        .collect();
    corpus.extend(EXTRA_CORPUS.iter().map(|s| s.to_string()));
    let json = tokenizer::build_tokenizer_json(&corpus, tokenizer_size(preset).min(base.vocab_size))?;
    let tokenizer_vocab = tokenizers::Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| anyhow::anyhow!("generated tokenizer does not load: {e}"))?
        .get_vocab_size(true);
    // The real Baichuan2 shape keeps its 125,696-row embedding; the small presets size it to the tokenizer.
    let vocab = if preset == "baichuan2-7b" { base.vocab_size } else { tokenizer_vocab };
    let mut config = base.with_vocab_size(vocab);
    config.torch_dtype = Some(dtype.torch_name().to_string());

    write_atomic(&out.join("tokenizer.json"), json.as_bytes())?;
    weights::write_random_weights(out, &config, dtype, seed)?;
    // config.json last: a directory with a config but no weights would look like a broken model.
    write_atomic(&out.join("config.json"), config.to_json().as_bytes())?;
    Ok(InitReport { config, dtype, tokenizer_vocab })
}
