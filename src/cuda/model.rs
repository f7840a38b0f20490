//! The Baichuan2 forward pass on the GPU (SPEC §2.2), over packed variable-length batches, ending in the
//! fused final norm + mean pool + L2 normalisation (§2.3).
//!
//! Weights live in one device buffer in fp16 (converted on load from the checkpoint's bf16 or f32, on the
//! device), except the norm vectors, which stay fp32 (a few KB). Activations live in an [`Activations`]
//! arena sized once from the largest batch (`--batch-tokens`); a batch allocates nothing. Per layer:
//! ```text
//! h = rmsnorm(x += delta) · w_in        fused residual add (the previous layer's down_proj output)
//! qkv = h · W_packᵀ                      cuBLAS, [T, 3D]
//! rope(q, k)                             in place, fp32 angles from a table built at load
//! attn = causal varlen attention         tensor cores (WMMA), online softmax
//! delta = attn · o_projᵀ                 cuBLAS
//! h = rmsnorm(x += delta) · w_post
//! gate_up = h · [gate; up]ᵀ              one cuBLAS GEMM against the stacked [2F, D] weights
//! act = silu(gate) · up
//! delta = act · downᵀ                    cuBLAS; added to x by the next norm
//! ```
//! The residual stream x is fp32; every other activation is fp16.

use super::Gpu;
use super::memory::{Dev, DeviceBuffer, Layout};
use super::ops::HEAD_DIMS;
use crate::error::input;
use crate::llm::{Llm, LlmConfig, WeightDtype};
use anyhow::{Result, bail};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};

/// One transformer block on the device.
struct Layer {
    ln_in: Dev<f32>,
    w_pack: Dev<f16>,
    o_proj: Dev<f16>,
    ln_post: Dev<f32>,
    /// gate_proj rows then up_proj rows: `[2F, D]`.
    gate_up: Dev<f16>,
    down: Dev<f16>,
}

/// The model's weights on one GPU.
pub struct GpuModel {
    pub config: LlmConfig,
    embed: Dev<f16>,
    layers: Vec<Layer>,
    norm: Dev<f32>,
    /// (cos, sin) for positions 0 .. max_position_embeddings.
    rope: Dev<[f32; 2]>,
    weights: DeviceBuffer,
}

/// A batch's inputs on the device: packed ids, per-token positions, sequence offsets, attention tiles.
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    pub ids: Dev<u32>,
    pub positions: Dev<i32>,
    pub cu_seqlens: Dev<i32>,
    pub tiles: Dev<[i32; 2]>,
    pub tokens: usize,
    pub seqs: usize,
    pub num_tiles: usize,
}

/// Elements of every buffer, and their offsets in the weight buffer.
struct WeightLayout {
    layout: Layout,
    embed: usize,
    layers: Vec<[usize; 6]>,
    norm: usize,
    rope: usize,
}

impl WeightLayout {
    fn new(c: &LlmConfig) -> Self {
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let mut layout = Layout::default();
        let embed = layout.take::<f16>(v * d);
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                [
                    layout.take::<f32>(d),
                    layout.take::<f16>(3 * d * d),
                    layout.take::<f16>(d * d),
                    layout.take::<f32>(d),
                    layout.take::<f16>(2 * f * d),
                    layout.take::<f16>(d * f),
                ]
            })
            .collect();
        let norm = layout.take::<f32>(d);
        let rope = layout.take::<[f32; 2]>(c.max_position_embeddings * c.head_dim() / 2);
        WeightLayout { layout, embed, layers, norm, rope }
    }
}

/// Bytes of the device weights of a model of this shape (fp16 matrices, fp32 norms, the RoPE table).
pub fn weight_bytes(config: &LlmConfig) -> usize {
    WeightLayout::new(config).layout.bytes()
}

/// The shapes the kernels support; anything else is bad input naming the dimension.
pub fn check_config(c: &LlmConfig) -> Result<()> {
    let dh = c.head_dim();
    if !HEAD_DIMS.contains(&dh) {
        return Err(input(format!(
            "the CUDA engine supports head sizes {HEAD_DIMS:?}; this model's hidden_size / num_attention_heads is {dh}"
        )));
    }
    if !c.intermediate_size.is_multiple_of(8) || c.hidden_size > 8192 {
        return Err(input(format!(
            "the CUDA engine needs intermediate_size divisible by 8 and hidden_size ≤ 8192 (this model: {} and {})",
            c.intermediate_size, c.hidden_size
        )));
    }
    Ok(())
}

