//! The PCH tower (SPEC §3) on the GPU, forward and backward, against the CPU reference in `crate::pch`.
//!
//! Parameters live in one buffer in the canonical flat layout of [`PchParams`]: fp32 masters (LayerNorm and
//! bias kernels read them), their fp16 copy (the GEMMs' operands; `adam_step` refreshes it) and fp32
//! gradients, which the backward writes (each once, so nothing zeroes them between updates). A pass's
//! activations live in an [`Activations`] arena sized once for a largest batch, apart from the model.
//! Training runs its two towers as one pass: the user tower's sequences, then the item tower's, one set of
//! rows in one arena (`PackedBatch`), so each GEMM and kernel launches once for both. Only the valid
//! positions are computed, packed as the CPU reference packs them. Per layer:
//! ```text
//! qkv = x · Wqkvᵀ                      cuBLAS, kept without its bias
//! ctx = masked attention(qkv + bqkv)   reads q, k, v from qkv in place, adds the bias as it loads them
//! x1 = LN(x + ctx · Woutᵀ + bout)      cuBLAS, then LayerNorm with the residual and bias fused
//! g = gelu(x1 · Wupᵀ + bup)            cuBLAS, then the bias + GELU kernel
//! y = LN(x1 + g · Wdownᵀ + bdown)
//! ```
//! then `e = normalize(y · headᵀ + b)` in fp32. Every GEMM is fp16 in, fp32 accumulate.

mod arena;
mod backward;
mod layout;

pub use layout::GpuContent;

use super::Gpu;
use super::attention_train::{AttnBatch, Qkv, RowTensor};
use super::bucket::{PassShape, TowerShape};
use super::memory::{Dev, DeviceBuffer, Layout};
use crate::bail_input;
use crate::pch::params::{LayerTensors, Tensors, assemble};
use crate::pch::{InputKind, MaskKind, NORMALIZE_EPS, PchBatchShape, PchConfig, PchParams, Positions};
use anyhow::{Context, Result, ensure};
use arena::Arena;
use half::f16;
use layout::RowMap;

/// One tensor's place in the flat parameter layout.
#[derive(Clone, Copy, Debug)]
struct Slot {
    offset: usize,
    len: usize,
}

/// One layer's tensors, in canonical order.
type LayerSlots = LayerTensors<Slot>;

/// What the last forward pass ran, for the backward.
#[derive(Clone, Copy, Debug)]
struct Pass {
    /// The packed fp16 content the adaptor read: the arena's copy, or the caller's packed content, which
    /// must then stay as it is until the backward, as must the tables of `attn`.
    input: Dev<f16>,
    /// The batch's offsets, tiles and masks, and its rows.
    attn: AttnBatch,
    /// The first tower's rows: the backward's reductions sum them apart from the rest.
    split: usize,
}

/// A training pass whose tables are on the device already, where the trainer's staging put them with its
/// content: `content` `[rows, d_content]` fp16, and the sequence offsets and causal tiles of `shape` as
/// [`PassShape::tables`] builds them, which the kernels trust (so only the crate makes one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackedBatch {
    pub content: Dev<f16>,
    pub cu_seqlens: Dev<i32>,
    pub tiles: Dev<[i32; 2]>,
    pub shape: PassShape,
}

/// A PCH model on one GPU: parameters, their fp16 copy and gradients.
pub struct GpuPch {
    config: PchConfig,
    params: Dev<f32>,
    params16: Dev<f16>,
    grads: Dev<f32>,
    adaptor_w: Slot,
    adaptor_b: Slot,
    layers: Vec<LayerSlots>,
    head_w: Slot,
    head_b: Slot,
    _weights: DeviceBuffer,
}

/// The activations of one forward pass, kept for its backward: an arena for batches of at most `max_rows`
/// valid positions in `max_seqs` sequences, and what the last forward into it ran.
pub struct Activations {
    arena: Arena,
    pass: Option<Pass>,
    d_model: usize,
}

impl Activations {
    /// Bytes of the arena.
    pub fn bytes(&self) -> usize {
        self.arena.bytes()
    }

    /// Valid positions of the last forward pass (0 before the first).
    pub fn rows(&self) -> usize {
        self.pass.map_or(0, |p| p.attn.rows)
    }
}

