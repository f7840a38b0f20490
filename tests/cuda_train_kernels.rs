//! The PCH training kernels against the CPU reference (src/cpu, src/train/optim.rs), on fresh random inputs,
//! outputs poisoned (NaN) before the kernels write them with a guard after them that must survive; the
//! parameter gradients too, which the kernels write (`=`) where the reference's functions add (`+=`, from
//! zeros here). Without a GPU each test says why and skips.

mod cuda_support;

use cuda_support::{
    F16_HALF_ULP, F16_TINY, assert_close, assert_kernel_rows, f16_tol, f16s, gpu, poisoned, read, real_gpu, rng,
    uniform, upload, widen,
};
use half::f16;
use learn_kern::cpu;
use learn_kern::cpu::infonce::{InfoNceBatch, LossPositions, infonce};
use learn_kern::cpu::masked_attention::{Heads, MaskKind, Varlen};
use learn_kern::cuda::Gpu;
use learn_kern::cuda::attention_train::{AttnBatch, MASKED_ATTENTION_HEAD_DIM, Qkv, RowTensor};
use learn_kern::cuda::bench_kernels::time_kernels;
use learn_kern::cuda::bench_train_kernels::{TrainKernelShape, train_kernels};
use learn_kern::cuda::infonce::{INFONCE_WIDTHS, InfoNceLayout, Rows, infonce_weights};
use learn_kern::cuda::memory::{Dev, DeviceBuffer};
use learn_kern::cuda::ops::{attention_tiles, packed_offsets};
use learn_kern::cuda::train_ops::{AdamStats, AdamStep, RowSplit};
use learn_kern::pch::PchConfig;
use learn_kern::train::optim::{Adam, AdamConfig, clip_grad_norm};
use rand::RngExt;

fn f64s(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// `data` in a poisoned buffer: the guard after it shows whether a kernel that updates it in place wrote
/// past its end.
fn poisoned_with<T: bytemuck::Pod>(gpu: &Gpu, data: &[T]) -> (DeviceBuffer, Dev<T>) {
    let (buf, view) = poisoned::<T>(gpu, data.len());
    gpu.upload(view, data).unwrap();
    (buf, view)
}

/// An absolute tolerance of `rel` times the largest magnitude of `want`, plus fp16 rounding of each value.
fn scaled_f16_tol(want: &[f64], rel: f64) -> impl Fn(f64) -> f64 {
    let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
    move |w: f64| w.abs() * F16_HALF_ULP + rel * scale + F16_TINY
}

/// xhat = (v − mean)·rstd and y = xhat·w + b vanish by cancellation of terms of order 1, whose fp32 error
/// (≈ 1e-7 each, from the mean and rstd) is then absolute: a floor under the relative bound.
fn layernorm_tol(want: f64) -> f64 {
    f16_tol(1e-5)(want) + 2e-6
}

#[test]
fn layernorm_forward_and_backward_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("layernorm");
    // 136: one warp with idle lanes; 768: PCH-base; 1032: threads with idle lanes across several warps. The
    // row counts leave a partial last block in the two-pass reductions.
    for (rows, dim) in [(53, 136), (1000, 768), (77, 1032)] {
        let eps = 1e-12;
        let x = f16s(&uniform(&mut rng, rows * dim, 3.0).iter().map(|v| v + 0.7).collect::<Vec<_>>());
        let delta = f16s(&uniform(&mut rng, rows * dim, 2.0));
        let delta_bias = uniform(&mut rng, dim, 0.5);
        let w: Vec<f32> = (0..dim).map(|_| 0.5 + rng.random::<f32>()).collect();
        let b = uniform(&mut rng, dim, 0.3);
        let (_x, x_dev) = upload(&gpu, &x);
        let (_d, delta_dev) = upload(&gpu, &delta);
        let (_db, delta_bias_dev) = upload(&gpu, &delta_bias);
        let (_w, w_dev) = upload(&gpu, &w);
        let (_b, b_dev) = upload(&gpu, &b);
        let (y_buf, y) = poisoned::<f16>(&gpu, rows * dim);
        let (xhat_buf, xhat) = poisoned::<f16>(&gpu, rows * dim);
        let (rstd_buf, rstd) = poisoned::<f32>(&gpu, rows);
        gpu.layernorm_fwd(y, xhat, rstd, x_dev, Some(delta_dev), Some(delta_bias_dev), w_dev, b_dev, rows, dim, eps)
            .unwrap();
        let got_y = widen(&read(&gpu, &y_buf, y, "layernorm y"));
        let got_xhat = read(&gpu, &xhat_buf, xhat, "layernorm xhat");
        let got_rstd = read(&gpu, &rstd_buf, rstd, "layernorm rstd");

        // The same fp32 additions in the same order as the kernel, then the reference.
        let sum: Vec<f32> = (0..rows * dim).map(|i| x[i].to_f32() + delta[i].to_f32() + delta_bias[i % dim]).collect();
        let (mut want_y, mut want_xhat, mut want_rstd) =
            (vec![f32::NAN; rows * dim], vec![f32::NAN; rows * dim], vec![f32::NAN; rows]);
        cpu::layernorm::forward(&mut want_y, &mut want_xhat, &mut want_rstd, &sum, &w, &b, rows, dim, eps as f64);
        let what = format!("layernorm {rows}×{dim}");
        assert_close(&got_y, &f64s(&want_y), layernorm_tol, &format!("{what} y"));
        assert_close(&widen(&got_xhat), &f64s(&want_xhat), layernorm_tol, &format!("{what} xhat"));
        assert_close(&got_rstd, &f64s(&want_rstd), |w| 1e-5 * w.abs(), &format!("{what} rstd"));

        // Backward from the kernel's own saved state (the reference is given the same fp16 xhat).
        let dy = f16s(&uniform(&mut rng, rows * dim, 1.0));
        let dy2 = f16s(&uniform(&mut rng, rows * dim, 1.0));
        let (_dy, dy_dev) = upload(&gpu, &dy);
        let (_dy2, dy2_dev) = upload(&gpu, &dy2);
        // Every output poisoned: the parameter gradients are written, not added to.
        let (dx_buf, dx) = poisoned::<f16>(&gpu, rows * dim);
        let (dw_buf, dw) = poisoned::<f32>(&gpu, dim);
        let (db_buf, db) = poisoned::<f32>(&gpu, dim);
        let (dd_buf, dd) = poisoned::<f32>(&gpu, dim);
        let (_s, scratch) = poisoned::<f32>(&gpu, gpu.partials_len(rows, dim, 3));
        gpu.layernorm_bwd(dx, dw, db, Some(dd), dy_dev, Some(dy2_dev), xhat, rstd, w_dev, scratch, rows, dim).unwrap();
        let got_dx = widen(&read(&gpu, &dx_buf, dx, "layernorm dx"));

        let dy_sum: Vec<f32> = dy.iter().zip(&dy2).map(|(a, b)| a.to_f32() + b.to_f32()).collect();
        let (mut want_dx, mut want_dw, mut want_db, mut want_dd) =
            (vec![f32::NAN; rows * dim], vec![0.0; dim], vec![0.0; dim], vec![0.0; dim]);
        let xhat32 = widen(&got_xhat);
        cpu::layernorm::backward(&mut want_dx, &mut want_dw, &mut want_db, &dy_sum, &xhat32, &got_rstd, &w, rows, dim);
        cpu::linear::add_column_sums(&mut want_dd, &want_dx, rows, dim);
        let want_dx = f64s(&want_dx);
        assert_close(&got_dx, &want_dx, scaled_f16_tol(&want_dx, 1e-5), &format!("{what} dx"));
        // Sums over the rows in another grouping: fp32 rounding of about log2(rows) additions.
        let sum_tol = |w: f64| 1e-5 * (w.abs() + 1.0) * (rows as f64).sqrt();
        assert_close(&read(&gpu, &dw_buf, dw, "dw"), &f64s(&want_dw), sum_tol, &format!("{what} dw"));
        assert_close(&read(&gpu, &db_buf, db, "db"), &f64s(&want_db), sum_tol, &format!("{what} db"));
        assert_close(&read(&gpu, &dd_buf, dd, "d bias"), &f64s(&want_dd), sum_tol, &format!("{what} d delta bias"));
    }
}