impl GpuModel {
    fn allocate(gpu: &Gpu, config: &LlmConfig) -> Result<Self> {
        check_config(config)?;
        let plan = WeightLayout::new(config);
        let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let weights = gpu.alloc(plan.layout.bytes(), "the model's fp16 weights")?;
        let layers = plan
            .layers
            .iter()
            .map(|o| Layer {
                ln_in: weights.view(o[0], d),
                w_pack: weights.view(o[1], 3 * d * d),
                o_proj: weights.view(o[2], d * d),
                ln_post: weights.view(o[3], d),
                gate_up: weights.view(o[4], 2 * f * d),
                down: weights.view(o[5], d * f),
            })
            .collect();
        let half = config.head_dim() / 2;
        let positions = config.max_position_embeddings;
        let model = GpuModel {
            config: config.clone(),
            embed: weights.view(plan.embed, v * d),
            layers,
            norm: weights.view(plan.norm, d),
            rope: weights.view(plan.rope, positions * half),
            weights,
        };
        gpu.rope_table(model.rope, positions, config.head_dim(), config.rope_theta as f32)?;
        Ok(model)
    }

    /// Bytes of device memory the weights take.
    pub fn bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Uploads the checkpoint behind `llm` (memory-mapped; read once), converting matrices to fp16 on the
    /// device, with a progress bar on stderr unless `quiet`.
    pub fn load(gpu: &Gpu, llm: &Llm, quiet: bool) -> Result<Self> {
        let model = Self::allocate(gpu, llm.config())?;
        let w = llm.weights();
        let mut matrices = vec![(&w.embed_tokens, model.embed)];
        for (dst, src) in model.layers.iter().zip(&w.layers) {
            gpu.upload(dst.ln_in, &src.input_layernorm)?;
            gpu.upload(dst.ln_post, &src.post_attention_layernorm)?;
            let f = src.gate_proj.numel();
            matrices.push((&src.w_pack, dst.w_pack));
            matrices.push((&src.o_proj, dst.o_proj));
            matrices.push((&src.gate_proj, dst.gate_up.slice(0, f)));
            matrices.push((&src.up_proj, dst.gate_up.slice(f, f)));
            matrices.push((&src.down_proj, dst.down));
        }
        gpu.upload(model.norm, &w.norm)?;
        let total: u64 = matrices.iter().map(|(t, _)| (t.numel() * t.dtype.size()) as u64).sum();
        let progress = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
        progress.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} weights → {msg} · {bytes_per_sec} · ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        progress.set_message(format!("cuda:{}", gpu.ordinal));
        let mut loader = Loader::new(gpu)?;
        for (tensor, dst) in matrices {
            loader.upload(gpu, w.bytes(tensor), tensor.dtype, dst, &tensor.name, &progress)?;
        }
        gpu.sync()?;
        progress.finish_and_clear();
        Ok(model)
    }

    /// A model of `config`'s shape with random weights made on the device (for `bench`: no files, no
    /// transfers). Scales keep activations O(1): projections uniform with variance 1/fan_in (W_pack's
    /// doubled so attention is not uniform), norm weights 1 ± 0.3, embeddings ±1.
    pub fn random(gpu: &Gpu, config: &LlmConfig, seed: u64) -> Result<Self> {
        let model = Self::allocate(gpu, config)?;
        let (d, f) = (config.hidden_size as f32, config.intermediate_size as f32);
        let spread = |fan_in: f32| 2.0 * (3.0 / fan_in).sqrt();
        let mut stream = 0u64;
        let mut seed_for = || {
            stream += 1;
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(stream)
        };
        gpu.fill_uniform_f16(model.embed, seed_for(), 0.0, 2.0)?;
        for layer in &model.layers {
            gpu.fill_uniform_f32(layer.ln_in, seed_for(), 1.0, 0.6)?;
            gpu.fill_uniform_f16(layer.w_pack, seed_for(), 0.0, 2.0 * spread(d))?;
            gpu.fill_uniform_f16(layer.o_proj, seed_for(), 0.0, spread(d))?;
            gpu.fill_uniform_f32(layer.ln_post, seed_for(), 1.0, 0.6)?;
            gpu.fill_uniform_f16(layer.gate_up, seed_for(), 0.0, spread(d))?;
            gpu.fill_uniform_f16(layer.down, seed_for(), 0.0, spread(f))?;
        }
        gpu.fill_uniform_f32(model.norm, seed_for(), 1.0, 0.6)?;
        gpu.sync()?;
        Ok(model)
    }

    /// Runs the forward pass of `batch` on the compute stream, using `acts`; returns where the pooled,
    /// normalised embeddings (`[seqs, D]`, fp32) will be once the stream gets there. Nothing is synchronised.
    pub fn forward(&self, gpu: &Gpu, acts: &Activations, batch: &Batch) -> Result<Dev<f32>> {
        let c = &self.config;
        let (t, d, f) = (batch.tokens, c.hidden_size, c.intermediate_size);
        let (heads, dh) = (c.num_attention_heads, c.head_dim());
        let eps = c.rms_norm_eps as f32;
        if t > acts.max_tokens || batch.seqs > t {
            bail!(
                "internal: a batch of {t} tokens in {} sequences exceeds the arena's {}",
                batch.seqs,
                acts.max_tokens
            );
        }
        let x = acts.x.slice(0, t * d);
        let h = acts.h.slice(0, t * d);
        let delta = acts.delta.slice(0, t * d);
        let qkv = acts.big.cast::<f16>().slice(0, t * 3 * d);
        let gate_up = acts.big.cast::<f16>().slice(0, t * 2 * f);
        let attn = acts.mid.cast::<f16>().slice(0, t * d);
        let act = acts.mid.cast::<f16>().slice(0, t * f);

        gpu.embedding_gather(x, self.embed, batch.ids, t, d)?;
        for (l, layer) in self.layers.iter().enumerate() {
            gpu.rmsnorm_residual(x, (l > 0).then_some(delta), layer.ln_in, h, t, d, eps)?;
            gpu.gemm(qkv, h, layer.w_pack, t, 3 * d, d)?;
            gpu.rope_apply(qkv, self.rope, batch.positions, t, 2 * heads, dh, 3 * d)?;
            gpu.attention(qkv, attn, batch.cu_seqlens, batch.tiles, batch.num_tiles, batch.seqs, heads, dh, t)?;
            gpu.gemm(delta, attn, layer.o_proj, t, d, d)?;
            gpu.rmsnorm_residual(x, Some(delta), layer.ln_post, h, t, d, eps)?;
            gpu.gemm(gate_up, h, layer.gate_up, t, 2 * f, d)?;
            gpu.swiglu(act, gate_up, t, f)?;
            gpu.gemm(delta, act, layer.down, t, d, f)?;
        }
        // The pooled rows reuse the bytes of qkv / gate_up, dead by now ([S, D] fp32 ≤ [T, 3D] fp16).
        let pooled = acts.big.cast::<f32>().slice(0, batch.seqs * d);
        let last = (!self.layers.is_empty()).then_some(delta);
        gpu.final_norm_pool(pooled, x, last, self.norm, batch.cu_seqlens, batch.seqs, t, d, eps)?;
        Ok(pooled)
    }
}

