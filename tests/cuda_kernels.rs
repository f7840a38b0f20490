//! Every CUDA kernel against the CPU reference (SPEC §6), on fresh random inputs, with outputs poisoned
//! (NaN) before the kernel writes them and a poisoned guard after them that must survive. Tolerances are
//! the fp16 rounding the kernel performs, derived per test. Without a GPU each test says why and skips.

mod cuda_support;

use cuda_support::{
    F16_HALF_ULP, F16_TINY, assert_close, assert_kernel_rows, f16_tol, f16s, gpu, poisoned, read, rng, uniform, upload,
    widen,
};
use half::{bf16, f16};
use learn_kern::cpu;
use learn_kern::cuda::bench_kernels::{embed_kernels, time_kernels};
use learn_kern::cuda::ops::{HEAD_DIMS, attention_tiles, packed_offsets};
use learn_kern::llm::LlmConfig;
use rand::RngExt;

#[test]
fn embedding_gather_copies_table_rows_and_poisons_bad_ids() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("embedding");
    let (vocab, dim, tokens) = (1000, 264, 300);
    let table = f16s(&uniform(&mut rng, vocab * dim, 3.0));
    let mut ids: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..vocab as u32)).collect();
    ids[17] = vocab as u32 + 5;
    let (_t, table_dev) = upload(&gpu, &table);
    let (_i, ids_dev) = upload(&gpu, &ids);
    let (out_buf, out) = poisoned::<f32>(&gpu, tokens * dim);
    gpu.embedding_gather(out, table_dev, ids_dev, tokens, dim).unwrap();
    let got = read(&gpu, &out_buf, out, "embedding");
    for (t, &id) in ids.iter().enumerate() {
        let row = &got[t * dim..(t + 1) * dim];
        if t == 17 {
            assert!(row.iter().all(|v| v.is_nan()), "an id outside the vocabulary gives a NaN row");
        } else {
            let want = widen(&table[id as usize * dim..(id as usize + 1) * dim]);
            assert_eq!(row, &want[..], "token {t} (id {id})");
        }
    }
}

#[test]
fn rmsnorm_adds_the_residual_and_normalises_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("rmsnorm");
    // 136 columns: one block of 32 threads with idle lanes; 4104: several 8-column steps per thread.
    for (rows, dim) in [(37, 136), (19, 4104)] {
        let x = uniform(&mut rng, rows * dim, 4.0);
        let delta = f16s(&uniform(&mut rng, rows * dim, 2.0));
        let w: Vec<f32> = (0..dim).map(|_| 0.5 + rng.random::<f32>()).collect();
        let eps = 1e-6;
        for with_delta in [true, false] {
            let (x_buf, x_dev) = poisoned::<f32>(&gpu, rows * dim);
            gpu.upload(x_dev, &x).unwrap();
            let (_d, delta_dev) = upload(&gpu, &delta);
            let (_w, w_dev) = upload(&gpu, &w);
            let (out_buf, out) = poisoned::<f16>(&gpu, rows * dim);
            gpu.rmsnorm_residual(x_dev, with_delta.then_some(delta_dev), w_dev, out, rows, dim, eps).unwrap();
            let got = widen(&read(&gpu, &out_buf, out, "rmsnorm"));
            let summed: Vec<f32> =
                if with_delta { x.iter().zip(&delta).map(|(a, d)| a + d.to_f32()).collect() } else { x.clone() };
            // The residual add is one fp32 addition per element on both sides: bit for bit.
            assert_eq!(read(&gpu, &x_buf, x_dev, "residual"), summed, "residual stream, {dim} columns");
            let mut want = vec![f32::NAN; rows * dim];
            cpu::rmsnorm::rmsnorm(&mut want, &summed, &w, eps);
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            assert_close(&got, &want, f16_tol(1e-5), &format!("rmsnorm {rows}×{dim}, delta {with_delta}"));
        }
    }
}

