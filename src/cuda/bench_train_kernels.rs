//! `bench kernels --preset pch-*` (SPEC §7): each PCH training kernel at the shapes of one training step,
//! against its floor (super::bench_kernels). `bench train --profile` shows the same kernels inside a step;
//! this shows how close each one runs to its own floor.
//!
//! The batch is a full one: every user has `history` and `targets` items, both towers causal and packed in
//! one pass of `batch_users · (history + targets)` rows, as the training step runs them.

use super::Gpu;
use super::attention_train::{AttnBatch, MASKED_ATTENTION_HEAD_DIM, Qkv, RowTensor};
use super::bench_kernels::{KernelSet, KernelWork, Launch, kernels_report};
use super::infonce::{InfoNceLayout, Rows, infonce_scratch_len, infonce_weights};
use super::memory::{Dev, Layout};
use super::ops::{attention_tiles, packed_offsets};
use super::topk::plan;
use super::train_ops::{AdamStats, AdamStep};
use crate::cpu::infonce::LossPositions;
use crate::pch::{PchConfig, parameter_count};
use crate::train::optim::AdamConfig;
use anyhow::{Result, ensure};
use half::f16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// The batch the kernels run on, and the gallery the top-K ranks.
#[derive(Clone, Copy, Debug)]
pub struct TrainKernelShape {
    pub batch_users: usize,
    pub history: usize,
    pub targets: usize,
    /// Catalogue rows the top-K ranks the batch's users against.
    pub gallery: usize,
}

/// Cut-off of the top-K: the larger of eval's defaults (50, 100).
const TOP_K: usize = 100;
/// The training command's default temperature.
const TAU: f32 = 0.05;

/// `bench kernels` for a PCH preset on GPU `ordinal`: every training kernel, then the forward's GEMMs.
pub fn bench_train_kernels(ordinal: usize, preset: &str, c: &PchConfig, shape: TrainKernelShape) -> Result<Value> {
    let gpu = Gpu::open(ordinal)?;
    let (d, f, o) = (c.d_model, c.d_ff, c.d_out);
    let gemms = [
        ("gemm_adaptor", d, c.d_content),
        ("gemm_qkv", 3 * d, d),
        ("gemm_out", d, d),
        ("gemm_up", f, d),
        ("gemm_down", d, f),
        ("gemm_head", o, d),
    ];
    let batch = json!({
        "batch_users": shape.batch_users,
        "history": shape.history,
        "targets": shape.targets,
        "gallery": shape.gallery,
    });
    kernels_report(&gpu, preset, || train_kernels(&gpu, c, shape), &gemms, batch)
}