#[test]
fn layernorm_without_residual_and_reductions_repeat_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("layernorm plain");
    let (rows, dim) = (300, 264);
    let x = f16s(&uniform(&mut rng, rows * dim, 2.0));
    let w: Vec<f32> = (0..dim).map(|_| 0.5 + rng.random::<f32>()).collect();
    let b = uniform(&mut rng, dim, 0.3);
    let (_x, x_dev) = upload(&gpu, &x);
    let (_w, w_dev) = upload(&gpu, &w);
    let (_b, b_dev) = upload(&gpu, &b);
    let (y_buf, y) = poisoned::<f16>(&gpu, rows * dim);
    let (_h, xhat) = poisoned::<f16>(&gpu, rows * dim);
    let (_r, rstd) = poisoned::<f32>(&gpu, rows);
    gpu.layernorm_fwd(y, xhat, rstd, x_dev, None, None, w_dev, b_dev, rows, dim, 1e-5).unwrap();
    let got = widen(&read(&gpu, &y_buf, y, "layernorm y"));
    let (mut want, mut want_xhat, mut want_rstd) = (vec![f32::NAN; rows * dim], vec![0.0; rows * dim], vec![0.0; rows]);
    cpu::layernorm::forward(&mut want, &mut want_xhat, &mut want_rstd, &widen(&x), &w, &b, rows, dim, 1e-5);
    assert_close(&got, &f64s(&want), layernorm_tol, "layernorm without residual");

    let dy = f16s(&uniform(&mut rng, rows * dim, 1.0));
    let (_dy, dy_dev) = upload(&gpu, &dy);
    let run_split = |split: RowSplit| {
        let (_dx, dx) = poisoned::<f16>(&gpu, rows * dim);
        let (_w, dw) = poisoned::<f32>(&gpu, dim);
        let (_b, db) = poisoned::<f32>(&gpu, dim);
        let (_s, scratch) = poisoned::<f32>(&gpu, gpu.partials_len(split, dim, 3));
        gpu.layernorm_bwd(dx, dw, db, None, dy_dev, None, xhat, rstd, w_dev, scratch, split, dim).unwrap();
        (gpu.download(dx).unwrap(), gpu.download(dw).unwrap(), gpu.download(db).unwrap())
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let run = || {
        let (dx, dw, db) = run_split(rows.into());
        (dx, bits(&dw), bits(&db))
    };
    let first = run();
    assert!(first.0.iter().all(|v| v.is_finite()));
    assert_eq!(first, run(), "the backward is not deterministic");
    // Rows split in two parts (a training pass's towers), each summed in blocks of its own: the same row
    // gradients, the same sums up to their order; a split beyond the rows is refused.
    for at in [0, 1, 100, 299] {
        let (dx, dw, db) = run_split(RowSplit { rows, split: at });
        assert_eq!(dx, first.0, "split at {at}: dx");
        let unsplit = |b: &[u32]| b.iter().map(|&x| f32::from_bits(x) as f64).collect::<Vec<_>>();
        assert_close(&dw, &unsplit(&first.1), |w| 1e-5 * (w.abs() + 1.0), &format!("split at {at}: dw"));
        assert_close(&db, &unsplit(&first.2), |w| 1e-5 * (w.abs() + 1.0), &format!("split at {at}: db"));
    }
    let (_s, scratch) = poisoned::<f32>(&gpu, gpu.partials_len(rows, dim, 3));
    let (_d, sums) = poisoned::<f32>(&gpu, dim);
    let beyond = RowSplit { rows, split: rows + 1 };
    assert!(gpu.layernorm_bwd(y, sums, sums, None, dy_dev, None, xhat, rstd, w_dev, scratch, beyond, dim).is_err());
}

#[test]
fn gelu_with_bias_matches_the_cpu_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("gelu");
    for (rows, cols) in [(37, 3072), (301, 40), (5, 2056)] {
        let u = f16s(&uniform(&mut rng, rows * cols, 5.0));
        let bias = uniform(&mut rng, cols, 1.0);
        let (pre_buf, pre) = poisoned_with(&gpu, &u);
        let (_b, bias_dev) = upload(&gpu, &bias);
        let (act_buf, act) = poisoned::<f16>(&gpu, rows * cols);
        gpu.gelu_bias_fwd(act, pre, bias_dev, rows, cols).unwrap();
        assert_eq!(read(&gpu, &pre_buf, pre, "gelu pre"), u, "the forward leaves the bias-free input as it was");
        // The bias add is one fp32 addition and one fp16 rounding, in both directions. Against the f64
        // reference: the kernel's Φ comes from erfc, accurate to a few fp32 ulps over the whole range (the
        // f32 reference's 1 + erf loses digits to cancellation for inputs below −3).
        let biased: Vec<f16> = (0..rows * cols).map(|i| f16::from_f32(u[i].to_f32() + bias[i % cols])).collect();
        let pre64 = f64s(&widen(&biased));
        let mut want = vec![f64::NAN; rows * cols];
        cpu::gelu::forward(&mut want, &pre64);
        let what = format!("gelu {rows}×{cols}");
        assert_close(&widen(&read(&gpu, &act_buf, act, "gelu")), &want, f16_tol(1e-6), &what);

        let dact = f16s(&uniform(&mut rng, rows * cols, 1.0));
        // In place, as the training step runs it: the gradient overwrites dact. The bias gradient is written,
        // not added to.
        let (d_buf, d) = poisoned_with(&gpu, &dact);
        let (dbias_buf, dbias) = poisoned::<f32>(&gpu, cols);
        let (_s, scratch) = poisoned::<f32>(&gpu, gpu.partials_len(rows, cols, 1));
        gpu.gelu_bias_bwd(d, dbias, d, pre, bias_dev, scratch, rows, cols).unwrap();
        let mut want_d = f64s(&widen(&dact));
        cpu::gelu::backward_in_place(&mut want_d, &pre64);
        let mut want_dbias = vec![0.0; cols];
        cpu::linear::add_column_sums(&mut want_dbias, &want_d, rows, cols);
        assert_close(&widen(&read(&gpu, &d_buf, d, "gelu dpre")), &want_d, f16_tol(2e-6), &format!("{what} dpre"));
        let sum_tol = |w: f64| 1e-5 * (w.abs() + 1.0) * (rows as f64).sqrt();
        assert_close(&read(&gpu, &dbias_buf, dbias, "gelu dbias"), &want_dbias, sum_tol, &format!("{what} dbias"));
    }
}