#[test]
fn rope_turns_q_and_k_like_the_cpu_and_leaves_v() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("rope");
    for head_dim in HEAD_DIMS {
        let heads = 3;
        let row_len = 3 * heads * head_dim;
        let table_positions = 600;
        let tokens = 211;
        let positions: Vec<i32> = (0..tokens).map(|_| rng.random_range(0..table_positions as i32)).collect();
        let x = f16s(&uniform(&mut rng, tokens * row_len, 2.0));
        let (table_buf, table) = poisoned::<[f32; 2]>(&gpu, table_positions * head_dim / 2);
        gpu.rope_table(table, table_positions, head_dim, 10000.0).unwrap();
        let cos_sin = read(&gpu, &table_buf, table, "rope table");
        // The table against the angle formed as the reference forms it (f32 inverse frequency, f32 angle),
        // evaluated in f64: sincosf is within 2 ulp; a 1-ulp difference in powf moves the angle of position p
        // by at most p · 2^-24 · inv_freq ≤ p · 6e-8.
        for (j, cs) in cos_sin.iter().enumerate() {
            let (p, i) = (j / (head_dim / 2), j % (head_dim / 2));
            let inv_freq = 1.0f32 / 10000f32.powf((2 * i) as f32 / head_dim as f32);
            let angle = (p as f32 * inv_freq) as f64;
            let tol = 1e-6 + p as f64 * 6e-8;
            assert!(
                (cs[0] as f64 - angle.cos()).abs() <= tol && (cs[1] as f64 - angle.sin()).abs() <= tol,
                "p {p} i {i}"
            );
        }
        let (x_buf, x_dev) = poisoned::<f16>(&gpu, tokens * row_len);
        gpu.upload(x_dev, &x).unwrap();
        let (_p, pos_dev) = upload(&gpu, &positions);
        gpu.rope_apply(x_dev, table, pos_dev, tokens, 2 * heads, head_dim, row_len).unwrap();
        let got = read(&gpu, &x_buf, x_dev, "rope");
        let mut want = widen(&x);
        let positions_usize: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let cpu_table = cpu::rope::RopeTable::new(head_dim, 10000.0, table_positions);
        cpu::rope::rope(&mut want, row_len, 2 * heads, &positions_usize, &cpu_table);
        for t in 0..tokens {
            let v = 2 * heads * head_dim;
            assert_eq!(&got[t * row_len + v..(t + 1) * row_len], &x[t * row_len + v..(t + 1) * row_len], "V moved");
        }
        // fp16 rounding of the result, plus the table's error times |x0| + |x1| ≤ 4.
        let tol = |w: f64| w.abs() * F16_HALF_ULP + 4.0 * (1e-6 + 600.0 * 6e-8) + F16_TINY;
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        assert_close(&widen(&got), &want, tol, &format!("rope, head size {head_dim}"));
    }
}

#[test]
fn rope_past_the_table_gives_nan_not_a_stray_read() {
    let Some(gpu) = gpu() else { return };
    let (head_dim, row_len) = (32, 96);
    let (_t, table) = poisoned::<[f32; 2]>(&gpu, 4 * head_dim / 2);
    gpu.rope_table(table, 4, head_dim, 10000.0).unwrap();
    let (x_buf, x) = poisoned::<f16>(&gpu, 2 * row_len);
    gpu.upload(x, &vec![f16::ONE; 2 * row_len]).unwrap();
    let (_p, positions) = upload(&gpu, &[3i32, 4]);
    gpu.rope_apply(x, table, positions, 2, 2, head_dim, row_len).unwrap();
    let got = read(&gpu, &x_buf, x, "rope");
    assert!(got[..2 * head_dim].iter().all(|v| v.is_finite()));
    assert!(got[row_len..row_len + 2 * head_dim].iter().all(|v| v.is_nan()));
}

/// Sequence lengths that straddle the 64-row query tiles and the 32-key steps.
const LENGTHS: [usize; 9] = [1, 2, 31, 33, 63, 64, 65, 129, 250];

