//! Random Baichuan2-layout weights, written as one `model.safetensors` without holding the model in memory:
//! each tensor is generated when the writer asks for its bytes.
//!
//! Values: projections and embeddings ~ N(0, 0.02²) (the Hugging Face initialiser), norm weights 1.
//! Every tensor is split into fixed blocks, each drawn from its own ChaCha stream keyed by (seed, tensor,
//! block), so the file is the same whatever the thread count.

use crate::llm::config::LlmConfig;
use anyhow::{Result, anyhow};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::Path;

/// Element type of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitDtype {
    F32,
    F16,
    BF16,
}

impl InitDtype {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(crate::error::input(format!("--dtype {text:?}: expected f32, f16 or bf16"))),
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// The `torch_dtype` written in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        if self == Self::F32 { 4 } else { 2 }
    }
}

const BLOCK: usize = 1 << 16;
const STD: f32 = 0.02;

/// One tensor, generated on demand.
struct LazyTensor {
    shape: Vec<usize>,
    dtype: InitDtype,
    /// None: all ones (a norm weight); Some(stream): normal values from that stream.
    stream: Option<u64>,
    seed: u64,
}

impl LazyTensor {
    fn values(&self) -> Vec<f32> {
        let numel: usize = self.shape.iter().product();
        let Some(stream) = self.stream else {
            return vec![1.0; numel];
        };
        let normal = Normal::new(0.0f32, STD).unwrap_or_else(|_| unreachable!("0.02 is a valid std"));
        let mut out = vec![0.0f32; numel];
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(block, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream((stream << 32) | block as u64);
            for v in chunk {
                *v = normal.sample(&mut rng);
            }
        });
        out
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.values();
        let bytes = match self.dtype {
            InitDtype::F32 => bytemuck::cast_slice(&values).to_vec(),
            InitDtype::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            InitDtype::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        };
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The tensors of §2.1 (without `lm_head`), in file order: (name, shape, random?).
pub fn tensor_plan(config: &LlmConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let mut plan = vec![("model.embed_tokens.weight".to_string(), vec![v, d], true)];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        plan.push((format!("{p}.input_layernorm.weight"), vec![d], false));
        plan.push((format!("{p}.self_attn.W_pack.weight"), vec![3 * d, d], true));
        plan.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d], true));
        plan.push((format!("{p}.post_attention_layernorm.weight"), vec![d], false));
        plan.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d], true));
        plan.push((format!("{p}.mlp.up_proj.weight"), vec![f, d], true));
        plan.push((format!("{p}.mlp.down_proj.weight"), vec![d, f], true));
    }
    plan.push(("model.norm.weight".to_string(), vec![d], false));
    plan
}

/// Writes `model.safetensors` into `dir` (atomically: the library writes a temporary file and renames it).
pub fn write_random_weights(dir: &Path, config: &LlmConfig, dtype: InitDtype, seed: u64) -> Result<()> {
    let tensors: Vec<(String, LazyTensor)> = tensor_plan(config)
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape, random))| {
            (name, LazyTensor { shape, dtype, stream: random.then_some(index as u64), seed })
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors, None, &path)
        .map_err(|e| anyhow!("{}: cannot write ({e})", path.display()))?;
    // The library writes through a private temporary file (mode 0600); give the model the usual mode.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| anyhow!("{}: cannot set permissions ({e})", path.display()))
}
