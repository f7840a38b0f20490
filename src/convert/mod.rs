//! `learn-kern convert`: PyTorch `.bin` checkpoints (as Baichuan2 ships them) to safetensors, with no Python.
//!
//! Input, in the model directory: `pytorch_model.bin`, or the shards listed in `pytorch_model.bin.index.json`
//! (which wins when both are present).
//! Output: `model.safetensors` for one input file; for shards, `model-0000i-of-0000N.safetensors` mirroring the
//! input shards in file-name order, plus `model.safetensors.index.json`. Every tensor is written as a
//! contiguous row-major copy in the dtype it is stored in (views at an offset, non-contiguous strides and
//! storages shared between tensors are resolved); nothing is skipped. Outputs are written to temporary names
//! and renamed once all are complete, the index last.
//!
//! Memory: the pickles and zip directories are read first and every header computed from them; tensor data
//! then streams through fixed buffers, except that a non-contiguous tensor is gathered from its span of
//! storage in memory, so the peak is about the largest tensor plus a few megabytes.

mod gather;
mod pickle;
mod safetensors_out;
mod tensor;
mod torch_zip;

use crate::error::input;
use crate::fsutil;
use anyhow::{Context, Result};
use gather::Gather;
use safetensors_out::{Entry, ShardWriter};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tensor::TensorRef;
use torch_zip::Checkpoint;

const SINGLE: &str = "pytorch_model.bin";
const INDEX: &str = "pytorch_model.bin.index.json";
const OUT_SINGLE: &str = "model.safetensors";
const OUT_INDEX: &str = "model.safetensors.index.json";

/// Bytes per read of tensor data.
const CHUNK: usize = 8 << 20;

/// What a conversion read and wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    /// The `.bin` files read, in output order.
    pub inputs: Vec<PathBuf>,
    /// The files written: the safetensors files, then the index when the input was sharded.
    pub outputs: Vec<PathBuf>,
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    pub largest_tensor: String,
    pub largest_bytes: u64,
    /// Entries of the pickled dicts that are not tensors, and so not converted (e.g. `epoch`).
    pub ignored: Vec<String>,
    pub seconds: f64,
}

/// True when `dir` holds PyTorch `.bin` weights that `convert_model_dir` reads.
pub fn has_torch_weights(dir: &Path) -> bool {
    dir.join(SINGLE).is_file() || dir.join(INDEX).is_file()
}

/// The sentence a loader gives when a model directory has `.bin` weights and no safetensors.
pub fn convert_hint(dir: &Path) -> String {
    format!(
        "{} holds PyTorch .bin weights, which are read only after conversion: run `learn-kern convert --model {}` once",
        dir.display(),
        dir.display()
    )
}