#[test]
fn attention_matches_the_cpu_for_every_head_size() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("attention");
    for head_dim in HEAD_DIMS {
        let heads = if head_dim == 128 { 2 } else { 3 };
        let dim = heads * head_dim;
        let mut lengths = LENGTHS.to_vec();
        for i in (1..lengths.len()).rev() {
            lengths.swap(i, rng.random_range(0..=i));
        }
        let offsets = packed_offsets(&lengths);
        let tokens = *offsets.last().unwrap();
        let qkv = f16s(&uniform(&mut rng, tokens * 3 * dim, 2.0));
        let cu: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let mut tiles = Vec::new();
        attention_tiles(&offsets, &mut tiles);
        let (_q, qkv_dev) = upload(&gpu, &qkv);
        let (_c, cu_dev) = upload(&gpu, &cu);
        let (_t, tiles_dev) = upload(&gpu, &tiles);
        let (out_buf, out) = poisoned::<f16>(&gpu, tokens * dim);
        gpu.attention(qkv_dev, out, cu_dev, tiles_dev, tiles.len(), lengths.len(), heads, head_dim, tokens).unwrap();
        let got = widen(&read(&gpu, &out_buf, out, "attention"));
        // Same inputs again: a race would move the result.
        gpu.attention(qkv_dev, out, cu_dev, tiles_dev, tiles.len(), lengths.len(), heads, head_dim, tokens).unwrap();
        assert_eq!(widen(&gpu.download(out).unwrap()), got, "attention is not deterministic");

        let mut want = vec![f32::NAN; tokens * dim];
        cpu::causal_attention::causal_attention(&mut want, &widen(&qkv), &offsets, heads, head_dim);
        // P is rounded to fp16 before P·V (error ≤ 2^-11 · max|v| after dividing by the row sum) and the
        // output once more (2^-11 · |out|); twice that covers the fp32 sums' different order.
        let vmax = 2.0;
        let tol = |w: f64| 2.0 * F16_HALF_ULP * (vmax + w.abs()) + 1e-5;
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        assert_close(&got, &want, tol, &format!("attention, head size {head_dim}, lengths {lengths:?}"));
    }
}

#[test]
fn attention_keeps_sequences_apart_and_causal() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("attention causal");
    let (heads, head_dim) = (2, 64);
    let dim = heads * head_dim;
    let offsets = [0usize, 100, 170];
    let tokens = 170;
    let run = |qkv: &[f16]| {
        let cu: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let mut tiles = Vec::new();
        attention_tiles(&offsets, &mut tiles);
        let (_q, q) = upload(&gpu, qkv);
        let (_c, c) = upload(&gpu, &cu);
        let (_t, t) = upload(&gpu, &tiles);
        let (buf, out) = poisoned::<f16>(&gpu, tokens * dim);
        gpu.attention(q, out, c, t, tiles.len(), 2, heads, head_dim, tokens).unwrap();
        read(&gpu, &buf, out, "attention")
    };
    let qkv = f16s(&uniform(&mut rng, tokens * 3 * dim, 2.0));
    let base = run(&qkv);
    // Change every value of row 70 (sequence 0): rows 0..70 and all of sequence 1 must not move.
    let mut changed = qkv.clone();
    for v in &mut changed[70 * 3 * dim..71 * 3 * dim] {
        *v = f16::from_f32(-v.to_f32() * 1.5 + 0.25);
    }
    let after = run(&changed);
    assert_eq!(&after[..70 * dim], &base[..70 * dim]);
    assert_eq!(&after[100 * dim..], &base[100 * dim..]);
    assert_ne!(&after[70 * dim..71 * dim], &base[70 * dim..71 * dim]);
}

#[test]
fn swiglu_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("swiglu");
    let (tokens, ffn) = (53, 352);
    let mut gate_up = uniform(&mut rng, tokens * 2 * ffn, 6.0);
    gate_up[0] = -90.0; // e^90 overflows fp32: silu must still give -0, not NaN
    let gate_up = f16s(&gate_up);
    let (_g, gu) = upload(&gpu, &gate_up);
    let (out_buf, out) = poisoned::<f16>(&gpu, tokens * ffn);
    gpu.swiglu(out, gu, tokens, ffn).unwrap();
    let got = widen(&read(&gpu, &out_buf, out, "swiglu"));
    let mut want = vec![f32::NAN; tokens * ffn];
    cpu::swiglu::swiglu(&mut want, &widen(&gate_up), ffn);
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, f16_tol(1e-6), "swiglu");
}