impl GpuPch {
    /// Uploads `params` (gradients start at zero). Refuses what the kernels do not implement: dropout,
    /// learned positions, item-id input, heads other than 64 wide, widths that are not multiples of 8.
    pub fn new(gpu: &Gpu, params: &PchParams<f32>) -> Result<Self> {
        let cfg = params.config().clone();
        check_config(&cfg)?;
        let n = params.flat().len();
        let mut plan = Layout::default();
        let (p32, p16, g32) = (plan.take::<f32>(n), plan.take::<f16>(n), plan.take::<f32>(n));
        let weights = gpu.alloc(plan.bytes(), "the PCH parameters and gradients")?;
        let mut slots = Vec::new();
        let mut offset = 0;
        for (_, _, t) in params.tensors() {
            slots.push(Slot { offset, len: t.len() });
            offset += t.len();
        }
        // Grouped as the CPU model groups them; check_config refused every input without an adaptor bias.
        let Tensors { embed: adaptor_w, embed_b, layers, head_w, head_b, .. } = assemble(&cfg, slots.into_iter());
        let adaptor_b = embed_b.context("GPU PCH: a content model has an adaptor bias")?;
        let model = GpuPch {
            params: weights.view(p32, n),
            params16: weights.view(p16, n),
            grads: weights.view(g32, n),
            adaptor_w,
            adaptor_b,
            layers,
            head_w,
            head_b,
            config: cfg,
            _weights: weights,
        };
        gpu.upload(model.params, params.flat())?;
        let halves: Vec<f16> = params.flat().iter().map(|&v| f16::from_f32(v)).collect();
        gpu.upload(model.params16, &halves)?;
        gpu.fill_bytes(model.grads, 0)?;
        Ok(model)
    }

    pub fn config(&self) -> &PchConfig {
        &self.config
    }

    /// Bytes of the parameters, their fp16 copy and the gradients.
    pub fn bytes(&self) -> usize {
        self._weights.bytes()
    }

    /// The fp32 masters, their fp16 copy and the gradients, flat in [`PchParams`] order: what
    /// `Gpu::adam_step` updates.
    pub fn buffers(&self) -> (Dev<f32>, Dev<f16>, Dev<f32>) {
        (self.params, self.params16, self.grads)
    }

    /// An arena for the passes of batches of at most `max_rows` valid positions in `max_seqs` sequences.
    pub fn activations(&self, gpu: &Gpu, max_rows: usize, max_seqs: usize) -> Result<Activations> {
        ensure!(max_rows > 0 && max_seqs > 0, "GPU PCH: an arena for {max_rows} rows in {max_seqs} sequences");
        let arena = Arena::new(gpu, &self.config, max_rows, max_seqs)?;
        Ok(Activations { arena, pass: None, d_model: self.config.d_model })
    }

    /// Replaces the parameters (fp32 masters and their fp16 copy), as when a run resumes.
    pub fn upload_params(&self, gpu: &Gpu, params: &PchParams<f32>) -> Result<()> {
        ensure!(params.config() == &self.config, "GPU PCH: parameters of another model configuration");
        gpu.upload(self.params, params.flat())?;
        let halves: Vec<f16> = params.flat().iter().map(|&v| f16::from_f32(v)).collect();
        gpu.upload(self.params16, &halves)
    }

    /// The fp32 master parameters.
    pub fn download_params(&self, gpu: &Gpu) -> Result<PchParams<f32>> {
        let mut out = PchParams::zeros(&self.config)?;
        out.flat_mut().copy_from_slice(&gpu.download(self.params)?);
        Ok(out)
    }

    /// The last backward's gradients (zeros before the first), in the parameters' layout.
    pub fn download_grads(&self, gpu: &Gpu) -> Result<PchParams<f32>> {
        let mut out = PchParams::zeros(&self.config)?;
        out.flat_mut().copy_from_slice(&gpu.download(self.grads)?);
        Ok(out)
    }

    fn p32(&self, s: Slot) -> Dev<f32> {
        self.params.slice(s.offset, s.len)
    }

    fn p16(&self, s: Slot) -> Dev<f16> {
        self.params16.slice(s.offset, s.len)
    }

    fn grad(&self, s: Slot) -> Dev<f32> {
        self.grads.slice(s.offset, s.len)
    }

