//! The activation arena of [`super::GpuPch`]: one device allocation sized from the largest batch (rows
//! and sequences), carved into every buffer the forward keeps for the backward and the backward's scratch.
//!
//! Everything is row-major `[rows, ·]`: the masked attention reads q, k, v from the QKV projection and writes
//! its output and gradients in place, so no head-major copy is kept. Per packed row, with d = d_model,
//! f = d_ff, h = n_heads, c = d_content, o = d_out: each layer keeps 8·d + 2·f halves (x, the bias-free QKV
//! projection (3·d), ctx, xhat1, x1, xhat2; u, g) and h + 2 floats (lse, two rstd); the buffers all layers
//! share take c + 8·d + f + 2·o + 1 halves (input, last, dQKV (3·d), projection, head, backward gradients,
//! ones) and o + h + 1 floats, plus the reduction partials (at most 8 · multiprocessors · max(3·d, f)
//! floats) and the batch tables.

use crate::cuda::Gpu;
use crate::cuda::attention_train::AttnBatch;
use crate::cuda::memory::{Dev, DeviceBuffer, Layout};
use crate::pch::PchConfig;
use anyhow::Result;
use half::f16;

/// What one layer's forward keeps, all `[rows, ·]` packed.
pub(super) struct LayerActs {
    /// The layer input (the adaptor output for layer 0).
    pub x: Dev<f16>,
    /// The QKV projection `[rows, 3d]` without its bias, which the attention adds as it reads q, k, v.
    pub qkv: Dev<f16>,
    /// The attention's log-sum-exp per (row, head), for its backward.
    pub lse: Dev<f32>,
    /// The attention output `[rows, d]`: the output projection's input, and the causal backward's.
    pub ctx: Dev<f16>,
    pub xhat1: Dev<f16>,
    pub rstd1: Dev<f32>,
    pub x1: Dev<f16>,
    /// The up projection without its bias (the backward adds it again, as the GELU did), and the GELU output.
    pub u: Dev<f16>,
    pub g: Dev<f16>,
    pub xhat2: Dev<f16>,
    pub rstd2: Dev<f32>,
}

pub(super) struct Arena {
    _buffer: DeviceBuffer,
    pub valid: Dev<i32>,
    pub cu_seqlens: Dev<i32>,
    pub tiles: Dev<[i32; 2]>,
    /// Ones `[max_rows]`: bias gradients are `onesᵀ · dY` GEMMs, and the adaptor bias a rank-1 GEMM.
    pub ones: Dev<f16>,
    /// The packed content `[rows, d_content]` in fp16, the adaptor's input.
    pub input: Dev<f16>,
    pub layers: Vec<LayerActs>,
    /// The last layer's output, the head's input.
    pub last: Dev<f16>,
    /// The gradient of the QKV projection `[rows, 3d]`, which the attention backward writes (backward).
    pub dqkv: Dev<f16>,
    /// The output and down projections before their residual add (forward).
    pub proj: Dev<f16>,
    /// The head before normalisation, the outputs and their norms.
    pub z: Dev<f16>,
    pub out: Dev<f32>,
    pub norms: Dev<f32>,
    /// Backward: gradients of the head input, of the residual sums, of the projections' inputs.
    pub dz: Dev<f16>,
    pub d_res: Dev<f16>,
    pub d_mid: Dev<f16>,
    pub d_proj: Dev<f16>,
    pub dg: Dev<f16>,
    pub delta: Dev<f32>,
    /// Two-pass reduction partials, for the largest of the LayerNorm, GELU and L2 reductions.
    pub partials: Dev<f32>,
    pub max_rows: usize,
    pub max_seqs: usize,
}

/// Most 64-row attention tiles a batch of `rows` rows in `seqs` sequences can have.
pub(super) fn max_tiles(rows: usize, seqs: usize) -> usize {
    rows / 64 + seqs
}

