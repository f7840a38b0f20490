//! `bench kernels` (SPEC §7): each kernel of one batch, alone, against its floor: the larger of its least
//! bytes over the copy bandwidth and its products' operations over cuBLAS's fp16 GEMM rate, both measured
//! in the same run, so a figure means the same on a V100 and an H100. The embedding kernels here, the
//! training kernels in [`super::bench_train_kernels`]; both build a [`KernelSet`], which the command, the
//! criterion benches (benches/) and the tests that run every launch on the emulator share.

use super::Gpu;
use super::bench::{copy_gbps, device_json, gemm_seconds, gemm_tflops, refuse_emulated, time_on_stream};
use super::memory::{Dev, DeviceBuffer, Layout};
use super::ops::attention_tiles;
use crate::llm::LlmConfig;
use anyhow::{Result, ensure};
use half::f16;
use serde_json::{Value, json};

/// The least work a kernel must do: the bytes it moves through device memory (each input read once, each
/// output written once) and the floating-point operations of its products (0 for elementwise work).
#[derive(Clone, Copy, Debug)]
pub struct KernelWork {
    pub bytes: f64,
    pub flops: f64,
}

impl KernelWork {
    pub fn bytes(bytes: f64) -> Self {
        KernelWork { bytes, flops: 0.0 }
    }

    /// Whether the operations bound the kernel on every GPU the engine runs on: more of them per byte than
    /// a V100's ridge point (≈ 125: 100 TFLOP/s of fp16 GEMM over 800 GB/s), the lowest of them.
    pub fn compute_bound(&self) -> bool {
        self.flops > 125.0 * self.bytes
    }

    /// A GEMM `[m, k] · [n, k]ᵀ → [m, n]` in fp16.
    pub fn gemm(m: usize, n: usize, k: usize) -> Self {
        KernelWork { bytes: 2.0 * (m * k + n * k + m * n) as f64, flops: 2.0 * (m * n * k) as f64 }
    }
}

/// A `bench kernels` row: the kernel's time against its floor, the larger of its bytes over the copy
/// bandwidth `copy` (GB/s) and its operations over the GEMM rate `gemm_peak` (TFLOP/s); `bound` names the
/// larger. Its GB/s (and TFLOP/s where it has products) are given as fractions of those ceilings.
fn kernel_row(name: &str, seconds: f64, work: KernelWork, copy: f64, gemm_peak: f64) -> Value {
    let (memory, compute) = (work.bytes / (copy * 1e9), work.flops / (gemm_peak * 1e12));
    let gbps = work.bytes / seconds / 1e9;
    let mut row = json!({
        "kernel": name,
        "us": seconds * 1e6,
        "floor_us": memory.max(compute) * 1e6,
        "fraction_of_floor": memory.max(compute) / seconds,
        "bound": if compute > memory { "compute" } else { "memory" },
        "gbps": gbps,
        "fraction_of_copy": gbps / copy,
    });
    if work.flops > 0.0 {
        let tflops = work.flops / seconds / 1e12;
        row["tflops"] = json!(tflops);
        row["fraction_of_gemm_peak"] = json!(tflops / gemm_peak);
    }
    row
}

/// A launch of a kernel on inputs that live as long as the GPU `'g`.
pub type Launch<'g> = Box<dyn FnMut() -> Result<()> + 'g>;

/// One kernel of a [`KernelSet`]: its name, its least work, and a launch of it.
pub struct KernelCase<'g> {
    pub name: &'static str,
    pub work: KernelWork,
    pub launch: Launch<'g>,
}

/// Kernels ready to launch at one batch's shapes, on random inputs held in one device buffer, in an order
/// where each reads what an earlier one wrote: launch them in turn.
pub struct KernelSet<'g> {
    pub cases: Vec<KernelCase<'g>>,
    /// The batch: its rows (tokens) and sequences.
    pub rows: usize,
    pub sequences: usize,
    _buffer: DeviceBuffer,
}