#[test]
fn l2norm_with_bias_matches_the_cpu_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("l2norm");
    // Every case has rows on both sides of eps, so the backward takes both branches: row 3 is zero at the
    // small eps; the large one clamps the rows halved below.
    for (rows, dim, eps) in [(1000, 64, 1e-12f32), (45, 200, 1e-12), (200, 64, 3.0)] {
        let mut z = f16s(&uniform(&mut rng, rows * dim, 1.0));
        // The bias is fp16-exact, so that row 3 below can cancel it to exactly zero.
        let bias: Vec<f32> = uniform(&mut rng, dim, 0.2).iter().map(|&b| f16::from_f32(b).to_f32()).collect();
        if eps < 1.0 {
            // Row 3: exactly zero after the bias, so its norm is below eps.
            for c in 0..dim {
                z[3 * dim + c] = f16::from_f32(-bias[c]);
            }
        } else {
            // Row norms are ≈ 4.7 at dim 64; halving every other row (exact in fp16) brings those to ≈ 2.5.
            for x in z.chunks_mut(dim).step_by(2).flatten() {
                *x = f16::from_f32(x.to_f32() * 0.5);
            }
        }
        let (_z, z_dev) = upload(&gpu, &z);
        let (_b, bias_dev) = upload(&gpu, &bias);
        let (y_buf, y) = poisoned::<f32>(&gpu, rows * dim);
        let (n_buf, norms) = poisoned::<f32>(&gpu, rows);
        gpu.l2norm_fwd(y, norms, z_dev, Some(bias_dev), rows, dim, eps).unwrap();
        let zb: Vec<f32> = (0..rows * dim).map(|i| z[i].to_f32() + bias[i % dim]).collect();
        let (mut want_y, mut want_norms) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows]);
        cpu::l2norm::forward(&mut want_y, &mut want_norms, &zb, rows, dim, eps as f64);
        let what = format!("l2norm {rows}×{dim} eps {eps}");
        let clamped = want_norms.iter().filter(|&&n| n < eps).count();
        assert!(clamped > 0 && clamped < rows, "{what}: {clamped} rows clamped, both branches wanted");
        let tol = |w: f64| 2e-6 * w.abs() + 1e-7;
        assert_close(&read(&gpu, &y_buf, y, "l2norm y"), &f64s(&want_y), tol, &format!("{what} y"));
        assert_close(&read(&gpu, &n_buf, norms, "norms"), &f64s(&want_norms), tol, &format!("{what} norms"));

        let mut dy = uniform(&mut rng, rows * dim, 1.0);
        if eps < 1.0 {
            // The zero row's dy / 1e-12 must pass fp16's range (below, its infinities are checked).
            for g in &mut dy[3 * dim..4 * dim] {
                *g = g.signum() * g.abs().max(1e-3);
            }
        }
        let (_dy, dy_dev) = upload(&gpu, &dy);
        let (dz_buf, dz) = poisoned::<f16>(&gpu, rows * dim);
        let (dbias_buf, dbias) = poisoned::<f32>(&gpu, dim);
        let (_s, scratch) = poisoned::<f32>(&gpu, gpu.partials_len(rows, dim, 1));
        gpu.l2norm_bwd(dz, Some(dbias), dy_dev, y, norms, scratch, rows, dim, eps).unwrap();
        let mut want_dz = vec![f32::NAN; rows * dim];
        cpu::l2norm::backward(&mut want_dz, &dy, &want_y, &want_norms, rows, dim, eps as f64);
        let mut want_dbias = vec![0.0; dim];
        cpu::linear::add_column_sums(&mut want_dbias, &want_dz, rows, dim);
        let mut got_dz = widen(&read(&gpu, &dz_buf, dz, "l2norm dz"));
        if eps < 1.0 {
            // The zero row's gradient is dy / 1e-12, beyond fp16: infinities of dy's sign. The row is then
            // set aside, and so is the bias gradient it swamps.
            for c in 3 * dim..4 * dim {
                assert!(got_dz[c].is_infinite() && (got_dz[c] > 0.0) == (dy[c] > 0.0), "{what}: zero row, column {c}");
                got_dz[c] = want_dz[c];
            }
        }
        let want_dz = f64s(&want_dz);
        // dy − y·(y·dy) cancels where dy lies along y: the fp32 roundings of its terms (and of the GPU's own y)
        // leave an absolute error of ~1e-7 of the row's scale there, above fp16's relative bound of the small
        // result (a seed once met 3.09e-8 against a bound of 3.06e-8).
        let scale = want_dz.iter().fold(0.0f64, |a, w| a.max(w.abs()));
        let dz_tol = |w: f64| f16_tol(1e-5)(w) + 1e-6 * scale;
        assert_close(&got_dz, &want_dz, dz_tol, &format!("{what} dz"));
        if eps < 1.0 {
            continue;
        }
        let sum_tol = |w: f64| 1e-5 * (w.abs() + 1.0) * (rows as f64).sqrt();
        assert_close(&read(&gpu, &dbias_buf, dbias, "dbias"), &f64s(&want_dbias), sum_tol, &format!("{what} dbias"));
    }
}

/// A backward over no rows (a tower with no sequences) still writes every gradient it owns: the sums over
/// no rows, zeros, in buffers poisoned with NaN.
#[test]
fn backwards_over_no_rows_write_zero_gradients() {
    let Some(gpu) = gpu() else { return };
    let (dim, cols) = (136, 64);
    let (_a, act) = poisoned::<f16>(&gpu, 8);
    let (_f, rows32) = poisoned::<f32>(&gpu, 8);
    let (_w, w) = poisoned::<f32>(&gpu, cols.max(dim));
    let (_s, scratch) = poisoned::<f32>(&gpu, 8);
    let sums: Vec<(DeviceBuffer, Dev<f32>)> = (0..5).map(|_| poisoned::<f32>(&gpu, dim)).collect();
    let sum = |k: usize| sums[k].1;
    gpu.layernorm_bwd(act, sum(0), sum(1), Some(sum(2)), act, None, act, rows32, w, scratch, 0, dim).unwrap();
    gpu.gelu_bias_bwd(act, sum(3).slice(0, cols), act, act, w.slice(0, cols), scratch, 0, cols).unwrap();
    gpu.l2norm_bwd(act, Some(sum(4).slice(0, 64)), rows32, rows32, rows32, scratch, 0, 64, 1e-12).unwrap();
    let widths = [dim, dim, dim, cols, 64];
    for (k, ((buf, view), width)) in sums.iter().zip(widths).enumerate() {
        let got = read(&gpu, buf, *view, "gradient sum");
        assert!(got[..width].iter().all(|&x| x == 0.0), "sum {k}: {:?}", &got[..width]);
    }
}