    /// Runs the model over a right-padded batch of content `[B, L, d_content]`: returns the outputs of the
    /// valid positions, packed in (sequence, position) order, `[rows, d_out]` fp32 (unit rows), and keeps
    /// the activations in `acts` for [`Self::backward`]. The result lives there until the next forward.
    pub fn forward(
        &self,
        gpu: &Gpu,
        acts: &mut Activations,
        content: GpuContent,
        shape: &PchBatchShape,
        mask: MaskKind,
    ) -> Result<Dev<f32>> {
        acts.pass = None;
        ensure!(acts.d_model == self.config.d_model, "GPU PCH: activations of another model");
        let cfg = &self.config;
        let (pass, map) = upload_batch(gpu, &acts.arena, cfg.d_content, cfg.n_heads, content, shape, mask)?;
        if let Some(map) = map {
            gpu.pack_rows(acts.arena.input, content, &map, cfg.d_content)?;
        }
        self.run_forward(gpu, acts, pass)
    }

    /// [`Self::forward`] over a packed batch whose content and tables the caller put on the device (and
    /// keeps there until the backward): the training step's two towers, whose tables arrive in its one
    /// staging copy.
    pub(crate) fn forward_packed(&self, gpu: &Gpu, acts: &mut Activations, batch: &PackedBatch) -> Result<Dev<f32>> {
        acts.pass = None;
        ensure!(acts.d_model == self.config.d_model, "GPU PCH: activations of another model");
        let s = &batch.shape;
        let (max_rows, max_seqs) = (acts.arena.max_rows, acts.arena.max_seqs);
        if s.rows > max_rows || s.seqs > max_seqs {
            bail_input!(
                "GPU PCH: a batch of {} rows in {} sequences; the arena holds {max_rows} in {max_seqs}",
                s.rows,
                s.seqs
            );
        }
        ensure!(batch.content.len() == s.rows * self.config.d_content, "GPU PCH: packed content of another shape");
        let attn = AttnBatch {
            cu_seqlens: batch.cu_seqlens,
            tiles: batch.tiles,
            num_tiles: s.tiles,
            seqs: s.seqs,
            rows: s.rows,
            heads: self.config.n_heads,
            diagonal: s.diagonal,
        };
        self.run_forward(gpu, acts, Pass { input: batch.content, attn, split: s.split })
    }

    /// The forward pass proper, over tables and content already on the device.
    fn run_forward(&self, gpu: &Gpu, acts: &mut Activations, pass: Pass) -> Result<Dev<f32>> {
        let cfg = &self.config;
        let (d, f, o) = (cfg.d_model, cfg.d_ff, cfg.d_out);
        let attn = pass.attn;
        let (a, rows, eps) = (&acts.arena, attn.rows, cfg.ln_eps as f32);

        // Adaptor: x0 = fp16(bias + content · Wᵀ), the bias as a rank-1 product so that x0 is rounded once.
        let x0 = a.layers[0].x;
        gpu.blas.a_b(x0, a.ones, self.p16(self.adaptor_b), rows, d, 1, false)?;
        gpu.blas.a_bt(x0, pass.input, self.p16(self.adaptor_w), rows, d, cfg.d_content, true)?;

        for (l, (w, c)) in self.layers.iter().zip(&a.layers).enumerate() {
            gpu.blas.a_bt(c.qkv, c.x, self.p16(w.qkv_w), rows, 3 * d, d, false)?;
            let qkv = Qkv { proj: RowTensor::new(c.qkv, 3 * d), bias: Some(self.p32(w.qkv_b)) };
            gpu.masked_attention_fwd(RowTensor::new(c.ctx, d), c.lse, qkv, &attn)?;
            gpu.blas.a_bt(a.proj, c.ctx, self.p16(w.out_w), rows, d, d, false)?;
            let (nw, nb, bias) = (self.p32(w.attn_norm_w), self.p32(w.attn_norm_b), self.p32(w.out_b));
            gpu.layernorm_fwd(c.x1, c.xhat1, c.rstd1, c.x, Some(a.proj), Some(bias), nw, nb, rows, d, eps)?;
            gpu.blas.a_bt(c.u, c.x1, self.p16(w.up_w), rows, f, d, false)?;
            gpu.gelu_bias_fwd(c.g, c.u, self.p32(w.up_b), rows, f)?;
            gpu.blas.a_bt(a.proj, c.g, self.p16(w.down_w), rows, d, f, false)?;
            let y = a.layers.get(l + 1).map_or(a.last, |next| next.x);
            let (nw, nb, bias) = (self.p32(w.ffn_norm_w), self.p32(w.ffn_norm_b), self.p32(w.down_b));
            gpu.layernorm_fwd(y, c.xhat2, c.rstd2, c.x1, Some(a.proj), Some(bias), nw, nb, rows, d, eps)?;
        }

        gpu.blas.a_bt(a.z, a.last, self.p16(self.head_w), rows, o, d, false)?;
        let bias = Some(self.p32(self.head_b));
        gpu.l2norm_fwd(a.out, a.norms, a.z, bias, rows, o, NORMALIZE_EPS as f32)?;
        acts.pass = Some(pass);
        Ok(a.out.slice(0, rows * o))
    }
}