#[test]
fn final_norm_pool_matches_norm_then_mean_then_l2() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("pool");
    for dim in [128, 4096] {
        let offsets = [0usize, 1, 9, 9 + 130, 9 + 130 + 64];
        let (seqs, tokens) = (offsets.len() - 1, offsets[offsets.len() - 1]);
        let x = uniform(&mut rng, tokens * dim, 3.0);
        let delta = f16s(&uniform(&mut rng, tokens * dim, 1.0));
        let w: Vec<f32> = (0..dim).map(|_| 0.5 + rng.random::<f32>()).collect();
        let cu: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let (_x, x_dev) = upload(&gpu, &x);
        let (_d, d_dev) = upload(&gpu, &delta);
        let (_w, w_dev) = upload(&gpu, &w);
        let (_c, c_dev) = upload(&gpu, &cu);
        let (out_buf, out) = poisoned::<f32>(&gpu, seqs * dim);
        gpu.final_norm_pool(out, x_dev, Some(d_dev), w_dev, c_dev, seqs, tokens, dim, 1e-6).unwrap();
        let got = read(&gpu, &out_buf, out, "pool");
        let summed: Vec<f32> = x.iter().zip(&delta).map(|(a, d)| a + d.to_f32()).collect();
        let mut normed = vec![f32::NAN; tokens * dim];
        cpu::rmsnorm::rmsnorm(&mut normed, &summed, &w, 1e-6);
        let mut want = vec![f32::NAN; seqs * dim];
        cpu::pool::mean_pool_l2(&mut want, &normed, &offsets, dim);
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        // fp32 throughout; components of a unit vector, summed in another order over ≤ 130 rows.
        assert_close(&got, &want, |w| 1e-5 * w.abs() + 2e-6, &format!("pool, width {dim}"));
    }
}

#[test]
fn conversions_round_like_the_half_crate_and_flag_overflow() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("convert");
    let n = 10_007;
    let mut values = uniform(&mut rng, n, 100.0);
    values[3] = 1e-9; // underflows fp16 to 0
    values[5] = f32::INFINITY; // stays inf without raising the overflow flag
    let bf: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let bits: Vec<u16> = bf.iter().map(|v| v.to_bits()).collect();
    let (_b, src) = upload(&gpu, &bits);
    let (_f, flag) = upload(&gpu, &[0u32]);
    let (out_buf, out) = poisoned::<f16>(&gpu, n);
    gpu.convert_bf16_f16(out, src, flag).unwrap();
    let got = read(&gpu, &out_buf, out, "bf16 → f16");
    for i in 0..n {
        assert_eq!(got[i].to_bits(), f16::from_f32(bf[i].to_f32()).to_bits(), "bf16 element {i}");
    }
    assert_eq!(gpu.download(flag).unwrap(), [0]);

    values[9] = 70000.0; // past fp16's 65504: the flag must be raised
    let (_s, src) = upload(&gpu, &values);
    let (out_buf, out) = poisoned::<f16>(&gpu, n);
    gpu.convert_f32_f16(out, src, flag).unwrap();
    let got = read(&gpu, &out_buf, out, "f32 → f16");
    for i in 0..n {
        assert_eq!(got[i].to_bits(), f16::from_f32(values[i]).to_bits(), "f32 element {i}");
    }
    assert_eq!(gpu.download(flag).unwrap(), [1]);
}

#[test]
fn random_fill_is_uniform_in_range_and_repeatable() {
    let Some(gpu) = gpu() else { return };
    let n = 1 << 20;
    let fill = |seed: u64| {
        let (buf, out) = poisoned::<f16>(&gpu, n);
        gpu.fill_uniform_f16(out, seed, 1.0, 0.5).unwrap();
        widen(&read(&gpu, &buf, out, "fill"))
    };
    let (a, b, c) = (fill(7), fill(7), fill(8));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|&v| (0.75..=1.25).contains(&v)), "outside centre ± spread/2");
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!((mean - 1.0).abs() < 1e-3, "mean {mean}");
    assert!((var - 0.25 / 12.0).abs() < 1e-3, "variance {var}");
}