/// One GPU Adam step against the CPU's (clip_grad_norm then Adam::update) from the same random state.
fn adam_case(gpu: &Gpu, rng: &mut impl RngExt, config: AdamConfig, max_norm: Option<f64>, lr: f64) {
    // Three "tensors" laid end to end in the flat buffer, as the engine lays out all parameters.
    let sizes = [1000usize, 1, 70_001];
    let n: usize = sizes.iter().sum();
    let t = 4;
    let params = uniform(rng, n, 1.0);
    let m = uniform(rng, n, 0.1);
    let v: Vec<f32> = uniform(rng, n, 0.01).iter().map(|x| x.abs()).collect();
    let loss_scale = 1024.0;
    let grads_scaled: Vec<f32> = uniform(rng, n, 0.5).iter().map(|g| g * loss_scale as f32).collect();

    let (p_buf, p_dev) = poisoned_with(gpu, &params);
    let (m_buf, m_dev) = poisoned_with(gpu, &m);
    let (v_buf, v_dev) = poisoned_with(gpu, &v);
    let (p16_buf, p16) = poisoned::<f16>(gpu, n);
    let (_g, g_dev) = upload(gpu, &grads_scaled);
    let (s_buf, stats) = poisoned::<f32>(gpu, AdamStats::LEN);
    let (_sc, scratch) = poisoned::<f64>(gpu, gpu.adam_scratch_len(n));
    let (_st, scalars) = upload(gpu, &AdamStep { lr, t, loss_scale }.scalars(&config).unwrap());
    gpu.adam_step(p_dev, m_dev, v_dev, p16, g_dev, stats, scratch, scalars, &config, max_norm).unwrap();
    let got_stats = AdamStats::from_device(&read(gpu, &s_buf, stats, "stats")).unwrap();

    // The reference: unscaled gradients (exact: the scale is a power of two), clipped, one update at t.
    let split = |flat: &[f32]| {
        let mut out = Vec::new();
        let mut at = 0;
        for &s in &sizes {
            out.push(flat[at..at + s].to_vec());
            at += s;
        }
        out
    };
    let mut grads = split(&grads_scaled.iter().map(|g| g * (1.0 / loss_scale) as f32).collect::<Vec<_>>());
    let norm = match max_norm {
        Some(limit) => clip_grad_norm(&mut grads.iter_mut().map(|g| g.as_mut_slice()).collect::<Vec<_>>(), limit),
        None => learn_kern::train::optim::grad_norm(&grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>()),
    };
    let mut adam = Adam::restore(config, t - 1, split(&m), split(&v), &sizes).unwrap();
    let mut want_p = split(&params);
    adam.update(
        &mut want_p.iter_mut().map(|p| p.as_mut_slice()).collect::<Vec<_>>(),
        &grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>(),
        lr,
    );
    assert!(!got_stats.skipped);
    assert_eq!(got_stats.grad_norm, norm as f32, "grad norm");
    if max_norm.is_some() {
        assert!(got_stats.clip < 1.0, "the case is meant to clip");
    }
    // Same operations, same roundings, same order: bit for bit.
    let flat = |parts: &[Vec<f32>]| parts.concat();
    assert_eq!(read(gpu, &p_buf, p_dev, "params"), flat(&want_p), "params");
    assert_eq!(read(gpu, &m_buf, m_dev, "m"), flat(&adam.m), "m");
    assert_eq!(read(gpu, &v_buf, v_dev, "v"), flat(&adam.v), "v");
    let want16: Vec<f16> = flat(&want_p).iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(read(gpu, &p16_buf, p16, "p16"), want16, "fp16 copy");
}

#[test]
fn adam_matches_the_cpu_optimizer_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("adam");
    adam_case(&gpu, &mut rng, AdamConfig::default(), None, 1e-3);
    adam_case(&gpu, &mut rng, AdamConfig { weight_decay: 0.1, ..AdamConfig::default() }, Some(1.0), 5e-3);
    // β1 < 0.5 takes the other form of the lerp.
    adam_case(&gpu, &mut rng, AdamConfig { beta1: 0.3, beta2: 0.9, eps: 1e-6, weight_decay: 0.01 }, Some(5.0), 0.1);
}

#[test]
fn adam_skips_a_step_whose_gradients_overflowed() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("adam overflow");
    let n = 5000;
    for bad in [f32::INFINITY, f32::NAN] {
        let params = uniform(&mut rng, n, 1.0);
        let m = uniform(&mut rng, n, 0.1);
        let v: Vec<f32> = uniform(&mut rng, n, 0.01).iter().map(|x| x.abs()).collect();
        let p16 = f16s(&params);
        let mut grads = uniform(&mut rng, n, 100.0);
        grads[4321] = bad;
        let (_p, p_dev) = upload(&gpu, &params);
        let (_m, m_dev) = upload(&gpu, &m);
        let (_v, v_dev) = upload(&gpu, &v);
        let (_h, p16_dev) = upload(&gpu, &p16);
        let (_g, g_dev) = upload(&gpu, &grads);
        let (s_buf, stats) = poisoned::<f32>(&gpu, AdamStats::LEN);
        let (_sc, scratch) = poisoned::<f64>(&gpu, gpu.adam_scratch_len(n));
        let config = AdamConfig::default();
        let (_st, scalars) = upload(&gpu, &AdamStep { lr: 1e-3, t: 1, loss_scale: 65536.0 }.scalars(&config).unwrap());
        gpu.adam_step(p_dev, m_dev, v_dev, p16_dev, g_dev, stats, scratch, scalars, &config, Some(1.0)).unwrap();
        let got = AdamStats::from_device(&read(&gpu, &s_buf, stats, "stats")).unwrap();
        assert!(got.skipped && !got.grad_norm.is_finite(), "{bad}: {got:?}");
        assert_eq!(gpu.download(p_dev).unwrap(), params, "{bad}: weights moved");
        assert_eq!(gpu.download(m_dev).unwrap(), m);
        assert_eq!(gpu.download(v_dev).unwrap(), v);
        assert_eq!(gpu.download(p16_dev).unwrap(), p16);
    }
}

/// A random InfoNCE batch: unit rows (scores up to ±1/τ), random lengths, item ids from a pool of `pool`.
#[derive(Clone)]
struct NceCase {
    users: Vec<f32>,
    items: Vec<f32>,
    hist_len: Vec<usize>,
    tgt_len: Vec<usize>,
    ids: Vec<u32>,
    h: usize,
    t: usize,
    d: usize,
    tau: f32,
    keep: bool,
    positions: LossPositions,
    log_q: Option<Vec<f32>>,
    /// How the GPU sees the rows (the CPU always padded), and the loss scale its gradients carry.
    rows: Rows,
    grad_scale: f32,
    /// Padding as a training step's shape bucket adds it: this many more rows in the users and items arrays
    /// (NaN, never to be read; zero gradients), and the queries and columns padded to whole tiles and one
    /// more.
    pad_rows: usize,
}

/// The valid rows of a padded `[n, len, d]` array, user by user.
fn pack_rows(padded: &[f32], lengths: &[usize], len: usize, d: usize) -> Vec<f32> {
    lengths.iter().enumerate().flat_map(|(i, &n)| padded[i * len * d..(i * len + n) * d].to_vec()).collect()
}

/// The inverse of [`pack_rows`], with NaN at the padded rows.
fn unpack_rows(packed: &[f32], lengths: &[usize], len: usize, d: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; lengths.len() * len * d];
    let mut at = 0;
    for (i, &n) in lengths.iter().enumerate() {
        out[i * len * d..(i * len + n) * d].copy_from_slice(&packed[at..at + n * d]);
        at += n * d;
    }
    out
}

impl NceCase {
    #[allow(clippy::too_many_arguments)]
    fn random(rng: &mut impl RngExt, n: usize, h: usize, t: usize, d: usize, pool: u32, full: bool) -> NceCase {
        let mut rows = |count: usize| {
            let mut v = uniform(rng, count * d, 1.0);
            for r in v.chunks_exact_mut(d) {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter_mut().for_each(|x| *x /= norm);
            }
            v
        };
        let (users, items) = (rows(n * h), rows(n * t));
        let hist_len = (0..n).map(|_| if full { h } else { rng.random_range(1..=h) }).collect();
        let tgt_len = (0..n).map(|_| if full { t } else { rng.random_range(1..=t) }).collect();
        let ids = (0..n * t).map(|_| rng.random_range(0..pool)).collect();
        NceCase {
            users,
            items,
            hist_len,
            tgt_len,
            ids,
            h,
            t,
            d,
            tau: 0.05,
            keep: false,
            positions: LossPositions::All,
            log_q: None,
            rows: Rows::Padded,
            grad_scale: 1.0,
            pad_rows: 0,
        }
    }