/// The training kernels of model `c` at `shape` on `gpu`, their inputs random. They run as a step runs
/// them, each reading what an earlier one wrote: the InfoNCE and the top-K the unit rows of l2norm_fwd, the
/// attention's backward its forward's output and lse.
pub fn train_kernels<'g>(gpu: &'g Gpu, c: &PchConfig, shape: TrainKernelShape) -> Result<KernelSet<'g>> {
    let TrainKernelShape { batch_users: b, history: h, targets: t, gallery } = shape;
    let (d, f, o, heads) = (c.d_model, c.d_ff, c.d_out, c.n_heads);
    ensure!(b > 0 && h > 0 && t > 0 && gallery > 0, "bench kernels: an empty batch or gallery");
    ensure!(
        c.head_dim() == MASKED_ATTENTION_HEAD_DIM,
        "bench kernels: heads of {} (the kernels take 64)",
        c.head_dim()
    );
    let lengths: Vec<usize> = [h, t].iter().flat_map(|&n| std::iter::repeat_n(n, b)).collect();
    let offsets = packed_offsets(&lengths);
    let rows = b * (h + t);
    let mut tiles = Vec::new();
    attention_tiles(&offsets, &mut tiles);
    let cu: Vec<i32> = offsets.iter().map(|&x| x as i32).collect();
    let params = parameter_count(c);
    // Every user's targets drawn from a catalogue of `gallery` items: some recur across users, so the
    // false-negative mask has bits to apply, as in real batches.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let target_ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..gallery) as u32).collect();
    let nce = InfoNceLayout::new(&vec![h; b], &vec![t; b], &target_ids, h, t, LossPositions::All, false, Rows::Packed)?;
    let topk_plan = plan(gpu.multiprocessors, b, gallery);
    let widest = (3 * d).max(f); // the QKV bias is the widest vector, or the FFN's

    let mut layout = Layout::default();
    // The [rows, d] halves: x, the residual branch, y, xhat, dy, a second dy, dx, the attention's output
    // and its gradient.
    let wide: [usize; 9] = std::array::from_fn(|_| layout.take::<f16>(rows * d));
    let at_qkv = [layout.take::<f16>(rows * 3 * d), layout.take::<f16>(rows * 3 * d)];
    // The [rows, f] halves: the pre-activation, the activation and its gradient, the pre-activation's.
    let ffn: [usize; 3] = std::array::from_fn(|_| layout.take::<f16>(rows * f));
    let at_lse = [layout.take::<f32>(rows * heads), layout.take::<f32>(rows * heads), layout.take::<f32>(rows)];
    // Seven parameter vectors (weights, biases, their gradients) and the reductions' partials.
    let at_vectors = layout.take::<f32>(7 * widest);
    let at_partials = layout.take::<f32>(gpu.partials_len(rows, widest, 3));
    let at_tables = [layout.take::<i32>(cu.len()), layout.take::<[i32; 2]>(tiles.len())];
    // The head: z and its gradient (fp16), the unit rows (users, then items) and their gradients, the norms.
    let at_head = [layout.take::<f16>(rows * o), layout.take::<f16>(rows * o)];
    let at_unit = [layout.take::<f32>(rows * o), layout.take::<f32>(rows * o), layout.take::<f32>(rows)];
    let nce_scratch_len = infonce_scratch_len(nce.q_row.len(), nce.c_row.len(), b, o);
    let at_nce = [
        layout.take::<u8>(nce.device_bytes()),
        layout.take::<f32>(2 + 1 + nce.q_row.len()), // weights, loss, lse
        layout.take::<f32>(nce_scratch_len),
    ];
    let at_adam = [
        layout.take::<f32>(4 * params), // params, m, v, gradients
        layout.take::<f16>(params),
        layout.take::<f64>(gpu.adam_scratch_len(params)),
        layout.take::<f32>(AdamStats::LEN + AdamStep::SCALARS),
    ];
    let at_topk = [layout.take::<f32>(gallery * o), layout.take::<u64>(b * TOP_K * (topk_plan.splits + 1))];
    let buffer = gpu.alloc(layout.bytes(), "kernel benchmark buffers")?;

    let [x, delta, y, xhat, dy, dy2, dx, ctx, dout] = wide.map(|at| buffer.view::<f16>(at, rows * d));
    let [qkv, dqkv] = at_qkv.map(|at| buffer.view::<f16>(at, rows * 3 * d));
    let [pre, act, dpre] = ffn.map(|at| buffer.view::<f16>(at, rows * f));
    let (lse, attn_delta, rstd) =
        (buffer.view(at_lse[0], rows * heads), buffer.view(at_lse[1], rows * heads), buffer.view(at_lse[2], rows));
    let vectors: Dev<f32> = buffer.view(at_vectors, 7 * widest);
    let [w, bias, bias2, dw, db, d_delta_bias, qkv_bias] = std::array::from_fn(|k| vectors.slice(k * widest, widest));
    let partials = buffer.view(at_partials, gpu.partials_len(rows, widest, 3));
    let (cu_dev, tiles_dev) = (buffer.view(at_tables[0], cu.len()), buffer.view(at_tables[1], tiles.len()));
    let [z, dz] = at_head.map(|at| buffer.view::<f16>(at, rows * o));
    let (unit, d_unit, norms) = (
        buffer.view::<f32>(at_unit[0], rows * o),
        buffer.view::<f32>(at_unit[1], rows * o),
        buffer.view(at_unit[2], rows),
    );
    let (users, items) = (unit.slice(0, b * h * o), unit.slice(b * h * o, b * t * o));
    let (d_users, d_items) = (d_unit.slice(0, b * h * o), d_unit.slice(b * h * o, b * t * o));
    let nce_dev = gpu.upload_infonce_layout(&nce, buffer.view(at_nce[0], nce.device_bytes()))?;
    let nce_scalars: Dev<f32> = buffer.view(at_nce[1], 3 + nce.q_row.len());
    let (weights, loss, nce_lse) =
        (nce_scalars.slice(0, 2), nce_scalars.slice(2, 1), nce_scalars.slice(3, nce.q_row.len()));
    let nce_scratch = buffer.view(at_nce[2], nce_scratch_len);
    let state: Dev<f32> = buffer.view(at_adam[0], 4 * params);
    let [p32, m, v, grads] = std::array::from_fn(|k| state.slice(k * params, params));
    let p16 = buffer.view(at_adam[1], params);
    let adam_scratch = buffer.view(at_adam[2], gpu.adam_scratch_len(params));
    let adam: Dev<f32> = buffer.view(at_adam[3], AdamStats::LEN + AdamStep::SCALARS);
    let (adam_stats, adam_scalars) = (adam.slice(0, AdamStats::LEN), adam.slice(AdamStats::LEN, AdamStep::SCALARS));
    let gallery_dev = buffer.view(at_topk[0], gallery * o);
    let keys: Dev<u64> = buffer.view(at_topk[1], b * TOP_K * (topk_plan.splits + 1));
    let (top, parts) = (keys.slice(0, b * TOP_K), keys.slice(b * TOP_K, b * TOP_K * topk_plan.splits));

    // Random inputs; the unit rows come from l2norm_fwd, which runs before the InfoNCE and the top-K read
    // them, and the attention's backward reads what its forward wrote.
    for (i, dst) in [qkv, x, delta, dy, dy2, dout, pre, act, z, p16].into_iter().enumerate() {
        gpu.fill_uniform_f16(dst, 40 + i as u64, 0.0, 2.0)?;
    }
    gpu.fill_uniform_f32(vectors, 50, 0.0, 0.2)?;
    gpu.fill_uniform_f32(w, 51, 1.0, 0.5)?;
    for (i, dst) in [p32, m, grads, gallery_dev, d_unit].into_iter().enumerate() {
        gpu.fill_uniform_f32(dst, 52 + i as u64, 0.0, 0.02)?;
    }
    gpu.fill_uniform_f32(v, 57, 1e-4, 1e-4)?;
    gpu.upload(cu_dev, &cu)?;
    gpu.upload(tiles_dev, &tiles)?;
    gpu.upload(weights, &infonce_weights(nce.pairs, 1.0)?)?;
    let adam_config = AdamConfig::default();
    gpu.upload(adam_scalars, &AdamStep { lr: 1e-4, t: 1, loss_scale: 1.0 }.scalars(&adam_config)?)?;

    let attn = AttnBatch {
        cu_seqlens: cu_dev,
        tiles: tiles_dev,
        num_tiles: tiles.len(),
        seqs: lengths.len(),
        rows,
        heads,
        diagonal: rows,
    };
    let qkv_in = Qkv { proj: RowTensor::new(qkv, 3 * d), bias: Some(qkv_bias.slice(0, 3 * d)) };
    let (ctx, dout) = (RowTensor::new(ctx, d), RowTensor::new(dout, d));
    let eps = c.ln_eps as f32;
    let pairs: usize = lengths.iter().map(|n| n * (n + 1) / 2).sum();
    let (rd, rf, ro, rh) = ((rows * d) as f64, (rows * f) as f64, (rows * o) as f64, (rows * heads) as f64);
    let (nq, nc) = (nce_dev.queries() as f64, nce_dev.columns() as f64);
    let bytes = KernelWork::bytes;
    // Each kernel: name, its least work (KernelWork) and the launch. The attention's backward counts its four
    // products (dV, dP, dQ, dK), not the scores it recomputes, and no bytes for its per-row delta scratch;
    // the InfoNCE four products (scores and dq, scores again and dc: no [B·H, B·T] matrix may be kept, so
    // the column gradients recompute the scores) and the embeddings and their gradients as bytes.
    let cases: Vec<(&'static str, KernelWork, Launch<'g>)> = vec![
        (
            "layernorm_fwd",
            bytes(rd * (2.0 + 2.0 + 2.0 + 2.0) + rows as f64 * 4.0),
            Box::new(move || gpu.layernorm_fwd(y, xhat, rstd, x, Some(delta), Some(bias), w, bias2, rows, d, eps)),
        ),
        (
            "layernorm_bwd",
            bytes(rd * (2.0 + 2.0 + 2.0 + 2.0) + rows as f64 * 4.0),
            Box::new(move || {
                gpu.layernorm_bwd(dx, dw, db, Some(d_delta_bias), dy, Some(dy2), xhat, rstd, w, partials, rows, d)
            }),
        ),
        ("gelu_bias_fwd", bytes(rf * (2.0 + 2.0)), Box::new(move || gpu.gelu_bias_fwd(act, pre, bias, rows, f))),
        (
            "gelu_bias_bwd",
            bytes(rf * (2.0 + 2.0 + 2.0)),
            Box::new(move || gpu.gelu_bias_bwd(dpre, db, act, pre, bias, partials, rows, f)),
        ),
        (
            "masked_attention_fwd",
            KernelWork { bytes: rd * (3.0 + 1.0) * 2.0 + rh * 4.0, flops: 4.0 * (d * pairs) as f64 },
            Box::new(move || gpu.masked_attention_fwd(ctx, lse, qkv_in, &attn)),
        ),
        (
            "masked_attention_bwd",
            KernelWork { bytes: rd * (3.0 + 1.0 + 1.0 + 3.0) * 2.0 + rh * 4.0, flops: 8.0 * (d * pairs) as f64 },
            Box::new(move || {
                gpu.masked_attention_bwd(RowTensor::new(dqkv, 3 * d), attn_delta, dout, ctx, qkv_in, lse, &attn)
            }),
        ),
        (
            "l2norm_fwd",
            bytes(ro * (2.0 + 4.0) + rows as f64 * 4.0),
            Box::new(move || gpu.l2norm_fwd(unit, norms, z, Some(bias), rows, o, 1e-12)),
        ),
        (
            "l2norm_bwd",
            bytes(ro * (4.0 + 4.0 + 2.0) + rows as f64 * 4.0),
            Box::new(move || gpu.l2norm_bwd(dz, Some(db), d_unit, unit, norms, partials, rows, o, 1e-12)),
        ),
        (
            "infonce",
            KernelWork { bytes: (nq + nc) * o as f64 * 4.0 * 2.0 + nq * 4.0, flops: 8.0 * nq * nc * o as f64 },
            Box::new(move || {
                let scratch = nce_scratch;
                gpu.infonce(&nce_dev, users, items, None, o, TAU, weights, loss, nce_lse, d_users, d_items, scratch)
            }),
        ),
        (
            // Two passes over the gradients (the norm before any update), one over the rest.
            "adam_step",
            bytes(params as f64 * (2.0 * 4.0 + 3.0 * 4.0 + 3.0 * 4.0 + 2.0)),
            Box::new(move || {
                gpu.adam_step(p32, m, v, p16, grads, adam_stats, adam_scratch, adam_scalars, &adam_config, Some(1.0))
            }),
        ),
        (
            "topk",
            KernelWork { bytes: ((b + gallery) * o * 4 + b * TOP_K * 8) as f64, flops: 2.0 * (b * gallery * o) as f64 },
            Box::new(move || {
                let parts = (topk_plan.splits > 1).then_some(parts);
                gpu.topk(top, parts, users.slice(0, b * o), gallery_dev, None, (b, gallery, o, TOP_K), topk_plan)
            }),
        ),
    ];
    Ok(KernelSet::new(cases, rows, lengths.len(), buffer))
}
