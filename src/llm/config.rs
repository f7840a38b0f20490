//! The LLM's hyper-parameters, read from a Baichuan2-style `config.json` (SPEC §2.1) or taken from a preset.

use crate::error::input;
use anyhow::Result;
use serde_json::{Map, Value, json};
use std::path::Path;

/// Bounds far past any real model, so that sizes and operation counts derived from a config cannot overflow.
const MAX_WIDTH: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;
const MAX_COUNT: usize = 1 << 24;

#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// The dtype the checkpoint was saved in, as `config.json` states it; informational only, the weights
    /// files say what they hold.
    pub torch_dtype: Option<String>,
}

impl LlmConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| input(format!("{}: cannot read the model config ({e})", path.display())))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| input(format!("{origin}: not valid JSON ({e})")))?;
        let Value::Object(map) = value else {
            return Err(input(format!("{origin}: expected a JSON object")));
        };
        let size = |key: &str, max: usize| positive_int(&map, key, max, origin);
        let max_position_embeddings = if map.contains_key("max_position_embeddings") {
            size("max_position_embeddings", MAX_COUNT)?
        } else if map.contains_key("model_max_length") {
            size("model_max_length", MAX_COUNT)?
        } else {
            return Err(input(format!("{origin}: missing key \"max_position_embeddings\" (or \"model_max_length\")")));
        };
        // Transformers 5 writes `dtype` where older versions wrote `torch_dtype`.
        let torch_dtype = ["torch_dtype", "dtype"].iter().find_map(|k| map.get(*k)).and_then(Value::as_str);
        let config = LlmConfig {
            hidden_size: size("hidden_size", MAX_WIDTH)?,
            intermediate_size: size("intermediate_size", MAX_WIDTH)?,
            num_hidden_layers: size("num_hidden_layers", MAX_LAYERS)?,
            num_attention_heads: size("num_attention_heads", MAX_WIDTH)?,
            vocab_size: size("vocab_size", MAX_COUNT)?,
            rms_norm_eps: positive_float(&map, "rms_norm_eps", origin)?
                .ok_or_else(|| input(format!("{origin}: missing key \"rms_norm_eps\"")))?,
            max_position_embeddings,
            rope_theta: positive_float(&map, "rope_theta", origin)?.unwrap_or(10000.0),
            torch_dtype: torch_dtype.map(str::to_owned),
        };
        config.check(origin)?;
        Ok(config)
    }

    /// The relations between keys that the forward pass relies on.
    fn check(&self, origin: &str) -> Result<()> {
        let (d, h) = (self.hidden_size, self.num_attention_heads);
        if !d.is_multiple_of(h) {
            return Err(input(format!("{origin}: hidden_size {d} is not divisible by num_attention_heads {h}")));
        }
        if !(d / h).is_multiple_of(2) {
            return Err(input(format!(
                "{origin}: the head size hidden_size/num_attention_heads = {} must be even for rotary embeddings",
                d / h
            )));
        }
        Ok(())
    }

    /// The built-in shapes: `tiny` and `small` for tests and benchmarks, `baichuan2-7b` for the real model.
    pub fn preset(name: &str) -> Result<Self> {
        let (d, f, layers, heads, vocab) = match name {
            "tiny" => (128, 352, 2, 4, 4096),
            "small" => (512, 1376, 4, 8, 4096),
            "baichuan2-7b" => (4096, 11008, 32, 32, 125696),
            _ => return Err(input(format!("unknown model preset \"{name}\" (expected tiny, small or baichuan2-7b)"))),
        };
        Ok(LlmConfig {
            hidden_size: d,
            intermediate_size: f,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            vocab_size: vocab,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 4096,
            rope_theta: 10000.0,
            torch_dtype: None,
        })
    }

    /// The same shape with another vocabulary size (to fit a tokenizer).
    pub fn with_vocab_size(self, vocab_size: usize) -> Self {
        LlmConfig { vocab_size, ..self }
    }

    /// Checks a batch of token sequences against the model (non-empty, within the positions and the
    /// vocabulary) and writes their start offsets into `offsets`: `seqs.len() + 1` entries, the last the
    /// token count. Both the CPU and the CUDA forward pass take their batches through it.
    pub fn pack_offsets(&self, seqs: &[&[u32]], offsets: &mut Vec<usize>) -> Result<()> {
        let (vocab, positions) = (self.vocab_size, self.max_position_embeddings);
        offsets.clear();
        offsets.push(0);
        for (s, seq) in seqs.iter().enumerate() {
            if seq.is_empty() {
                return Err(input(format!("sequence {s} of the batch has no tokens")));
            }
            if seq.len() > positions {
                return Err(input(format!(
                    "sequence {s} of the batch has {} tokens, more than the model's {positions} positions",
                    seq.len()
                )));
            }
            if let Some((p, id)) = seq.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
                return Err(input(format!(
                    "sequence {s} of the batch: token id {id} at position {p} is outside the vocabulary of {vocab}"
                )));
            }
            offsets.push(offsets[s] + seq.len());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Floating-point operations per token in the linear layers of the forward pass (no head), counting a
    /// multiply-add as 2: W_pack (3D²), o_proj (D²), gate and up (2DF), down (DF) per layer. In f64, exact for
    /// any real model and free of overflow when multiplied by token counts.
    pub fn flops_per_token(&self) -> f64 {
        let (d, f) = (self.hidden_size as f64, self.intermediate_size as f64);
        2.0 * self.num_hidden_layers as f64 * (4.0 * d * d + 3.0 * d * f)
    }

    /// Attention's own operations for one sequence of `len` tokens: `q·kᵀ` and `p·v`, each `dh` multiply-adds
    /// per head and causal (query, key) pair, of which there are len·(len+1)/2.
    pub fn attention_flops(&self, len: usize) -> f64 {
        let pairs = len as f64 * (len as f64 + 1.0) / 2.0;
        self.num_hidden_layers as f64 * pairs * 4.0 * self.hidden_size as f64
    }

    /// Everything a sequence of `len` tokens costs: its linear layers and its attention.
    pub fn flops_per_sequence(&self, len: usize) -> f64 {
        len as f64 * self.flops_per_token() + self.attention_flops(len)
    }

    /// A stable 16-hex-digit hash of the parsed values (FNV-1a over a canonical text), for `meta.json`: two
    /// configs that compute the same function hash alike, whatever their key order or extra keys.
    pub fn fingerprint(&self) -> String {
        let canonical = format!(
            "hidden_size={};intermediate_size={};num_hidden_layers={};num_attention_heads={};vocab_size={};\
             rms_norm_eps={:?};max_position_embeddings={};rope_theta={:?};torch_dtype={}",
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.vocab_size,
            self.rms_norm_eps,
            self.max_position_embeddings,
            self.rope_theta,
            self.torch_dtype.as_deref().unwrap_or("")
        );
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in canonical.bytes() {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    /// A Baichuan2-style `config.json` for this shape.
    pub fn to_json(&self) -> String {
        let mut value = json!({
            "architectures": ["BaichuanForCausalLM"],
            "model_type": "baichuan",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_max_length": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
        });
        if let (Some(dtype), Value::Object(map)) = (&self.torch_dtype, &mut value) {
            map.insert("torch_dtype".into(), Value::String(dtype.clone()));
        }
        let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
        text.push('\n');
        text
    }
}

fn positive_int(map: &Map<String, Value>, key: &str, max: usize, origin: &str) -> Result<usize> {
    match map.get(key) {
        None => Err(input(format!("{origin}: missing key \"{key}\""))),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 && n <= max as u64 => Ok(n as usize),
            Some(n) if n > 0 => {
                Err(input(format!("{origin}: \"{key}\" = {n} is larger than any model (at most {max})")))
            }
            _ => Err(input(format!("{origin}: \"{key}\" must be a positive integer, found {v}"))),
        },
    }
}

fn positive_float(map: &Map<String, Value>, key: &str, origin: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            _ => Err(input(format!("{origin}: \"{key}\" must be a positive number, found {v}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;

    const BAICHUAN2_7B: &str = r#"{
      "_from_model_config": true, "architectures": ["BaichuanForCausalLM"],
      "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig"},
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
      "model_max_length": 4096, "model_type": "baichuan", "num_attention_heads": 32,
      "num_hidden_layers": 32, "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.29.2", "use_cache": true, "vocab_size": 125696
    }"#;

    #[test]
    fn parses_the_baichuan2_config_and_matches_the_preset() {
        let config = LlmConfig::from_json(BAICHUAN2_7B, "config.json").unwrap();
        assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(config.rope_theta, 10000.0);
        assert_eq!(config.head_dim(), 128);
        let preset = LlmConfig::preset("baichuan2-7b").unwrap();
        assert_eq!(LlmConfig { torch_dtype: None, ..config.clone() }, preset);
        // SPEC §2.1: about 12.95 GFLOP per token without the head.
        assert_eq!(preset.flops_per_token(), (2u64 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)) as f64);
        assert!((preset.flops_per_token() / 1e9 - 12.95).abs() < 0.01);
    }

    #[test]
    fn attention_flops_count_causal_pairs() {
        let c = LlmConfig::preset("tiny").unwrap();
        // One token sees itself only: one pair, 4·D flops in each of the 2 layers.
        assert_eq!(c.attention_flops(1), (2 * 4 * 128) as f64);
        assert_eq!(c.attention_flops(3), (2 * 6 * 4 * 128) as f64);
        assert_eq!(c.flops_per_sequence(3), 3.0 * c.flops_per_token() + c.attention_flops(3));
    }

    #[test]
    fn model_max_length_stands_in_for_max_position_embeddings() {
        let text = BAICHUAN2_7B.replace("\"max_position_embeddings\": 4096,", "");
        let text = text.replace("\"model_max_length\": 4096", "\"model_max_length\": 2048");
        assert_eq!(LlmConfig::from_json(&text, "c").unwrap().max_position_embeddings, 2048);
    }

    #[test]
    fn bad_configs_are_input_errors_naming_the_key() {
        let cases = [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            (&BAICHUAN2_7B.replace("\"hidden_size\": 4096,", ""), "missing key \"hidden_size\""),
            (&BAICHUAN2_7B.replace("\"vocab_size\": 125696", "\"vocab_size\": 0"), "\"vocab_size\" must be a positive"),
            (&BAICHUAN2_7B.replace("\"num_hidden_layers\": 32", "\"num_hidden_layers\": -3"), "\"num_hidden_layers\""),
            (&BAICHUAN2_7B.replace("\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 0"), "\"rms_norm_eps\""),
            (&BAICHUAN2_7B.replace("\"hidden_size\": 4096", "\"hidden_size\": 1e30"), "\"hidden_size\" must be"),
            (&BAICHUAN2_7B.replace("\"vocab_size\": 125696", "\"vocab_size\": 99999999999"), "larger than any model"),
            (&BAICHUAN2_7B.replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 24"), "not divisible"),
            (&BAICHUAN2_7B.replace("\"intermediate_size\": 11008", "\"intermediate_size\": \"big\""), "intermediate"),
        ];
        for (text, want) in cases {
            let err = LlmConfig::from_json(text, "m/config.json").unwrap_err();
            assert!(is_input_error(&err));
            let msg = err.to_string();
            assert!(msg.starts_with("m/config.json: ") && msg.contains(want), "{msg}");
        }
        let err = LlmConfig::from_file(Path::new("/nonexistent/config.json")).unwrap_err();
        assert!(is_input_error(&err) && err.to_string().contains("/nonexistent/config.json"));
        assert!(is_input_error(&LlmConfig::preset("huge").unwrap_err()));
    }

    #[test]
    fn to_json_round_trips_and_the_fingerprint_follows_the_values() {
        let tiny = LlmConfig::preset("tiny").unwrap().with_vocab_size(1000);
        let back = LlmConfig::from_json(&tiny.to_json(), "c").unwrap();
        assert_eq!(back, tiny);
        assert_eq!(back.fingerprint(), tiny.fingerprint());
        assert_eq!(tiny.fingerprint().len(), 16);
        // Key order and unknown keys do not matter; values do.
        let reordered = BAICHUAN2_7B.replace("\"_from_model_config\": true,", "\"extra\": [1, 2],");
        let a = LlmConfig::from_json(BAICHUAN2_7B, "a").unwrap();
        assert_eq!(LlmConfig::from_json(&reordered, "b").unwrap().fingerprint(), a.fingerprint());
        assert_ne!(a.clone().with_vocab_size(125697).fingerprint(), a.fingerprint());
        // Pinned (and recomputed with a few lines of Python FNV-1a over the same canonical text): stores
        // record the hash, so it must not change between versions.
        assert_eq!(LlmConfig::preset("small").unwrap().fingerprint(), "19266246fd85ee1b");
    }
}