    /// Loss, N_q per query and the gradients from the GPU (padded, whatever rows it saw), outputs poisoned
    /// first.
    fn gpu(&self, gpu: &Gpu) -> (f32, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, t, d) = (self.h, self.t, self.d);
        let mut layout =
            InfoNceLayout::new(&self.hist_len, &self.tgt_len, &self.ids, h, t, self.positions, self.keep, self.rows)
                .unwrap();
        let (nu, ni, extra) = (layout.user_rows, layout.item_rows, self.pad_rows);
        if extra > 0 {
            let whole = |n: usize| n.next_multiple_of(64) + 64;
            layout.pad(whole(layout.q_row.len()), whole(layout.c_row.len()), nu + extra, ni + extra).unwrap();
        }
        let region = gpu.alloc(layout.device_bytes().max(1), "layout").unwrap();
        let batch = gpu.upload_infonce_layout(&layout, region.all::<u8>()).unwrap();
        let packed = self.rows == Rows::Packed;
        let (users, items, log_q) = if packed {
            let log_q = self.log_q.as_ref().map(|l| pack_rows(l, &self.tgt_len, t, 1));
            (pack_rows(&self.users, &self.hist_len, h, d), pack_rows(&self.items, &self.tgt_len, t, d), log_q)
        } else {
            (self.users.clone(), self.items.clone(), self.log_q.clone())
        };
        let nan_rows = |mut v: Vec<f32>, rows: usize| {
            v.resize(v.len() + rows, f32::NAN);
            v
        };
        let (_u, users_dev) = upload(gpu, &nan_rows(users, extra * d));
        let (_i, items_dev) = upload(gpu, &nan_rows(items, extra * d));
        let log_q = log_q.map(|l| upload(gpu, &nan_rows(l, extra)));
        let (loss_buf, loss) = poisoned::<f32>(gpu, 1);
        let (lse_buf, lse) = poisoned::<f32>(gpu, batch.queries());
        let (du_buf, du) = poisoned::<f32>(gpu, (nu + extra) * d);
        let (di_buf, di) = poisoned::<f32>(gpu, (ni + extra) * d);
        let (_s, scratch) = poisoned::<f32>(gpu, batch.scratch_len(d));
        let log_q = log_q.as_ref().map(|l| l.1);
        let (_w, weights) = upload(gpu, &infonce_weights(layout.pairs, self.grad_scale as f64).unwrap());
        gpu.infonce(&batch, users_dev, items_dev, log_q, d, self.tau, weights, loss, lse, du, di, scratch).unwrap();
        let (mut du, mut di) = (read(gpu, &du_buf, du, "d_users"), read(gpu, &di_buf, di, "d_items"));
        for (grads, rows) in [(&mut du, nu), (&mut di, ni)] {
            assert!(grads[rows * d..].iter().all(|&g| g.to_bits() == 0), "a padding row's gradient is not +0");
            grads.truncate(rows * d);
        }
        let mut lse = read(gpu, &lse_buf, lse, "lse");
        let padding = lse.split_off(self.query_count());
        assert!(padding.iter().all(|&x| x == f32::NEG_INFINITY), "a padding query has negatives");
        let (du, di) = if packed {
            (unpack_rows(&du, &self.hist_len, h, d), unpack_rows(&di, &self.tgt_len, t, d))
        } else {
            (du, di)
        };
        (read(gpu, &loss_buf, loss, "loss")[0], lse, du, di)
    }

    /// Queries of the unpadded batch.
    fn query_count(&self) -> usize {
        match self.positions {
            LossPositions::All => self.hist_len.iter().sum(),
            LossPositions::Last => self.hist_len.len(),
        }
    }

    /// The CPU reference in f64 (or f32), gradients poisoned first.
    fn cpu<T: cpu::Real>(&self) -> (f64, Vec<f64>, Vec<f64>) {
        let cast = |v: &[f32]| v.iter().map(|&x| T::c(x as f64)).collect::<Vec<T>>();
        let (users, items) = (cast(&self.users), cast(&self.items));
        let log_q = self.log_q.as_deref().map(cast);
        let b = InfoNceBatch {
            users: &users,
            hist_len: &self.hist_len,
            items: &items,
            tgt_len: &self.tgt_len,
            target_ids: &self.ids,
            h: self.h,
            t: self.t,
            d: self.d,
            tau: T::c(self.tau as f64),
            keep_false_negatives: self.keep,
            positions: self.positions,
            log_q: log_q.as_deref(),
        };
        let (mut du, mut di) = (vec![T::nan(); users.len()], vec![T::nan(); items.len()]);
        let out = infonce(&b, &mut du, &mut di);
        let wide = |v: Vec<T>| v.iter().map(|x| x.to_f64().unwrap()).collect();
        (out.loss.to_f64().unwrap(), wide(du), wide(di))
    }

    /// N_q from the definition: log Σ exp(s) over the allowed negatives of each query, in f64.
    fn naive_lse(&self) -> Vec<f64> {
        let (n, d) = (self.hist_len.len(), self.d);
        let mut out = Vec::new();
        for i in 0..n {
            let own = &self.ids[i * self.t..i * self.t + self.tgt_len[i]];
            let first = if self.positions == LossPositions::Last { self.hist_len[i] - 1 } else { 0 };
            for j in first..self.hist_len[i] {
                let u = &self.users[(i * self.h + j) * d..][..d];
                let mut scores = Vec::new();
                for z in (0..n).filter(|&z| z != i) {
                    for k in 0..self.tgt_len[z] {
                        let c = z * self.t + k;
                        if !self.keep && own.contains(&self.ids[c]) {
                            continue;
                        }
                        let v = &self.items[c * d..][..d];
                        let dot: f64 = u.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
                        scores.push(dot / self.tau as f64 - self.log_q.as_ref().map_or(0.0, |l| l[c] as f64));
                    }
                }
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out.push(if m == f64::NEG_INFINITY {
                    m
                } else {
                    m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln()
                });
            }
        }
        out
    }
}

/// Gradients to `rel` of their largest magnitude.
fn grad_tol(want: &[f64], rel: f64) -> impl Fn(f64) -> f64 {
    let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
    move |w: f64| rel * (w.abs() + scale)
}

/// Holds the GPU's loss, N_q and gradients for `case` to the CPU reference in f64, within the error the
/// kernels' tensor-core products allow (infonce.cu): a score s = q̃·v of unit rows, from split-fp16
/// products, is off by at most 2⁻²¹/τ from the dropped low parts, and as much again from tensor cores that
/// truncate their fp32 sums, so 2⁻²⁰/τ; N_q is off by no more than its scores, the loss by twice that, a
/// gradient term's weight exp(s − N) by 2·2⁻²⁰/τ of itself. The gradient sums multiply that weight and the
/// embedding rounded to fp16, each to 2⁻¹¹ of itself: 2⁻¹⁰ of a term, bounded here by the largest
/// gradient. Scores from products of halves alone would be off by ~2⁻¹¹ of their terms, which τ = 0.01
/// turns into ~5% of a weight: far past these bounds.
fn assert_infonce_matches(gpu: &Gpu, case: &NceCase, what: &str) {
    let score_err = 2f64.powi(-20) / case.tau as f64;
    let (loss, lse, du, di) = case.gpu(gpu);
    let (want_loss, want_du, want_di) = case.cpu::<f64>();
    let loss_tol = 2.0 * score_err + 1e-6 * (1.0 + want_loss);
    assert!((loss as f64 - want_loss).abs() <= loss_tol, "{what}: {loss} vs {want_loss}");
    let want_lse = case.naive_lse();
    let lse_tol = |w: f64| if w.is_infinite() { 0.0 } else { score_err + 1e-6 * (1.0 + w.abs()) };
    for (q, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        assert!(g as f64 == w || (g as f64 - w).abs() <= lse_tol(w), "{what}: lse {q}: {g} vs {w}");
    }
    let rel = 1e-5 + 2.0 * score_err + 2f64.powi(-10);
    assert_close(&du, &want_du, grad_tol(&want_du, rel), &format!("{what} d_users"));
    assert_close(&di, &want_di, grad_tol(&want_di, rel), &format!("{what} d_items"));
}