/// Uploads checkpoint matrices in chunks through one device staging buffer, converting to fp16 there.
struct Loader {
    staging: DeviceBuffer,
    flag: DeviceBuffer,
}

/// Bytes per upload: large enough to run at transfer speed, small enough to move the progress bar.
const CHUNK: usize = 64 << 20;

impl Loader {
    fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Loader { staging: gpu.alloc(CHUNK, "weight staging")?, flag: gpu.alloc(4, "overflow flag")? })
    }

    fn upload(
        &mut self,
        gpu: &Gpu,
        bytes: &[u8],
        dtype: WeightDtype,
        dst: Dev<f16>,
        name: &str,
        progress: &ProgressBar,
    ) -> Result<()> {
        let size = dtype.size();
        if bytes.len() != dst.len() * size {
            bail!("internal: tensor {name} holds {} bytes for {} elements", bytes.len(), dst.len());
        }
        let flag = self.flag.all::<u32>();
        gpu.upload(flag, &[0])?;
        let per_chunk = CHUNK / size;
        for (i, chunk) in bytes.chunks(per_chunk * size).enumerate() {
            let n = chunk.len() / size;
            let out = dst.slice(i * per_chunk, n);
            // Every copy and conversion is ordered on the compute stream, so a chunk never overwrites staging
            // that the previous chunk's conversion still reads.
            match dtype {
                WeightDtype::F16 => gpu.upload(out.cast::<u8>(), chunk)?,
                WeightDtype::BF16 => {
                    let staged = self.staging.view::<u8>(0, chunk.len());
                    gpu.upload(staged, chunk)?;
                    gpu.convert_bf16_f16(out, staged.cast::<u16>(), flag)?;
                }
                WeightDtype::F32 => {
                    let staged = self.staging.view::<u8>(0, chunk.len());
                    gpu.upload(staged, chunk)?;
                    gpu.convert_f32_f16(out, staged.cast::<f32>(), flag)?;
                }
            }
            progress.inc(chunk.len() as u64);
        }
        if dtype != WeightDtype::F16 && gpu.download(flag)?[0] != 0 {
            return Err(input(format!(
                "tensor {name} holds values beyond fp16's range (±65504), which the CUDA engine (fp16, as the V100 \
                 requires) cannot represent; use --device cpu"
            )));
        }
        Ok(())
    }
}

