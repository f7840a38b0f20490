//! `learn-kern bench embed|train|kernels` (SPEC §7): throughput of the CUDA embedding and training engines
//! and of their kernels, against ceilings measured in the same run.

use crate::cli::Common;
use crate::cuda::bench::{EmbedBenchSpec, bench_embed, random_lengths};
use crate::cuda::bench_kernels::bench_kernels;
use crate::cuda::bench_train::{TrainBenchSpec, bench_train};
use crate::cuda::bench_train_kernels::{TrainKernelShape, bench_train_kernels};
use crate::device::DeviceRequest;
use crate::error::{at_least_one, input};
use crate::llm::LlmConfig;
use crate::pch::PchConfig;
use crate::pch::config::ItemTower;
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Content-embedding throughput: tokens/s, items/s, TFLOP/s against cuBLAS's fp16 GEMM rate, memory.
    Embed(EmbedBench),
    /// PCH training throughput: steps/s, users/s, tokens/s, MFU against cuBLAS's fp16 GEMM rate, memory.
    Train(TrainBench),
    /// Each kernel's time against its floor (its least bytes over the measured copy bandwidth, its
    /// operations over the measured GEMM rate): the embedding kernels for an LLM preset, the training
    /// kernels at one step's shapes for a PCH one (--preset pch-base or pch-small).
    Kernels(KernelBench),
}

#[derive(Args, Debug)]
pub struct TrainBench {
    /// Model shape: pch-base (the paper's 12 × 768 over 4096-d content) or pch-small (4 × 256, 512-d).
    #[arg(long, default_value = "pch-base")]
    pub preset: String,
    /// Content width, instead of the preset's.
    #[arg(long)]
    pub d_content: Option<usize>,
    /// How the item tower runs over the targets: causal or self.
    #[arg(long, default_value = "causal")]
    pub item_tower: String,
    #[arg(long, default_value_t = 30)]
    pub batch_users: usize,
    /// History items per user (every user has exactly this many).
    #[arg(long, default_value_t = 80)]
    pub history: usize,
    /// Target items per user.
    #[arg(long, default_value_t = 40)]
    pub targets: usize,
    /// Catalogue size: rows of the random content table the batches gather from.
    #[arg(long, default_value_t = 100_000)]
    pub items: usize,
    /// Updates run before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Timed updates.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Seed of the weights, the content and the users.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// on replays each update from the CUDA graph of its shape bucket; off launches every kernel from the
    /// host (and times the phases of the update).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub cuda_graphs: String,
    /// Updates run after the timed ones with each launch timed: device time per kernel and GEMM shape
    /// (`profile` in the report). 0: none.
    #[arg(long, default_value_t = 0)]
    pub profile: usize,
}

impl TrainBench {
    fn spec(&self) -> Result<TrainBenchSpec> {
        let mut config = PchConfig::preset(&self.preset)?;
        if let Some(d) = self.d_content {
            config = config.with_d_content(d);
        }
        config.item_tower = ItemTower::parse(&self.item_tower)?;
        config.validate()?;
        at_least_one(&[("--batch-users", self.batch_users), ("--history", self.history), ("--targets", self.targets)])?;
        crate::cuda::trainer::check_trainable(&config, self.targets)?;
        Ok(TrainBenchSpec {
            preset: self.preset.clone(),
            config,
            batch_users: self.batch_users,
            history: self.history,
            targets: self.targets,
            items: self.items,
            warmup: self.warmup,
            steps: self.steps,
            seed: self.seed,
            cuda_graphs: self.cuda_graphs == "on",
            profile: self.profile,
        })
    }
}

/// Items to run: random lengths or a file of them.
#[derive(Args, Debug)]
pub struct Items {
    /// Model shape: tiny, small or baichuan2-7b (random weights made on the GPU).
    #[arg(long, default_value = "baichuan2-7b")]
    pub preset: String,
    /// Real tokens per batch (sequences packed, no padding).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Number of items (random lengths).
    #[arg(long, default_value_t = 2048)]
    pub items: usize,
    /// Shortest random item, in tokens.
    #[arg(long, default_value_t = 16)]
    pub min_len: usize,
    /// Longest random item, in tokens.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Item lengths from a file, one integer per line, instead of random ones.
    #[arg(long)]
    pub lengths: Option<PathBuf>,
    /// Write the lengths used to this file (for the peers in tools/peer/, so they run the same items).
    #[arg(long)]
    pub save_lengths: Option<PathBuf>,
    /// Seed of the lengths, the token ids and the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct EmbedBench {
    #[command(flatten)]
    pub items: Items,
    /// Batches run before timing (the longest ones).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Runs of the fullest batch after the timed ones, one at a time, with each launch timed: device time per
    /// kernel and GEMM shape (`profile` in the report). 0: none.
    #[arg(long, default_value_t = 0)]
    pub profile: usize,
}