#[test]
fn gemm_matches_the_cpu_in_f64() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("gemm");
    let (m, n, k) = (67, 130, 264);
    let x = f16s(&uniform(&mut rng, m * k, 1.0));
    let w = f16s(&uniform(&mut rng, n * k, 1.0));
    let (_x, x_dev) = upload(&gpu, &x);
    let (_w, w_dev) = upload(&gpu, &w);
    let (y_buf, y) = poisoned::<f16>(&gpu, m * n);
    gpu.gemm(y, x_dev, w_dev, m, n, k).unwrap();
    let got = widen(&read(&gpu, &y_buf, y, "gemm"));
    let (xf, wf) = (widen(&x), widen(&w));
    let mut want = vec![f32::NAN; m * n];
    cpu::gemm::a_bt(&mut want, &xf, &wf, m, n, k, false);
    // Products of fp16 values are exact in fp32; the sums differ only in order (k · 2^-24 · Σ|x·w| ≤ 2e-5
    // here), then the result is rounded to fp16.
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, |w| w.abs() * F16_HALF_ULP + 1e-4, "gemm");
}

#[test]
fn the_launch_profiler_times_every_kernel_and_gemm_while_on_and_nothing_else() {
    let Some(gpu) = gpu() else { return };
    let (m, n, k) = (64, 96, 128);
    let (_x, x) = poisoned::<f16>(&gpu, m * k);
    let (_w, w) = poisoned::<f16>(&gpu, n * k);
    let (_y, y) = poisoned::<f16>(&gpu, m * n);
    let work = || {
        gpu.fill_uniform_f16(x, 1, 0.0, 1.0).unwrap();
        gpu.fill_uniform_f16(w, 2, 0.0, 1.0).unwrap();
        gpu.gemm(y, x, w, m, n, k).unwrap();
        gpu.sync().unwrap();
    };
    work();
    assert!(gpu.profiler.take().unwrap().is_empty(), "the profiler recorded while off");
    gpu.profiler.start(&gpu.ctx);
    for _ in 0..2 {
        work();
        let got = gpu.profiler.take().unwrap();
        let labels: Vec<&str> = got.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["fill_uniform_f16", "fill_uniform_f16", "gemm a_bt 64×96×128"]);
        assert_eq!(got.iter().map(|t| t.flops).collect::<Vec<_>>(), [0.0, 0.0, 2.0 * (m * n * k) as f64]);
        assert!(got.iter().all(|t| t.ms.is_finite() && t.ms >= 0.0), "{got:?}");
    }
    gpu.profiler.stop();
    work();
    assert!(gpu.profiler.take().unwrap().is_empty(), "the profiler recorded after stop");
}

/// `bench kernels` for an LLM preset launches every embedding kernel over one packed batch on random
/// inputs. On the emulator the times mean nothing, but each launch must pass its launcher's checks and run
/// to the end, so that the GPU run's bench has no surprise left but the figures.
#[test]
fn bench_kernels_launches_every_embedding_kernel() {
    let Some(gpu) = gpu() else { return };
    let config = LlmConfig::preset("tiny").unwrap();
    let offsets = packed_offsets(&[70, 5, 33]);
    let mut kernels = embed_kernels(&gpu, &config, &offsets).unwrap();
    assert_eq!((kernels.rows, kernels.sequences), (108, 3));
    let rows = time_kernels(&gpu, &mut kernels, (1, 1), (1.0, 1.0)).unwrap();
    let names = [
        "embedding_gather",
        "rmsnorm_residual",
        "rope_apply",
        "attention",
        "swiglu",
        "final_norm_pool",
        "convert_bf16_f16",
    ];
    assert_kernel_rows(&rows, &names, &["attention"]);
}