/// Converts the PyTorch weights of the model directory `dir` into safetensors in `out` (default: `dir`).
/// Shows a progress bar on stderr when `progress` is set.
pub fn convert_model_dir(dir: &Path, out: Option<&Path>, progress: bool) -> Result<ConvertReport> {
    let started = Instant::now();
    let out_dir = out.unwrap_or(dir);
    let (inputs, weight_map) = find_inputs(dir)?;
    let mut ckpts = inputs.iter().map(|p| Checkpoint::open(p)).collect::<Result<Vec<_>>>()?;
    if let Some(map) = &weight_map {
        check_against_index(&dir.join(INDEX), map, &inputs, &ckpts)?;
    }

    let n = ckpts.len();
    let out_names: Vec<String> = match weight_map {
        None => vec![OUT_SINGLE.to_string()],
        Some(_) => (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect(),
    };
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create the directory", out_dir.display()))?;
    fsutil::remove_stale_temps(out_dir);

    let total: u64 = ckpts.iter().flat_map(|c| &c.tensors).map(|(_, t)| t.nbytes()).sum();
    let bar = progress.then(|| progress_bar(total));
    let mut temps = Temps(Vec::new());
    let mut gather = Gather::new(CHUNK);
    let mut report_map = BTreeMap::new();
    for (ckpt, out_name) in ckpts.iter_mut().zip(&out_names) {
        let path = out_dir.join(out_name);
        let tmp = fsutil::temp_path(&path);
        temps.0.push(tmp.clone());
        if let Some(bar) = &bar {
            bar.set_message(out_name.clone());
        }
        let mut tensors = std::mem::take(&mut ckpt.tensors);
        // Larger elements first, then by name: every tensor starts on a multiple of its element size.
        tensors.sort_by(|(a, ta), (b, tb)| tb.storage.dtype.size().cmp(&ta.storage.dtype.size()).then(a.cmp(b)));
        let entries = tensors.iter().map(|(name, t)| entry(name, t)).collect();
        let mut writer = ShardWriter::create(&tmp, entries)?;
        for (name, t) in &tensors {
            writer.write_next(|w| ckpt.copy_tensor(name, t, &mut gather, w))?;
            if let Some(bar) = &bar {
                bar.inc(t.nbytes());
            }
            report_map.insert(name.clone(), (out_name.clone(), t.nbytes()));
        }
        writer.finish()?;
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }

    let mut outputs = Vec::new();
    for (tmp, name) in temps.0.iter().zip(&out_names) {
        let path = out_dir.join(name);
        fsutil::commit(tmp, &path)?;
        outputs.push(path);
    }
    temps.0.clear();
    if weight_map.is_some() {
        let files: BTreeMap<&String, &String> = report_map.iter().map(|(k, (f, _))| (k, f)).collect();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": files });
        let path = out_dir.join(OUT_INDEX);
        let text = serde_json::to_string_pretty(&index).context("cannot format the index")?;
        fsutil::write_atomic(&path, text.as_bytes())?;
        outputs.push(path);
    }

    let (largest_tensor, largest_bytes) =
        report_map.iter().max_by_key(|(_, (_, b))| *b).map(|(k, (_, b))| (k.clone(), *b)).unwrap_or_default();
    Ok(ConvertReport {
        inputs,
        outputs,
        tensors: report_map.len(),
        bytes: total,
        largest_tensor,
        largest_bytes,
        ignored: ckpts.iter().flat_map(|c| c.ignored.iter().map(|i| format!("{}: {i}", c.shown()))).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn entry(name: &str, t: &TensorRef) -> Entry {
    Entry { name: name.to_string(), dtype: t.storage.dtype, shape: t.shape.clone(), nbytes: t.nbytes() }
}

/// Temporary outputs, removed unless the conversion completes.
struct Temps(Vec<PathBuf>);

impl Drop for Temps {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The input files in output order, and the index's weight map (tensor name to file) when sharded.
type Inputs = (Vec<PathBuf>, Option<BTreeMap<String, String>>);

fn find_inputs(dir: &Path) -> Result<Inputs> {
    if !dir.is_dir() {
        return Err(input(format!("{}: not a model directory", dir.display())));
    }
    let index = dir.join(INDEX);
    if !index.is_file() {
        let single = dir.join(SINGLE);
        if !single.is_file() {
            return Err(input(format!("{}: holds no {SINGLE} or {INDEX} to convert", dir.display())));
        }
        return Ok((vec![single], None));
    }
    let shown = index.display();
    let text = std::fs::read_to_string(&index).map_err(|e| input(format!("{shown}: cannot read ({e})")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| input(format!("{shown}: not valid JSON ({e})")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(input(format!("{shown}: no \"weight_map\" object")));
    };
    let mut weight_map = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(input(format!("{shown}: the shard of tensor `{name}` is not a file name")));
        };
        if Path::new(file).file_name().is_none_or(|f| f != file) {
            return Err(input(format!("{shown}: shard \"{file}\" of tensor `{name}` is not a plain file name")));
        }
        weight_map.insert(name.clone(), file.to_string());
    }
    let files: BTreeSet<&String> = weight_map.values().collect();
    if files.is_empty() {
        return Err(input(format!("{shown}: the weight map is empty")));
    }
    let mut inputs = Vec::new();
    for file in files {
        let path = dir.join(file);
        if !path.is_file() {
            let name = weight_map.iter().find(|(_, f)| *f == file).map(|(n, _)| n.as_str()).unwrap_or_default();
            return Err(input(format!(
                "{shown}: shard {file} (holding `{name}`, among others) is missing from {}",
                dir.display()
            )));
        }
        inputs.push(path);
    }
    Ok((inputs, Some(weight_map)))
}

/// Checks that every tensor the index lists is in the shard it names, and that no tensor is in two shards.
fn check_against_index(
    index: &Path,
    map: &BTreeMap<String, String>,
    inputs: &[PathBuf],
    ckpts: &[Checkpoint],
) -> Result<()> {
    check_unique(ckpts)?;
    let held: HashMap<&str, &Path> = ckpts
        .iter()
        .zip(inputs)
        .flat_map(|(c, p)| c.tensors.iter().map(move |(n, _)| (n.as_str(), p.as_path())))
        .collect();
    for (name, file) in map {
        let in_file = held.get(name.as_str()).and_then(|p| p.file_name()).is_some_and(|f| f == file.as_str());
        if !in_file {
            return Err(input(format!("{}: lists tensor `{name}` in {file}, which does not hold it", index.display())));
        }
    }
    Ok(())
}

fn check_unique(ckpts: &[Checkpoint]) -> Result<()> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for c in ckpts {
        for (name, _) in &c.tensors {
            if let Some(first) = seen.insert(name, c.shown()) {
                return Err(input(format!("tensor `{name}` is in both {first} and {}", c.shown())));
            }
        }
    }
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    indicatif::ProgressBar::new(total).with_style(style)
}