impl<'g> KernelSet<'g> {
    /// The set of `cases` over a batch of `rows` rows in `sequences` sequences, whose inputs `buffer` holds.
    pub(super) fn new(
        cases: Vec<(&'static str, KernelWork, Launch<'g>)>,
        rows: usize,
        sequences: usize,
        buffer: DeviceBuffer,
    ) -> Self {
        let cases = cases.into_iter().map(|(name, work, launch)| KernelCase { name, work, launch }).collect();
        KernelSet { cases, rows, sequences, _buffer: buffer }
    }
}

/// Times each kernel of `set` ([`time_on_stream`]: `warmup` untimed launches, then the median of rounds of
/// `runs`) into a report row against the ceilings `copy` (GB/s) and `gemm_peak` (TFLOP/s).
pub fn time_kernels(
    gpu: &Gpu,
    set: &mut KernelSet,
    (warmup, runs): (usize, usize),
    (copy, gemm_peak): (f64, f64),
) -> Result<Vec<Value>> {
    let mut rows = Vec::with_capacity(set.cases.len());
    for case in &mut set.cases {
        let seconds = time_on_stream(gpu, warmup, runs, &mut case.launch)?;
        rows.push(kernel_row(case.name, seconds, case.work, copy, gemm_peak));
    }
    Ok(rows)
}

/// The `bench kernels` report on `gpu` (refused on the emulator): the ceilings, each kernel of the set
/// `build` makes, then cuBLAS at each of `gemms` (name, n, k) with the batch's rows as m, the set freed
/// first. `batch` adds the batch's own fields to the report.
pub(super) fn kernels_report<'g>(
    gpu: &'g Gpu,
    preset: &str,
    build: impl FnOnce() -> Result<KernelSet<'g>>,
    gemms: &[(&str, usize, usize)],
    batch: Value,
) -> Result<Value> {
    refuse_emulated(gpu)?;
    let ceilings = (copy_gbps(gpu, 1 << 30)?, gemm_tflops(gpu, 8192, 8192, 8192)?);
    let mut set = build()?;
    let mut rows = time_kernels(gpu, &mut set, (3, 20), ceilings)?;
    let (m, sequences) = (set.rows, set.sequences);
    drop(set);
    for &(name, n, k) in gemms {
        rows.push(kernel_row(name, gemm_seconds(gpu, m, n, k)?, KernelWork::gemm(m, n, k), ceilings.0, ceilings.1));
    }
    let mut report = json!({
        "bench": "kernels",
        "preset": preset,
        "device": device_json(gpu),
        "tokens": m,
        "sequences": sequences,
        "copy_gbps": ceilings.0,
        "gemm_peak_tflops": ceilings.1,
        "kernels": rows,
    });
    if let (Some(report), Some(batch)) = (report.as_object_mut(), batch.as_object()) {
        report.extend(batch.clone());
    }
    Ok(report)
}

/// `bench kernels` for an LLM preset: the embedding kernels over one batch of `batch_tokens` tokens, the
/// `lengths` in order up to the budget, and the layer's GEMMs.
pub fn bench_kernels(
    ordinal: usize,
    preset: &str,
    c: &LlmConfig,
    lengths: &[usize],
    batch_tokens: usize,
) -> Result<Value> {
    let mut offsets = vec![0usize];
    for &n in lengths {
        if offsets[offsets.len() - 1] + n > batch_tokens {
            break;
        }
        offsets.push(offsets[offsets.len() - 1] + n);
    }
    ensure!(offsets.len() > 1, "no item fits --batch-tokens {batch_tokens}");
    let gpu = Gpu::open(ordinal)?;
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let gemms = [("gemm_w_pack", 3 * d, d), ("gemm_o_proj", d, d), ("gemm_gate_up", 2 * f, d), ("gemm_down", d, f)];
    kernels_report(&gpu, preset, || embed_kernels(&gpu, c, &offsets), &gemms, json!({}))
}