#[test]
fn infonce_matches_the_cpu_for_every_variant() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("infonce");
    for d in INFONCE_WIDTHS {
        // 37 users of up to 7 queries and 5 columns: several 64-row and 64-column tiles, partial last ones,
        // an odd number of bitmask words; a pool of 30 ids so that users share items and masking matters.
        let base = NceCase::random(&mut rng, 37, 7, 5, d, 30, false);
        // τ = 0.01: scores up to ±100, where a lost low half shows most against the bound.
        assert_infonce_matches(&gpu, &NceCase { tau: 0.01, ..base.clone() }, &format!("infonce d {d} τ 0.01"));
        for keep in [false, true] {
            for positions in [LossPositions::All, LossPositions::Last] {
                for shifted in [false, true] {
                    let log_q = shifted.then(|| base.ids.iter().map(|&id| -1.0 - 0.37 * (id % 5) as f32).collect());
                    let case = NceCase { keep, positions, log_q, ..base.clone() };
                    assert_infonce_matches(
                        &gpu,
                        &case,
                        &format!("infonce d {d} keep {keep} {positions:?} log q {shifted}"),
                    );
                }
            }
        }
        let kept = NceCase { keep: true, ..base.clone() }.gpu(&gpu).0;
        assert!((base.gpu(&gpu).0 - kept).abs() > 1e-3, "the false-negative mask changed nothing");
    }
}

#[test]
fn infonce_over_packed_rows_with_a_loss_scale_is_the_padded_result_times_the_scale_exactly() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("infonce packed");
    let padded = NceCase::random(&mut rng, 29, 9, 6, 64, 25, false);
    let log_q = Some(padded.ids.iter().map(|&id| -2.0 - 0.1 * (id % 7) as f32).collect());
    for case in [padded.clone(), NceCase { log_q, positions: LossPositions::Last, ..padded }] {
        let (loss, lse, du, di) = case.gpu(&gpu);
        let scaled = NceCase { rows: Rows::Packed, grad_scale: 1024.0, ..case.clone() };
        let (loss_s, lse_s, du_s, di_s) = scaled.gpu(&gpu);
        assert_eq!(loss.to_bits(), loss_s.to_bits(), "the loss is never scaled");
        assert_eq!(
            lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            lse_s.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // Padded rows: zeros from the padded run, NaN (never written) from the unpacked one.
        for (what, plain, big) in [("d_users", &du, &du_s), ("d_items", &di, &di_s)] {
            for (i, (&p, &b)) in plain.iter().zip(big.iter()).enumerate() {
                assert!(b.is_nan() && p == 0.0 || (p * 1024.0).to_bits() == b.to_bits(), "{what} {i}: {p} vs {b}");
            }
            assert!(plain.iter().any(|&p| p != 0.0), "{what}: all zeros checks nothing");
        }
    }
}

#[test]
fn infonce_padded_to_whole_tiles_is_the_unpadded_result_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("infonce tile padding");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for d in INFONCE_WIDTHS {
        let base =
            NceCase { rows: Rows::Packed, grad_scale: 256.0, ..NceCase::random(&mut rng, 23, 9, 6, d, 25, false) };
        let log_q = Some(base.ids.iter().map(|&id| -2.0 - 0.1 * (id % 7) as f32).collect());
        for case in [base.clone(), NceCase { log_q, positions: LossPositions::Last, keep: true, ..base }] {
            let what = format!("d {d}, {:?}, log q {}", case.positions, case.log_q.is_some());
            let (loss, lse, du, di) = case.gpu(&gpu);
            // Padding rows hold NaN: reading one would show in every result.
            let (loss_p, lse_p, du_p, di_p) = NceCase { pad_rows: 70, ..case.clone() }.gpu(&gpu);
            assert_eq!(loss.to_bits(), loss_p.to_bits(), "{what}: loss");
            assert_eq!(bits(&lse), bits(&lse_p), "{what}: lse");
            assert_eq!(bits(&du), bits(&du_p), "{what}: d_users");
            assert_eq!(bits(&di), bits(&di_p), "{what}: d_items");
        }
    }
}

#[test]
fn infonce_without_negatives_is_exactly_zero() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("infonce zero");
    // Two users with the same single item: each one's only negative is masked.
    let case = NceCase::random(&mut rng, 2, 3, 2, 64, 1, false);
    let (loss, lse, du, di) = case.gpu(&gpu);
    assert_eq!(loss, 0.0);
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(du.iter().chain(&di).all(|&x| x == 0.0));
}

#[test]
fn infonce_runs_at_b1024_h80_t40_like_the_cpu_and_repeats() {
    let Some(gpu) = real_gpu("InfoNCE at B 1024 (430 GFLOP)") else { return };
    let mut rng = rng("infonce large");
    let case = NceCase::random(&mut rng, 1024, 80, 40, 64, 20_000, true);
    let start = std::time::Instant::now();
    let first = case.gpu(&gpu);
    eprintln!("infonce B=1024 H=80 T=40 (with uploads and layout): {:?}", start.elapsed());
    let (want_loss, want_du, want_di) = case.cpu::<f32>();
    let (loss, _, du, di) = &first;
    assert!((*loss as f64 - want_loss).abs() <= 1e-4 * want_loss, "loss {loss} vs {want_loss}");
    assert_close(du, &want_du, grad_tol(&want_du, 2e-4 + 2f64.powi(-10)), "B=1024 d_users");
    assert_close(di, &want_di, grad_tol(&want_di, 2e-4 + 2f64.powi(-10)), "B=1024 d_items");
    let again = case.gpu(&gpu);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(first.0.to_bits(), again.0.to_bits(), "loss repeats");
    assert!(bits(&first.2) == bits(&again.2) && bits(&first.3) == bits(&again.3), "gradients repeat");
}

/// A packed attention batch on the device: its offsets and 64-row tiles, then `empty` empty tiles (as a
/// training step's shape bucket launches them), kept alive with the batch; every row causal.
fn attention_batch(gpu: &Gpu, lengths: &[usize], heads: usize, empty: usize) -> (Vec<DeviceBuffer>, AttnBatch) {
    let offsets = packed_offsets(lengths);
    let mut tiles = Vec::new();
    attention_tiles(&offsets, &mut tiles);
    tiles.extend(std::iter::repeat_n([-1, -1], empty));
    let cu: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    let (cu_buf, cu_seqlens) = upload(gpu, &cu);
    let (tiles_buf, tiles_dev) = upload(gpu, &tiles);
    let rows = *offsets.last().unwrap();
    let num_tiles = tiles.len();
    let batch = AttnBatch { cu_seqlens, tiles: tiles_dev, num_tiles, seqs: lengths.len(), rows, heads, diagonal: rows };
    (vec![cu_buf, tiles_buf], batch)
}