#[derive(Args, Debug)]
pub struct KernelBench {
    // With a PCH preset (pch-base, pch-small) only --preset, --device and --json of these apply.
    #[command(flatten)]
    pub items: Items,
    /// PCH presets: users per batch (every user has --history and --targets items).
    #[arg(long, default_value_t = 256)]
    pub batch_users: usize,
    /// PCH presets: history items per user.
    #[arg(long, default_value_t = 80)]
    pub history: usize,
    /// PCH presets: target items per user.
    #[arg(long, default_value_t = 40)]
    pub targets: usize,
    /// PCH presets: catalogue rows the top-K ranks the batch's users against.
    #[arg(long, default_value_t = 100_000)]
    pub gallery: usize,
}

impl KernelBench {
    /// The PCH model and batch of `--preset pch-*`, checked as `bench train` checks them; None for an LLM
    /// preset.
    fn training(&self) -> Result<Option<(PchConfig, TrainKernelShape)>> {
        if !self.items.preset.starts_with("pch-") {
            return Ok(None);
        }
        let config = PchConfig::preset(&self.items.preset)?;
        at_least_one(&[
            ("--batch-users", self.batch_users),
            ("--history", self.history),
            ("--targets", self.targets),
            ("--gallery", self.gallery),
        ])?;
        crate::cuda::trainer::check_trainable(&config, self.targets)?;
        let shape = TrainKernelShape {
            batch_users: self.batch_users,
            history: self.history,
            targets: self.targets,
            gallery: self.gallery,
        };
        Ok(Some((config, shape)))
    }
}