/// The embedding kernels of model `c` over sequences packed at `offsets` on `gpu`, their inputs random.
pub fn embed_kernels<'g>(gpu: &'g Gpu, c: &LlmConfig, offsets: &[usize]) -> Result<KernelSet<'g>> {
    let (d, f, heads, dh) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim());
    ensure!(offsets.len() > 1 && offsets[0] == 0, "bench kernels: no sequence in the batch");
    let (t, s) = (offsets[offsets.len() - 1], offsets.len() - 1);
    let mut tiles = Vec::new();
    attention_tiles(offsets, &mut tiles);
    let positions: Vec<i32> = offsets.windows(2).flat_map(|w| 0..(w[1] - w[0]) as i32).collect();
    let cu: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    let vocab = c.vocab_size.min(32000);
    let ids: Vec<u32> = (0..t).map(|i| (i * 7919 % vocab) as u32).collect();

    let mut layout = Layout::default();
    let o = [
        layout.take::<f32>(t * d),              // x
        layout.take::<f16>(t * d),              // h
        layout.take::<f16>(t * d),              // delta
        layout.take::<f16>(t * 3 * d),          // qkv
        layout.take::<f16>(t * d),              // attention output
        layout.take::<f16>(t * 2 * f),          // gate_up
        layout.take::<f16>(t * f),              // act
        layout.take::<f16>(vocab * d),          // embedding table
        layout.take::<f32>(d),                  // norm weight
        layout.take::<[f32; 2]>(4096 * dh / 2), // rope table
        layout.take::<u32>(t),                  // ids
        layout.take::<i32>(t),                  // positions
        layout.take::<i32>(s + 1),              // cu_seqlens
        layout.take::<[i32; 2]>(tiles.len()),
        layout.take::<f32>(s * d), // pooled
        layout.take::<u16>(t * d), // bf16 source for the conversion
        layout.take::<u32>(1),     // overflow flag
    ];
    let buffer = gpu.alloc(layout.bytes(), "kernel benchmark buffers")?;
    let x: Dev<f32> = buffer.view(o[0], t * d);
    let h: Dev<f16> = buffer.view(o[1], t * d);
    let delta: Dev<f16> = buffer.view(o[2], t * d);
    let qkv: Dev<f16> = buffer.view(o[3], t * 3 * d);
    let attn: Dev<f16> = buffer.view(o[4], t * d);
    let gate_up: Dev<f16> = buffer.view(o[5], t * 2 * f);
    let act: Dev<f16> = buffer.view(o[6], t * f);
    let table: Dev<f16> = buffer.view(o[7], vocab * d);
    let norm: Dev<f32> = buffer.view(o[8], d);
    let rope: Dev<[f32; 2]> = buffer.view(o[9], 4096 * dh / 2);
    let ids_dev: Dev<u32> = buffer.view(o[10], t);
    let pos_dev: Dev<i32> = buffer.view(o[11], t);
    let cu_dev: Dev<i32> = buffer.view(o[12], s + 1);
    let tiles_dev: Dev<[i32; 2]> = buffer.view(o[13], tiles.len());
    let pooled: Dev<f32> = buffer.view(o[14], s * d);
    let bf16_src: Dev<u16> = buffer.view(o[15], t * d);
    let flag: Dev<u32> = buffer.view(o[16], 1);
    for (i, dst) in [h, delta, qkv, attn, gate_up, act, table].into_iter().enumerate() {
        gpu.fill_uniform_f16(dst, 10 + i as u64, 0.0, 2.0)?;
    }
    gpu.fill_uniform_f32(x, 20, 0.0, 2.0)?;
    gpu.fill_uniform_f32(norm, 21, 1.0, 0.5)?;
    gpu.fill_uniform_f16(bf16_src.cast(), 22, 0.0, 1.0)?; // any bits: a conversion's speed does not depend on them
    gpu.rope_table(rope, 4096, dh, c.rope_theta as f32)?;
    gpu.upload(ids_dev, &ids)?;
    gpu.upload(pos_dev, &positions)?;
    gpu.upload(cu_dev, &cu)?;
    gpu.upload(tiles_dev, &tiles)?;
    gpu.upload(flag, &[0])?;

    let eps = c.rms_norm_eps as f32;
    let pairs: f64 = offsets.windows(2).map(|w| ((w[1] - w[0]) * (w[1] - w[0] + 1) / 2) as f64).sum();
    let (td, tf) = ((t * d) as f64, (t * f) as f64);
    // Each kernel: name, its least work (KernelWork: the attention has products too) and the launch.
    let bytes = KernelWork::bytes;
    let cases: Vec<(&'static str, KernelWork, Launch<'g>)> = vec![
        (
            "embedding_gather",
            bytes(td * 2.0 + td * 4.0 + t as f64 * 4.0),
            Box::new(move || gpu.embedding_gather(x, table, ids_dev, t, d)),
        ),
        (
            "rmsnorm_residual",
            bytes(td * (4.0 + 2.0 + 4.0 + 2.0)),
            Box::new(move || gpu.rmsnorm_residual(x, Some(delta), norm, h, t, d, eps)),
        ),
        (
            "rope_apply",
            bytes(td * 2.0 * 2.0 * 2.0),
            Box::new(move || gpu.rope_apply(qkv, rope, pos_dev, t, 2 * heads, dh, 3 * d)),
        ),
        (
            "attention",
            KernelWork { bytes: td * (3.0 + 1.0) * 2.0, flops: 4.0 * d as f64 * pairs },
            Box::new(move || gpu.attention(qkv, attn, cu_dev, tiles_dev, tiles.len(), s, heads, dh, t)),
        ),
        ("swiglu", bytes(tf * (4.0 + 2.0)), Box::new(move || gpu.swiglu(act, gate_up, t, f))),
        (
            "final_norm_pool",
            bytes(td * (4.0 + 2.0) + (s * d * 4) as f64),
            Box::new(move || gpu.final_norm_pool(pooled, x, Some(delta), norm, cu_dev, s, t, d, eps)),
        ),
        ("convert_bf16_f16", bytes(td * 4.0), Box::new(move || gpu.convert_bf16_f16(h, bf16_src, flag))),
    ];
    Ok(KernelSet::new(cases, t, s, buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_row_holds_the_time_to_the_larger_of_its_two_floors() {
        // 3 GB over 3,000 GB/s: a 1 ms floor; 2 TFLOP over 1,000 TFLOP/s: 2 ms.
        let row = kernel_row("k", 4e-3, KernelWork { bytes: 3e9, flops: 2e12 }, 3000.0, 1000.0);
        assert_eq!((row["bound"].as_str(), row["floor_us"].as_f64()), (Some("compute"), Some(2000.0)));
        assert_eq!(row["fraction_of_floor"].as_f64(), Some(0.5));
        assert_eq!((row["gbps"].as_f64(), row["tflops"].as_f64()), (Some(750.0), Some(500.0)));
        assert_eq!((row["fraction_of_copy"].as_f64(), row["fraction_of_gemm_peak"].as_f64()), (Some(0.25), Some(0.5)));
        let row = kernel_row("k", 2e-3, KernelWork::bytes(3e9), 3000.0, 1000.0);
        assert_eq!((row["bound"].as_str(), row["fraction_of_floor"].as_f64()), (Some("memory"), Some(0.5)));
        assert!(row.get("tflops").is_none());
        let gemm = KernelWork::gemm(2, 3, 4);
        assert_eq!((gemm.bytes, gemm.flops), (2.0 * (8 + 12 + 6) as f64, 48.0));
    }
}