/// Checks a batch against the model's input width and the arena, and uploads its offsets and attention tiles
/// into the arena, and for padded content the row map that packs it, which it returns.
fn upload_batch(
    gpu: &Gpu,
    arena: &Arena,
    dc: usize,
    heads: usize,
    content: GpuContent,
    shape: &PchBatchShape,
    mask: MaskKind,
) -> Result<(Pass, Option<RowMap>)> {
    let (b, l) = (shape.batch, shape.len);
    if b == 0 || l == 0 || shape.lengths.len() != b {
        bail_input!("GPU PCH: a batch of {b} × {l} positions with {} lengths", shape.lengths.len());
    }
    if let Some(s) = shape.lengths.iter().position(|&n| n > l) {
        bail_input!("GPU PCH: sequence {s} has length {} beyond the padded length {l}", shape.lengths[s]);
    }
    let rows: usize = shape.lengths.iter().sum();
    let (max_rows, max_seqs) = (arena.max_rows, arena.max_seqs);
    if rows > max_rows || b > max_seqs {
        bail_input!("GPU PCH: a batch of {rows} positions in {b} sequences; the arena holds {max_rows} in {max_seqs}");
    }
    let (held, input) = (content.len(), arena.input.slice(0, rows * dc));
    let (input, packed) = match content {
        GpuContent::PackedF16(packed) if held == rows * dc => (packed, true),
        GpuContent::PackedF16(_) => {
            bail_input!("GPU PCH: packed content holds {held} values, expected {rows} rows × d_content {dc}")
        }
        _ if held != b * l * dc => {
            bail_input!("GPU PCH: content holds {held} values, expected {b} × {l} × d_content {dc}")
        }
        _ => (input, false),
    };
    // Positions numbered in the caller's padded layout, which padded content is stored in.
    let exact = TowerShape { len: l, ..TowerShape::exact(&shape.lengths) };
    let tables = exact.tables(&shape.lengths)?;
    gpu.upload(arena.cu_seqlens, &tables.cu_seqlens)?;
    gpu.upload(arena.tiles, &tables.tiles)?;
    let map = if packed {
        None
    } else {
        gpu.upload(arena.valid, &tables.valid)?;
        Some(RowMap { valid: arena.valid, rows, seqs: b, len: l })
    };
    let attn = arena.attn(rows, b, heads, exact.tiles).masked(mask);
    Ok((Pass { input, attn, split: rows }, map))
}

/// What the GPU tower implements; the rest is refused with the reason.
pub fn check_config(cfg: &PchConfig) -> Result<()> {
    cfg.validate()?;
    let hd = super::attention_train::MASKED_ATTENTION_HEAD_DIM;
    if cfg.input != InputKind::Content {
        bail_input!("the GPU PCH tower takes content embeddings only (input = \"content\"), not item ids");
    }
    if cfg.positions != Positions::None {
        bail_input!("the GPU PCH tower has no learned positions yet (positions = \"none\" only)");
    }
    if cfg.dropout != 0.0 {
        bail_input!("the GPU PCH tower has no dropout (dropout {} given, 0 only)", cfg.dropout);
    }
    if cfg.d_model != cfg.n_heads * hd {
        bail_input!("the GPU PCH tower needs heads of {hd}: d_model {} with {} heads", cfg.d_model, cfg.n_heads);
    }
    if [cfg.d_content, cfg.d_ff, cfg.d_out].iter().any(|w| !w.is_multiple_of(8)) {
        bail_input!(
            "the GPU PCH tower needs d_content ({}), d_ff ({}) and d_out ({}) to be multiples of 8",
            cfg.d_content,
            cfg.d_ff,
            cfg.d_out
        );
    }
    Ok(())
}
