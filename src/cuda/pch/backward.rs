//! The backward pass of [`GpuPch`], as src/pch/backward.rs (dropout 0, no positions, content input):
//! gradients of `Σ d_out · out` written (`=`) into the model's gradient buffer, each once, so that no pass
//! zeroes it first (the CPU reference accumulates, `+=`).
//!
//! Each layer's output gradient arrives as two fp16 halves, the residual path (`d_res`) and the projection
//! path (`d_proj`, the previous GEMM's input gradient), which the LayerNorm backward adds in fp32, so no pass
//! only sums them. Layer 0 adds its QKV input gradient onto `d_res` in the GEMM instead: the adaptor's
//! gradients need the sum itself.

use super::{Activations, GpuPch};
use crate::bail_input;
use crate::cuda::Gpu;
use crate::cuda::attention_train::{Qkv, RowTensor};
use crate::cuda::memory::Dev;
use crate::cuda::train_ops::RowSplit;
use crate::pch::NORMALIZE_EPS;
use anyhow::Result;

impl GpuPch {
    /// Adds to the gradient buffer the gradients of `Σ d_out · out` for the last [`Self::forward`] into
    /// `acts`, with `d_out` `[rows, d_out]` fp32 in that pass's packed order. Gradients are computed from the
    /// activations kept there, so a second call adds the same gradients again.
    pub fn backward(&self, gpu: &Gpu, acts: &Activations, d_out: Dev<f32>) -> Result<()> {
        let Some(pass) = acts.pass else { bail_input!("GPU PCH backward: no forward pass to differentiate") };
        let cfg = &self.config;
        let (d, f, o, rows) = (cfg.d_model, cfg.d_ff, cfg.d_out, pass.attn.rows);
        if d_out.len() != rows * o {
            bail_input!("GPU PCH backward: d_out holds {} values, expected {rows} × {o}", d_out.len());
        }
        let attn = pass.attn;
        // The reductions' rows: each tower's in blocks of their own.
        let split = RowSplit { rows, split: pass.split };
        let a = &acts.arena;
        let blas = &gpu.blas;

        // Head: normalisation (with the head bias), then the linear layer.
        let eps = NORMALIZE_EPS as f32;
        gpu.l2norm_bwd(a.dz, Some(self.grad(self.head_b)), d_out, a.out, a.norms, a.partials, split, o, eps)?;
        blas.at_b(self.grad(self.head_w), a.dz, a.last, o, d, rows)?;
        blas.a_b(a.d_res, a.dz, self.p16(self.head_w), rows, d, o, false)?;

        for (l, (w, c)) in self.layers.iter().zip(&a.layers).enumerate().rev() {
            // Feed-forward block: d_mid is the gradient of the second residual sum.
            let d_proj = (l + 1 < cfg.n_layers).then_some(a.d_proj);
            let (gw, gb, gbias) = (self.grad(w.ffn_norm_w), self.grad(w.ffn_norm_b), Some(self.grad(w.down_b)));
            let nw = self.p32(w.ffn_norm_w);
            gpu.layernorm_bwd(a.d_mid, gw, gb, gbias, a.d_res, d_proj, c.xhat2, c.rstd2, nw, a.partials, split, d)?;
            blas.at_b(self.grad(w.down_w), a.d_mid, c.g, d, f, rows)?;
            blas.a_b(a.dg, a.d_mid, self.p16(w.down_w), rows, f, d, false)?;
            gpu.gelu_bias_bwd(a.dg, self.grad(w.up_b), a.dg, c.u, self.p32(w.up_b), a.partials, split, f)?;
            blas.at_b(self.grad(w.up_w), a.dg, c.x1, f, d, rows)?;
            blas.a_b(a.d_proj, a.dg, self.p16(w.up_w), rows, d, f, false)?;

            // Attention block: d_res becomes the gradient of the first residual sum.
            let (gw, gb, gbias) = (self.grad(w.attn_norm_w), self.grad(w.attn_norm_b), Some(self.grad(w.out_b)));
            let nw = self.p32(w.attn_norm_w);
            let (xhat, rstd) = (c.xhat1, c.rstd1);
            gpu.layernorm_bwd(a.d_res, gw, gb, gbias, a.d_mid, Some(a.d_proj), xhat, rstd, nw, a.partials, split, d)?;
            blas.at_b(self.grad(w.out_w), a.d_res, c.ctx, d, d, rows)?;
            blas.a_b(a.d_proj, a.d_res, self.p16(w.out_w), rows, d, d, false)?;
            // The attention reads dout (d_proj), its output and the projection in place and writes dQKV.
            let qkv = Qkv { proj: RowTensor::new(c.qkv, 3 * d), bias: Some(self.p32(w.qkv_b)) };
            let (dqkv, dout, ctx) =
                (RowTensor::new(a.dqkv, 3 * d), RowTensor::new(a.d_proj, d), RowTensor::new(c.ctx, d));
            gpu.masked_attention_bwd(dqkv, a.delta, dout, ctx, qkv, c.lse, &attn)?;
            blas.at_b(self.grad(w.qkv_b), a.ones, a.dqkv, 1, 3 * d, rows)?;
            blas.at_b(self.grad(w.qkv_w), a.dqkv, c.x, 3 * d, d, rows)?;
            let (dst, add) = if l == 0 { (a.d_res, true) } else { (a.d_proj, false) };
            blas.a_b(dst, a.dqkv, self.p16(w.qkv_w), rows, d, 3 * d, add)?;
        }

        // The adaptor, from the full gradient of its output.
        blas.at_b(self.grad(self.adaptor_w), a.d_res, pass.input, d, cfg.d_content, rows)?;
        blas.at_b(self.grad(self.adaptor_b), a.ones, a.d_res, 1, d, rows)
    }
}