/// The row log-sum-exp of the scaled causal scores, from the definition, in the packed head-major layout.
fn causal_lse(q: &[f64], k: &[f64], lengths: &[usize], heads: usize) -> Vec<f64> {
    let dh = MASKED_ATTENTION_HEAD_DIM;
    let mut lse = Vec::new();
    let mut first = 0;
    for &n in lengths {
        for h in 0..heads {
            let row = |i: usize| (first * heads + h * n + i) * dh;
            for i in 0..n {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..dh).map(|d| q[row(i) + d] * k[row(j) + d]).sum::<f64>() / (dh as f64).sqrt())
                    .collect();
                let top = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                lse.push(top + s.iter().map(|x| (x - top).exp()).sum::<f64>().ln());
            }
        }
        first += n;
    }
    lse
}

/// `data` (`[rows, width]`) on the device as columns `col ..` of rows of `stride` halves, every other column
/// NaN: a kernel that reads outside its columns shows in its outputs.
fn rows_among_nan(gpu: &Gpu, data: &[f16], width: usize, col: usize, stride: usize) -> (DeviceBuffer, RowTensor) {
    let mut all = vec![f16::NAN; data.len() / width * stride];
    for (row, src) in all.chunks_mut(stride).zip(data.chunks(width)) {
        row[col..col + width].copy_from_slice(src);
    }
    let (buf, view) = upload(gpu, &all);
    (buf, RowTensor { buf: view, stride, col })
}

/// A poisoned row-major output: `rows` rows of `stride` halves, the kernel's columns from `col`.
fn poisoned_rows(gpu: &Gpu, rows: usize, col: usize, stride: usize) -> (DeviceBuffer, RowTensor) {
    let (buf, view) = poisoned::<f16>(gpu, rows * stride);
    (buf, RowTensor { buf: view, stride, col })
}

/// Columns `col .. col + width` of a row-major output, `[rows, width]`, after checking that every other
/// column and the guard after the buffer still hold the poison.
fn read_columns(gpu: &Gpu, buf: &DeviceBuffer, t: RowTensor, width: usize, what: &str) -> Vec<f16> {
    let all = read(gpu, buf, t.buf, what);
    let mut got = Vec::with_capacity(all.len() / t.stride * width);
    for (r, row) in all.chunks(t.stride).enumerate() {
        let outside = row.iter().enumerate().filter(|(c, _)| !(t.col..t.col + width).contains(c));
        for (c, v) in outside {
            assert_eq!(v.to_bits(), 0xffff, "{what}: row {r}, column {c} is not the kernel's but was written");
        }
        got.extend_from_slice(&row[t.col..t.col + width]);
    }
    got
}

/// Head-major (as the CPU reference lays it out) columns `col .. col + heads·64` of row-major `rows`.
fn heads_of<T: Copy + Into<f64>>(rows: &[T], stride: usize, col: usize, seqs: &Varlen, hd: Heads) -> Vec<f64> {
    let wide: Vec<f64> = rows.iter().map(|&v| v.into()).collect();
    let mut heads = vec![f64::NAN; seqs.rows() * hd.count * hd.dim];
    cpu::masked_attention::to_heads(&mut heads, &wide, stride, col, seqs, hd);
    heads
}

#[test]
fn masked_attention_forward_and_backward_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("masked attention");
    let dh = MASKED_ATTENTION_HEAD_DIM;
    // Lengths of 1, below, at and past a 16-row fragment and a 64-row tile, the PCH shapes (H = 80, T = 40,
    // 12 heads) and the longest sequence (512); empty tiles after the real ones in every other shape (their
    // blocks must write nothing: the outputs are poisoned).
    let shapes: [(usize, &[usize]); 4] =
        [(2, &[1, 17, 64, 5, 100, 16]), (12, &[80, 79, 1, 33, 80]), (12, &[40, 40, 7, 1]), (1, &[512, 1, 200])];
    for (i, (heads, lengths)) in shapes.into_iter().enumerate() {
        for mask in [MaskKind::Causal, MaskKind::Diagonal] {
            let empty = i % 2 * 5;
            let what = format!("masked attention {mask:?}, {heads} heads, lengths {lengths:?}, {empty} empty tiles");
            let (_keep, batch) = attention_batch(&gpu, lengths, heads, empty);
            let batch = batch.masked(mask);
            let (rows, d, lanes) = (batch.rows, batch.width(), batch.rows * heads);
            let (seqs, hd) = (Varlen::new(lengths), Heads { count: heads, dim: dh });
            // Row-major inputs between NaN columns, each with its own column offset and stride, and a
            // nonzero QKV bias, which the kernels add as fp16(x + b).
            let proj = f16s(&uniform(&mut rng, rows * 3 * d, 2.0));
            let bias = uniform(&mut rng, 3 * d, 0.5);
            let dout = f16s(&uniform(&mut rng, rows * d, 1.0));
            let (_p, proj_dev) = rows_among_nan(&gpu, &proj, 3 * d, 8, 3 * d + 24);
            let (_b, bias_dev) = upload(&gpu, &bias);
            let qkv = Qkv { proj: proj_dev, bias: Some(bias_dev) };
            let (_g, dout_dev) = rows_among_nan(&gpu, &dout, d, 16, d + 16);
            let (out_buf, out) = poisoned_rows(&gpu, rows, 24, d + 40);
            let (lse_buf, lse) = poisoned::<f32>(&gpu, lanes);
            gpu.masked_attention_fwd(out, lse, qkv, &batch).unwrap();
            let got_out_rows = read_columns(&gpu, &out_buf, out, d, "attention out");

            let biased: Vec<f16> =
                proj.iter().enumerate().map(|(i, x)| f16::from_f32(x.to_f32() + bias[i % (3 * d)])).collect();
            let [q64, k64, v64] = [0, 1, 2].map(|part| heads_of(&biased, 3 * d, part * d, &seqs, hd));
            let dout64 = heads_of(&dout, d, 0, &seqs, hd);
            let n = rows * d;
            let (mut want_out, mut probs) = (vec![f64::NAN; n], vec![f64::NAN; seqs.prob_len(heads)]);
            cpu::masked_attention::forward(&mut want_out, &mut probs, &q64, &k64, &v64, None, &seqs, hd, mask);
            let (mut want_dq, mut want_dk, mut want_dv) = (vec![f64::NAN; n], vec![f64::NAN; n], vec![f64::NAN; n]);
            cpu::masked_attention::backward(
                &mut want_dq,
                &mut want_dk,
                &mut want_dv,
                &dout64,
                &q64,
                &k64,
                &v64,
                &probs,
                None,
                &seqs,
                hd,
            );

            let (dqkv_buf, dqkv) = poisoned_rows(&gpu, rows, 16, 3 * d + 40);
            let (_d, delta) = poisoned::<f32>(&gpu, lanes);
            let backward = |qkv: Qkv| {
                gpu.masked_attention_bwd(dqkv, delta, dout_dev, out, qkv, lse, &batch).unwrap();
                read_columns(&gpu, &dqkv_buf, dqkv, 3 * d, "attention dq, dk, dv")
            };
            let got_dqkv = backward(qkv);
            let [got_dq, got_dk, got_dv] = [0, 1, 2].map(|part| heads_of(&got_dqkv, 3 * d, part * d, &seqs, hd));
            let got_out = heads_of(&got_out_rows, d, 0, &seqs, hd);
            let narrow = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
            if mask == MaskKind::Diagonal {
                // p = 1 exactly: out = v, dv = dout, dq = dk = 0, bit for bit as the reference.
                let exact = |_: f64| 0.0;
                assert_close(&narrow(&got_out), &want_out, exact, &format!("{what} out"));
                assert_close(&narrow(&got_dq), &want_dq, exact, &format!("{what} dq"));
                assert_close(&narrow(&got_dk), &want_dk, exact, &format!("{what} dk"));
                assert_close(&narrow(&got_dv), &want_dv, exact, &format!("{what} dv"));
                continue;
            }
            // P and dS are rounded to fp16 for the tensor cores: errors of a few fp16 ulps of the largest value.
            assert_close(&narrow(&got_out), &want_out, scaled_f16_tol(&want_out, 2e-3), &format!("{what} out"));
            let got_lse = read(&gpu, &lse_buf, lse, "attention lse");
            let want_lse = causal_lse(&q64, &k64, lengths, heads);
            assert_close(&got_lse, &want_lse, |w| 1e-5 * (w.abs() + 1.0), &format!("{what} lse"));
            for (got, want, name) in [(&got_dq, &want_dq, "dq"), (&got_dk, &want_dk, "dk"), (&got_dv, &want_dv, "dv")] {
                assert_close(&narrow(got), want, scaled_f16_tol(want, 4e-3), &format!("{what} {name}"));
            }
            // No atomics: the backward repeats bit for bit.
            let bits = |x: &[f16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(&backward(qkv)) == bits(&got_dqkv), "{what}: a second backward differs");
            // The bias added as a tile loads rounds as adding it to the stored projection first (what the
            // permutes before these kernels did): the same bits from the biased projection and no bias.
            let (_q, plain) = rows_among_nan(&gpu, &biased, 3 * d, 0, 3 * d);
            let plain = Qkv { proj: plain, bias: None };
            let (again_buf, again) = poisoned_rows(&gpu, rows, 24, d + 40);
            gpu.masked_attention_fwd(again, lse, plain, &batch).unwrap();
            let again_out = read_columns(&gpu, &again_buf, again, d, "attention out");
            assert!(bits(&again_out) == bits(&got_out_rows), "{what}: out differs with the bias added first");
            let lse_bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let again_lse = read(&gpu, &lse_buf, lse, "attention lse");
            assert!(lse_bits(&again_lse) == lse_bits(&got_lse), "{what}: lse differs with the bias added first");
            assert!(bits(&backward(plain)) == bits(&got_dqkv), "{what}: dq, dk, dv differ with the bias added first");
        }
    }
}