/// The activation arena: every intermediate of a forward pass for up to `max_tokens` tokens, plus the two
/// input slots of the encoder's double buffering, in one allocation.
pub struct Activations {
    pub max_tokens: usize,
    /// Residual stream `[T, D]` fp32.
    pub x: Dev<f32>,
    /// Normalised input of the next GEMM `[T, D]`.
    pub h: Dev<f16>,
    /// Output of o_proj / down_proj, added into x by the next norm `[T, D]`.
    pub delta: Dev<f16>,
    /// qkv `[T, 3D]`, then gate_up `[T, 2F]`, then the pooled output `[S, D]` fp32.
    pub big: Dev<u8>,
    /// attention output `[T, D]`, then the SwiGLU output `[T, F]`.
    pub mid: Dev<u8>,
    /// The encoder's two input slots.
    pub inputs: [Dev<u8>; 2],
    pub input_layout: InputLayout,
    buffer: DeviceBuffer,
}

/// Where a batch's inputs lie in an input slot (and in its pinned host mirror), in bytes.
#[derive(Clone, Copy, Debug)]
pub struct InputLayout {
    pub ids: usize,
    pub positions: usize,
    pub cu_seqlens: usize,
    pub tiles: usize,
    pub bytes: usize,
    pub max_tokens: usize,
}

impl InputLayout {
    pub fn new(max_tokens: usize) -> Self {
        let mut layout = Layout::default();
        let ids = layout.take::<u32>(max_tokens);
        let positions = layout.take::<i32>(max_tokens);
        // At most one sequence per token, and per sequence one tile per started 64 rows.
        let cu_seqlens = layout.take::<i32>(max_tokens + 1);
        let tiles = layout.take::<[i32; 2]>(max_tokens + max_tokens / super::ops::ATTENTION_TILE + 1);
        InputLayout { ids, positions, cu_seqlens, tiles, bytes: layout.bytes(), max_tokens }
    }

    /// The views of a batch of `tokens` tokens in `seqs` sequences with `num_tiles` tiles in `slot`.
    pub fn batch(&self, slot: Dev<u8>, tokens: usize, seqs: usize, num_tiles: usize) -> Batch {
        Batch {
            ids: slot.slice(self.ids, tokens * 4).cast(),
            positions: slot.slice(self.positions, tokens * 4).cast(),
            cu_seqlens: slot.slice(self.cu_seqlens, (seqs + 1) * 4).cast(),
            tiles: slot.slice(self.tiles, num_tiles * 8).cast(),
            tokens,
            seqs,
            num_tiles,
        }
    }
}