impl Arena {
    pub fn new(gpu: &Gpu, cfg: &PchConfig, max_rows: usize, max_seqs: usize) -> Result<Self> {
        let (r, d, f, h, o) = (max_rows, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.d_out);
        // Every batch up to max_rows rows, split in two towers or not.
        let partials = gpu.max_reduction_blocks(r) * (3 * d).max(f).max(o);
        let mut plan = Layout::default();
        let (mut halves, mut floats) = (Vec::new(), Vec::new());
        let mut take_h = |plan: &mut Layout, n: usize| {
            halves.push((plan.take::<f16>(n), n));
            halves.len() - 1
        };
        let valid = plan.take::<i32>(r);
        let cu_seqlens = plan.take::<i32>(max_seqs + 1);
        let tiles = plan.take::<[i32; 2]>(max_tiles(r, max_seqs));
        let mut take_f = |plan: &mut Layout, n: usize| {
            floats.push((plan.take::<f32>(n), n));
            floats.len() - 1
        };
        let f_partials = take_f(&mut plan, partials);
        let (f_out, f_norms, f_delta) = (take_f(&mut plan, r * o), take_f(&mut plan, r), take_f(&mut plan, r * h));
        let layer_floats: Vec<[usize; 3]> =
            (0..cfg.n_layers).map(|_| [take_f(&mut plan, r * h), take_f(&mut plan, r), take_f(&mut plan, r)]).collect();
        let shared: Vec<usize> = [r, r * cfg.d_content, r * d, r * 3 * d, r * d, r * o, r * o, r * d, r * d, r * d]
            .into_iter()
            .chain([r * f])
            .map(|n| take_h(&mut plan, n))
            .collect();
        let layer_halves: Vec<Vec<usize>> = (0..cfg.n_layers)
            .map(|_| [d, 3 * d, d, d, d, f, f, d].into_iter().map(|w| take_h(&mut plan, r * w)).collect())
            .collect();
        let buffer = gpu.alloc(plan.bytes(), "the PCH activation arena")?;
        // NaN everywhere (0xff bytes in fp16 and fp32): a kernel that reads what no pass wrote shows in the
        // outputs instead of reading stale values.
        gpu.fill_bytes(buffer.all::<u8>(), 0xff)?;
        let hv = |i: usize| buffer.view::<f16>(halves[i].0, halves[i].1);
        let fv = |i: usize| buffer.view::<f32>(floats[i].0, floats[i].1);
        let layers = layer_halves
            .iter()
            .zip(&layer_floats)
            .map(|(hs, fs)| LayerActs {
                x: hv(hs[0]),
                qkv: hv(hs[1]),
                ctx: hv(hs[2]),
                xhat1: hv(hs[3]),
                x1: hv(hs[4]),
                u: hv(hs[5]),
                g: hv(hs[6]),
                xhat2: hv(hs[7]),
                lse: fv(fs[0]),
                rstd1: fv(fs[1]),
                rstd2: fv(fs[2]),
            })
            .collect();
        let s = |i: usize| hv(shared[i]);
        let arena = Arena {
            valid: buffer.view(valid, r),
            cu_seqlens: buffer.view(cu_seqlens, max_seqs + 1),
            tiles: buffer.view(tiles, max_tiles(r, max_seqs)),
            ones: s(0),
            input: s(1),
            layers,
            last: s(2),
            dqkv: s(3),
            proj: s(4),
            z: s(5),
            dz: s(6),
            d_res: s(7),
            d_mid: s(8),
            d_proj: s(9),
            dg: s(10),
            out: fv(f_out),
            norms: fv(f_norms),
            delta: fv(f_delta),
            partials: fv(f_partials),
            max_rows,
            max_seqs,
            _buffer: buffer,
        };
        gpu.upload(arena.ones, &vec![f16::ONE; r])?;
        Ok(arena)
    }

    /// Bytes of the arena.
    pub fn bytes(&self) -> usize {
        self._buffer.bytes()
    }

    /// The attention batch of a packed batch whose offsets and tiles are in the arena, every row causal.
    pub fn attn(&self, rows: usize, seqs: usize, heads: usize, num_tiles: usize) -> AttnBatch {
        AttnBatch { cu_seqlens: self.cu_seqlens, tiles: self.tiles, num_tiles, seqs, rows, heads, diagonal: rows }
    }
}