#[test]
fn masked_attention_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let (_keep, batch) = attention_batch(&gpu, &[3, 70], 2, 0);
    let (rows, d) = (batch.rows, batch.width());
    let (_b, buf) = poisoned::<f16>(&gpu, rows * 3 * d + 8);
    let (_l, lse) = poisoned::<f32>(&gpu, rows * 2);
    let (_f, bias) = poisoned::<f32>(&gpu, 3 * d + 4);
    let rows_of = |len: usize, stride: usize| RowTensor::new(buf.slice(0, len), stride);
    let (out, proj) = (rows_of(rows * d, d), rows_of(rows * 3 * d, 3 * d));
    let qkv = Qkv { proj, bias: Some(bias.slice(0, 3 * d)) };
    let fwd = |out: RowTensor, qkv: Qkv, batch: &AttnBatch| gpu.masked_attention_fwd(out, lse, qkv, batch);
    assert!(fwd(rows_of(rows * d - 1, d), qkv, &batch).is_err(), "a short output");
    assert!(fwd(RowTensor::new(buf.slice(1, rows * d), d), qkv, &batch).is_err(), "an output off the 16-byte boundary");
    assert!(fwd(RowTensor { col: 8, ..out }, qkv, &batch).is_err(), "output columns past the row");
    // Rows with room to spare, so that only the alignment is wrong.
    let (_w, spare) = poisoned::<f16>(&gpu, rows * (d + 8));
    let wide = |stride: usize, col: usize| RowTensor { buf: spare, stride, col };
    assert!(fwd(wide(d + 8, 8), qkv, &batch).is_ok(), "spare columns are fine");
    assert!(fwd(wide(d + 8, 4), qkv, &batch).is_err(), "a column off 16 bytes");
    assert!(fwd(wide(d + 4, 0), qkv, &batch).is_err(), "a stride off 16 bytes");
    let short = Qkv { proj: rows_of(rows * 3 * d - 1, 3 * d), ..qkv };
    assert!(fwd(out, short, &batch).is_err(), "a short projection");
    assert!(fwd(out, Qkv { proj: rows_of(rows * 3 * d, 2 * d), ..qkv }, &batch).is_err(), "no room for V");
    assert!(fwd(out, Qkv { bias: Some(bias.slice(0, 3 * d - 1)), ..qkv }, &batch).is_err(), "a short bias");
    let off = Qkv { bias: Some(bias.slice(1, 3 * d)), ..qkv };
    assert!(fwd(out, off, &batch).is_err(), "a bias off the 16-byte boundary");
    assert!(fwd(out, qkv, &AttnBatch { heads: 0, ..batch }).is_err(), "no heads");
    assert!(fwd(out, qkv, &AttnBatch { num_tiles: batch.num_tiles + 1, ..batch }).is_err(), "more tiles than uploaded");
    assert!(fwd(out, qkv, &AttnBatch { rows: batch.rows + 1, ..batch }).is_err(), "more rows than the tensors hold");
    assert!(fwd(out, qkv, &AttnBatch { diagonal: batch.rows + 1, ..batch }).is_err(), "diagonal rows past the batch");
    assert!(gpu.masked_attention_fwd(out, lse.slice(0, 1), qkv, &batch).is_err(), "short lse");
    let bwd = |dqkv: RowTensor, delta: Dev<f32>, dout: RowTensor| {
        gpu.masked_attention_bwd(dqkv, delta, dout, out, qkv, lse, &batch)
    };
    assert!(bwd(proj, lse.slice(0, 1), out).is_err(), "a short delta");
    assert!(bwd(rows_of(rows * 3 * d - 1, 3 * d), lse, out).is_err(), "a short dq, dk, dv");
    assert!(bwd(proj, lse, rows_of(rows * d - 1, d)).is_err(), "a short dout");
}

/// `bench kernels --preset pch-*` launches every training kernel at a step's shapes on random inputs. On
/// the emulator the times mean nothing, but each launch must pass its launcher's checks and run to the end,
/// so that the GPU run's bench has no surprise left but the figures.
#[test]
fn bench_kernels_launches_every_training_kernel() {
    let Some(gpu) = gpu() else { return };
    let config = PchConfig::preset("pch-small").unwrap();
    let shape = TrainKernelShape { batch_users: 3, history: 70, targets: 5, gallery: 300 };
    let mut kernels = train_kernels(&gpu, &config, shape).unwrap();
    assert_eq!((kernels.rows, kernels.sequences), (3 * 75, 6));
    let rows = time_kernels(&gpu, &mut kernels, (1, 1), (1.0, 1.0)).unwrap();
    let names = [
        "layernorm_fwd",
        "layernorm_bwd",
        "gelu_bias_fwd",
        "gelu_bias_bwd",
        "masked_attention_fwd",
        "masked_attention_bwd",
        "l2norm_fwd",
        "l2norm_bwd",
        "infonce",
        "adam_step",
        "topk",
    ];
    assert_kernel_rows(&rows, &names, &["masked_attention_fwd", "masked_attention_bwd", "infonce", "topk"]);
}