/// The arena's plan for `max_tokens`: (layout, offsets of x, h, delta, big, mid, inputs 0 and 1).
fn arena_plan(c: &LlmConfig, max_tokens: usize) -> (Layout, [usize; 7], [usize; 2], InputLayout) {
    let (t, d, f) = (max_tokens, c.hidden_size, c.intermediate_size);
    let mut layout = Layout::default();
    let x = layout.take::<f32>(t * d);
    let h = layout.take::<f16>(t * d);
    let delta = layout.take::<f16>(t * d);
    let big_bytes = (t * 3 * d * 2).max(t * 2 * f * 2).max(t * d * 4);
    let mid_bytes = t * d.max(f) * 2;
    let big = layout.take::<u8>(big_bytes);
    let mid = layout.take::<u8>(mid_bytes);
    let inputs = InputLayout::new(max_tokens);
    let in0 = layout.take::<u8>(inputs.bytes);
    let in1 = layout.take::<u8>(inputs.bytes);
    (layout, [x, h, delta, big, mid, in0, in1], [big_bytes, mid_bytes], inputs)
}

/// Bytes of the activation arena for batches of up to `max_tokens` tokens.
pub fn arena_bytes(config: &LlmConfig, max_tokens: usize) -> usize {
    arena_plan(config, max_tokens).0.bytes()
}

impl Activations {
    /// Allocates the arena; running out of memory is an error naming the batch size and one that fits.
    pub fn new(gpu: &Gpu, config: &LlmConfig, max_tokens: usize) -> Result<Self> {
        let (layout, o, [big_bytes, mid_bytes], input_layout) = arena_plan(config, max_tokens);
        let buffer = match gpu.alloc(layout.bytes(), "the activation arena") {
            Ok(buffer) => buffer,
            Err(err) => {
                let Some(oom) = err.downcast_ref::<super::gpu::OutOfMemory>() else { return Err(err) };
                // The arena is linear in the token count: scale the request to the free memory, keeping 5%
                // for the driver, and round down to a multiple of 256 tokens.
                let per_token = arena_bytes(config, 1024) as f64 / 1024.0;
                let fits = ((oom.free as f64 * 0.95 / per_token) as usize) / 256 * 256;
                let advice = if fits >= 256 {
                    format!("try --batch-tokens {fits} (it must stay ≥ --max-tokens)")
                } else {
                    "too little is left after the weights for any batch; use a GPU with more memory".to_string()
                };
                bail!("{oom} for --batch-tokens {max_tokens} on cuda:{}: {advice}", gpu.ordinal);
            }
        };
        let d = config.hidden_size;
        let t = max_tokens;
        Ok(Activations {
            max_tokens,
            x: buffer.view(o[0], t * d),
            h: buffer.view(o[1], t * d),
            delta: buffer.view(o[2], t * d),
            big: buffer.view(o[3], big_bytes),
            mid: buffer.view(o[4], mid_bytes),
            inputs: [buffer.view(o[5], input_layout.bytes), buffer.view(o[6], input_layout.bytes)],
            input_layout,
            buffer,
        })
    }

    /// Bytes of the arena.
    pub fn bytes(&self) -> usize {
        self.buffer.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baichuan2_7b_fits_a_16_gb_v100_at_8192_tokens() {
        let c = LlmConfig::preset("baichuan2-7b").unwrap();
        let weights = weight_bytes(&c);
        let arena = arena_bytes(&c, 8192);
        // 6.74e9 parameters in fp16, the fp32 norms and a 2 MiB RoPE table.
        assert!((13.9e9..14.1e9).contains(&(weights as f64)), "{weights}");
        // x (fp32) + h + delta + max(qkv, gate_up) + max(attn, act) + 2 input slots.
        assert!((0.80e9..0.82e9).contains(&(arena as f64)), "{arena}");
        assert!(weights + arena + (32 << 20) < 15_000_000_000);
    }

    #[test]
    fn the_pooled_output_fits_where_it_is_written() {
        for preset in ["tiny", "small", "baichuan2-7b"] {
            let c = LlmConfig::preset(preset).unwrap();
            let (_, _, [big, _], _) = arena_plan(&c, 100);
            assert!(big >= 100 * c.hidden_size * 4, "{preset}");
            check_config(&c).unwrap();
        }
        let odd = LlmConfig { num_attention_heads: 16, ..LlmConfig::preset("tiny").unwrap() }; // head size 8
        assert!(crate::error::is_input_error(&check_config(&odd).unwrap_err()));
    }
}