/// Reads `--lengths`: one positive integer per line, blank lines ignored.
fn read_lengths(path: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path).map_err(|e| input(format!("{}: cannot read ({e})", path.display())))?;
    let mut lengths = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<usize>() {
            Ok(n) if n > 0 => lengths.push(n),
            _ => {
                return Err(input(format!(
                    "{} line {}: expected a positive token count, found {line:?}",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    if lengths.is_empty() {
        return Err(input(format!("{}: holds no lengths", path.display())));
    }
    Ok(lengths)
}

impl Items {
    /// The config and the item lengths, checked against each other and the token budget.
    fn resolve(&self) -> Result<(LlmConfig, Vec<usize>)> {
        let config = LlmConfig::preset(&self.preset)?;
        let lengths = match &self.lengths {
            Some(path) => read_lengths(path)?,
            None => {
                if self.items == 0 || self.min_len == 0 || self.min_len > self.max_len {
                    return Err(input(format!(
                        "--items {} --min-len {} --max-len {}: expected at least one item and 1 ≤ min ≤ max",
                        self.items, self.min_len, self.max_len
                    )));
                }
                random_lengths(self.items, self.min_len, self.max_len, self.seed)
            }
        };
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let limit = config.max_position_embeddings.min(self.batch_tokens);
        if longest > limit {
            return Err(input(format!(
                "an item of {longest} tokens exceeds the {limit} that --batch-tokens {} and the model's {} positions allow",
                self.batch_tokens, config.max_position_embeddings
            )));
        }
        if let Some(path) = &self.save_lengths {
            let text: String = lengths.iter().map(|n| format!("{n}\n")).collect();
            crate::fsutil::write_atomic(path, text.as_bytes())?;
        }
        Ok((config, lengths))
    }
}

/// The one GPU a benchmark runs on: the first of `--device cuda:N,…`, else 0; the CPU is refused with the
/// reason the GPU is unusable.
fn ordinal(common: &Common) -> Result<usize> {
    let request = DeviceRequest::parse(&common.device)?;
    if request == DeviceRequest::Cpu {
        return Err(input("bench measures the CUDA engine; --device cpu has nothing to measure"));
    }
    let count = crate::cuda::probe().map_err(|why| anyhow::anyhow!("bench needs a usable CUDA device: {why}"))?;
    let ordinal = match request {
        DeviceRequest::Cuda(list) => list[0],
        _ => 0,
    };
    if ordinal >= count {
        return Err(input(format!("--device: there is no cuda:{ordinal} ({count} device(s) found)")));
    }
    Ok(ordinal)
}

pub fn run(args: &BenchArgs, common: &Common) -> Result<()> {
    let report = match &args.what {
        BenchWhat::Embed(bench) => {
            let (config, lengths) = bench.items.resolve()?;
            let ordinal = ordinal(common)?;
            let spec = EmbedBenchSpec {
                preset: &bench.items.preset,
                config,
                lengths: &lengths,
                batch_tokens: bench.items.batch_tokens,
                seed: bench.items.seed,
                warmup_batches: bench.warmup,
                profile: bench.profile,
            };
            let report = bench_embed(ordinal, &spec, common.quiet)?;
            common.notice(embed_summary(&report) + &profile_summary(&report["profile"]));
            report
        }
        BenchWhat::Train(bench) => {
            let spec = bench.spec()?;
            let report = bench_train(ordinal(common)?, &spec, common.quiet)?;
            common.notice(train_summary(&report));
            report
        }
        BenchWhat::Kernels(bench) => {
            let preset = &bench.items.preset;
            let report = match bench.training()? {
                Some((config, shape)) => bench_train_kernels(ordinal(common)?, preset, &config, shape)?,
                None => {
                    let (config, lengths) = bench.items.resolve()?;
                    bench_kernels(ordinal(common)?, preset, &config, &lengths, bench.items.batch_tokens)?
                }
            };
            common.notice(kernels_summary(&report));
            report
        }
    };
    common.write_json(&report)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// The human-readable lines of a `bench embed` report.
fn embed_summary(r: &Value) -> String {
    let gib = |bytes: &Value| bytes.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    format!(
        "{} on {}: {} items, {} tokens in {:.2} s\n  {:.0} tokens/s, {:.1} items/s, {:.1} TFLOP/s\n  \
         cuBLAS fp16 GEMM: {:.1} TFLOP/s peak, {:.1} at the model's shapes → {:.0}% of peak ({:.0}% of the \
         model's GEMMs); target {:.0} tokens/s\n  padding efficiency {:.2}, batch fill {:.2}\n  memory: weights \
         {:.2} GiB, activations {:.2} GiB, device in use {:.2} of {:.2} GiB",
        r["preset"].as_str().unwrap_or("?"),
        r["device"]["name"].as_str().unwrap_or("?"),
        r["items"],
        r["tokens"],
        num(r, "seconds"),
        num(r, "tokens_per_s"),
        num(r, "items_per_s"),
        num(r, "tflops"),
        num(r, "gemm_peak_tflops"),
        num(r, "gemm_model_shapes_tflops"),
        100.0 * num(r, "fraction_of_gemm_peak"),
        100.0 * num(r, "fraction_of_model_gemms"),
        num(r, "target_tokens_per_s"),
        num(r, "padding_efficiency"),
        num(r, "batch_fill"),
        gib(&r["memory"]["weights_bytes"]),
        gib(&r["memory"]["arena_bytes"]),
        gib(&r["memory"]["device_used_bytes"]),
        gib(&r["memory"]["device_total_bytes"]),
    )
}

/// Launches a profile lists in the text summary (the JSON report has them all).
const PROFILE_LINES: usize = 15;

/// The human-readable lines of a `bench train` report.
fn train_summary(r: &Value) -> String {
    let gib = |bytes: &Value| bytes.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let phases = match r["cuda_graphs"].as_bool() {
        Some(true) => format!("CUDA graphs ({} captured): the phases are not timed", r["cuda_graphs_captured"]),
        _ => format!(
            "device time: towers forward {:.2} ms, InfoNCE {:.2} ms ({:.1}% of the update), towers backward {:.2} \
             ms, optimiser {:.2} ms",
            num(&r["phases_ms"], "towers_forward"),
            num(&r["phases_ms"], "infonce"),
            100.0 * num(r, "infonce_fraction"),
            num(&r["phases_ms"], "towers_backward"),
            num(&r["phases_ms"], "optimizer"),
        ),
    };
    format!(
        "{} on {}: {} users × ({} + {}) items, median of {} updates\n  {:.2} ms/update ({:.2}–{:.2}), {:.1} \
         updates/s, {:.0} users/s, {:.0} tokens/s\n  {:.1} TFLOP/s = {:.0}% MFU of cuBLAS's fp16 GEMM rate ({:.1} \
         TFLOP/s)\n  memory: parameters and optimiser {:.2} GiB, activations {:.2} GiB, staging {:.2} GiB, device \
         in use {:.2} of {:.2} GiB; {} updates skipped for overflow\n  {phases}",
        r["preset"].as_str().unwrap_or("?"),
        r["device"]["name"].as_str().unwrap_or("?"),
        r["batch_users"],
        r["history"],
        r["targets"],
        r["steps"],
        num(r, "step_ms_median"),
        num(r, "step_ms_p10"),
        num(r, "step_ms_p90"),
        num(r, "steps_per_s"),
        num(r, "users_per_s"),
        num(r, "tokens_per_s"),
        num(r, "tflops"),
        100.0 * num(r, "mfu"),
        num(r, "gemm_peak_tflops"),
        gib(&r["memory"]["parameters_and_optimizer_bytes"]),
        gib(&r["memory"]["activation_bytes"]),
        gib(&r["memory"]["staging_bytes"]),
        gib(&r["memory"]["device_used_bytes"]),
        gib(&r["memory"]["device_total_bytes"]),
        r["skipped_steps"],
    ) + &profile_summary(&r["profile"])
}

/// The longest launches of a `bench train|embed --profile` report, one line each; nothing without one.
fn profile_summary(p: &Value) -> String {
    let Some(launches) = p["launches"].as_array() else { return String::new() };
    let unit = p["per"].as_str().unwrap_or("?");
    let units = if unit == "batch" { "batches" } else { "updates" };
    let mut out = format!(
        "\n  profile of {} {units}, launches from the host: {:.2} ms of device time per {unit} in {} kernels and \
         GEMM shapes (measured {:.2} ms per {unit}); the longest:",
        p["units"],
        num(p, "profiled_ms"),
        launches.len(),
        num(p, "measured_ms"),
    );
    for l in launches.iter().take(PROFILE_LINES) {
        let tflops = l["tflops"].as_f64().map(|x| format!(", {x:.1} TFLOP/s")).unwrap_or_default();
        out += &format!(
            "\n    {:>8.3} ms {:>5.1}%  ×{:<4} {}{tflops}",
            num(l, "ms"),
            100.0 * num(l, "share"),
            num(l, "calls"),
            l["name"].as_str().unwrap_or("?"),
        );
    }
    out
}

/// The table of a `bench kernels` report.
fn kernels_summary(r: &Value) -> String {
    let batch = match r.get("batch_users") {
        Some(b) => format!("{b} users × ({} + {}) items, {} rows", r["history"], r["targets"], r["tokens"]),
        None => format!("{} tokens, {} sequences", r["tokens"], r["sequences"]),
    };
    let mut out = format!(
        "{} kernels on {} ({batch}): copy {:.0} GB/s, GEMM {:.1} TFLOP/s\n",
        r["preset"].as_str().unwrap_or("?"),
        r["device"]["name"].as_str().unwrap_or("?"),
        num(r, "copy_gbps"),
        num(r, "gemm_peak_tflops")
    );
    for k in r["kernels"].as_array().into_iter().flatten() {
        let name = k["kernel"].as_str().unwrap_or("?");
        let tflops = match k.get("tflops") {
            Some(_) => format!("{:>7.1} TFLOP/s", num(k, "tflops")),
            None => " ".repeat(15),
        };
        out += &format!(
            "  {name:<20} {:>9.1} µs {:>6.0} GB/s {tflops}  {:>3.0}% of the {} floor\n",
            num(k, "us"),
            num(k, "gbps"),
            100.0 * num(k, "fraction_of_floor"),
            k["bound"].as_str().unwrap_or("?"),
        );
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernels_table_gives_each_kernel_s_time_against_its_floor() {
        let report = serde_json::json!({
            "preset": "pch-base", "device": {"name": "H100"}, "batch_users": 256, "history": 80, "targets": 40,
            "tokens": 30720, "sequences": 512, "copy_gbps": 3000.0, "gemm_peak_tflops": 700.0,
            "kernels": [
                {"kernel": "layernorm_fwd", "us": 50.0, "gbps": 1500.0, "fraction_of_floor": 0.5, "bound": "memory"},
                {"kernel": "masked_attention_fwd", "us": 250.0, "gbps": 750.0, "tflops": 12.5,
                 "fraction_of_floor": 0.25, "bound": "memory"},
                {"kernel": "gemm_up", "us": 40.0, "gbps": 400.0, "tflops": 630.0, "fraction_of_floor": 0.9,
                 "bound": "compute"},
            ],
        });
        let text = kernels_summary(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "pch-base kernels on H100 (256 users × (80 + 40) items, 30720 rows): copy 3000 GB/s, GEMM 700.0 TFLOP/s"
        );
        assert_eq!(
            lines[1],
            "  layernorm_fwd             50.0 µs   1500 GB/s                   50% of the memory floor"
        );
        assert_eq!(
            lines[2],
            "  masked_attention_fwd     250.0 µs    750 GB/s    12.5 TFLOP/s   25% of the memory floor"
        );
        assert_eq!(
            lines[3],
            "  gemm_up                   40.0 µs    400 GB/s   630.0 TFLOP/s   90% of the compute floor"
        );
        let embed = serde_json::json!({"preset": "tiny", "device": {"name": "H100"}, "tokens": 8000, "sequences": 99});
        assert!(kernels_summary(&embed).starts_with("tiny kernels on H100 (8000 tokens, 99 sequences): copy"));
    }

    #[test]
    fn a_profile_lists_its_longest_launches_with_gemm_rates() {
        assert_eq!(profile_summary(&Value::Null), "");
        let mut summary = crate::cuda::profile::ProfileSummary::default();
        let timed = |label: &str, flops: f64, ms: f64| crate::cuda::profile::Timed { label: label.into(), flops, ms };
        summary.add_unit(vec![timed("layernorm_fwd", 0.0, 0.25), timed("gemm a_bt 64×64×64", 4e9, 1.0)]);
        let text = profile_summary(&summary.to_json("update", 1.5));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("profile of 1 updates") && lines[1].contains("1.25 ms of device time per update"));
        assert!(lines[1].contains("in 2 kernels") && lines[1].contains("measured 1.50 ms"), "{text}");
        assert_eq!(lines[2], "       1.000 ms  80.0%  ×1    gemm a_bt 64×64×64, 4.0 TFLOP/s");
        assert_eq!(lines[3], "       0.250 ms  20.0%  ×1    layernorm_fwd");
    }

    #[test]
    fn lengths_files_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lengths.txt");
        std::fs::write(&path, "16\n\n  40 \n128\n").unwrap();
        assert_eq!(read_lengths(&path).unwrap(), [16, 40, 128]);
        std::fs::write(&path, "16\nx\n").unwrap();
        let err = read_lengths(&path).unwrap_err();
        assert!(crate::error::is_input_error(&err) && err.to_string().contains("line 2"), "{err}");
        std::fs::write(&path, "0\n").unwrap();
        assert!(read_lengths(&path).unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn items_are_checked_against_the_budget_and_saved_for_the_peers() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("saved.txt");
        let items = |batch_tokens, max_len, save: Option<PathBuf>| Items {
            preset: "tiny".into(),
            batch_tokens,
            items: 50,
            min_len: 16,
            max_len,
            lengths: None,
            save_lengths: save,
            seed: 4,
        };
        let (config, lengths) = items(8192, 128, Some(saved.clone())).resolve().unwrap();
        assert_eq!(config.hidden_size, 128);
        assert_eq!(lengths.len(), 50);
        assert!(lengths.iter().all(|n| (16..=128).contains(n)));
        assert_eq!(read_lengths(&saved).unwrap(), lengths);
        let err = items(100, 128, None).resolve().unwrap_err();
        assert!(crate::error::is_input_error(&err) && err.to_string().contains("--batch-tokens 100"), "{err}");
    }
}
