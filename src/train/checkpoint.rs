//! PCH checkpoints (SPEC §3.3): one safetensors file, `__metadata__["config"]` holding the config JSON and
//! the tensors of §3.3 in f32 with their PyTorch names and shapes. Readable and writable by anyone who
//! follows §3.3 (e.g. PyTorch + `safetensors`), so files written elsewhere are validated tensor by tensor.

use crate::error::input;
use crate::fsutil::{commit, temp_path};
use crate::pch::config::PchConfig;
use crate::pch::params::{PchParams, names_and_shapes};
use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `tensors` (name, shape, f32 values) with `metadata`, atomically (a temporary file beside the
/// target, then a rename). The header is laid out here, metadata keys sorted, rather than by the safetensors
/// crate, which serialises its metadata `HashMap` in a per-process random order: the same state must give
/// the same bytes, so that a resumed run can be checked bit for bit against an uninterrupted one.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
    let mut header = format!("{{\"__metadata__\":{}", serde_json::to_string(&metadata)?);
    let mut offset = 0;
    for (name, shape, values) in tensors {
        if shape.iter().product::<usize>() != values.len() {
            bail!("tensor {name}: shape {shape:?} does not hold {} values", values.len());
        }
        let end = offset + 4 * values.len();
        let (name, shape) = (serde_json::to_string(name)?, serde_json::to_string(shape)?);
        header.push_str(&format!(",{name}:{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":[{offset},{end}]}}"));
        offset = end;
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let tmp = temp_path(path);
    let written = (|| -> std::io::Result<()> {
        let mut out = BufWriter::new(File::create(&tmp)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (_, _, values) in tensors {
            out.write_all(bytemuck::cast_slice(values))?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("{}: cannot write", path.display()))?;
    commit(&tmp, path)
}

/// Saves parameters with their config (and any extra metadata, e.g. the step).
pub fn save(path: &Path, params: &PchParams<f32>, extra: &[(&str, String)]) -> Result<()> {
    let mut metadata: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    metadata.insert("config".into(), params.config().to_json());
    metadata.insert("format".into(), "pt".into());
    let tensors: Vec<(&str, Vec<usize>, &[f32])> = params.tensors().map(|(n, s, v)| (n, s.to_vec(), v)).collect();
    write_f32_safetensors(path, &tensors, metadata)
}

/// A memory-mapped safetensors file.
pub struct MappedSafetensors {
    map: memmap2::Mmap,
    pub path: std::path::PathBuf,
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| input(format!("{}: cannot open ({e})", path.display())))?;
        // SAFETY: read-only map of a file this process does not modify while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot map ({e})", path.display()))?;
        Ok(Self { map, path: path.to_path_buf() })
    }

    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .map_err(|e| input(format!("{}: not a readable safetensors file ({e})", self.path.display())))
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.map)
            .map_err(|e| input(format!("{}: not a readable safetensors file ({e})", self.path.display())))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Tensor `name` converted to f32 (f32, f64, f16 and bf16 are accepted), with its shape.
    pub fn f32_tensor(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let tensors = self.tensors()?;
        let Ok(view) = tensors.tensor(name) else {
            return Ok(None);
        };
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F64 => {
                bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32).collect()
            }
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(input(format!(
                    "{}: tensor {name} is {other:?}; expected a float type (f32, f16, bf16, f64)",
                    self.path.display()
                )));
            }
        };
        Ok(Some((view.shape().to_vec(), values)))
    }
}

/// Loads a checkpoint: its config (from the metadata) and every tensor, each checked by name and shape.
/// Returns the parameters and the rest of the metadata.
pub fn load(path: &Path) -> Result<(PchParams<f32>, HashMap<String, String>)> {
    let file = MappedSafetensors::open(path)?;
    let metadata = file.metadata()?;
    let config_text = metadata.get("config").ok_or_else(|| {
        input(format!(
            "{}: no \"config\" in the safetensors metadata (SPEC §3.3 stores the PCH config there)",
            path.display()
        ))
    })?;
    let config = PchConfig::from_json(config_text, &path.display().to_string())?;
    let mut params = PchParams::<f32>::zeros(&config)?;
    let expected: HashMap<String, Vec<usize>> = names_and_shapes(&config).into_iter().collect();
    let tensors = file.tensors()?;
    for name in tensors.names() {
        if !expected.contains_key(name) {
            return Err(input(format!("{}: tensor {name} is not part of this config's model", path.display())));
        }
    }
    for (name, shape, dst) in params.tensors_mut() {
        let (found, values) = file
            .f32_tensor(name)?
            .ok_or_else(|| input(format!("{}: missing tensor {name} {shape:?}", path.display())))?;
        if found != shape {
            return Err(input(format!(
                "{}: tensor {name} has shape {found:?}, the config needs {shape:?}",
                path.display()
            )));
        }
        dst.copy_from_slice(&values);
    }
    Ok((params, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_bad_files_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PchConfig::tiny();
        let params = PchParams::<f32>::init(&cfg, 3).unwrap();
        let path = dir.path().join("c.safetensors");
        save(&path, &params, &[("step", "7".into())]).unwrap();
        let (back, meta) = load(&path).unwrap();
        assert_eq!(back, params);
        assert_eq!(meta["step"], "7");
        // The same state is the same bytes, whatever order the metadata map iterates in.
        let again = dir.path().join("again.safetensors");
        save(&again, &params, &[("step", "7".into()), ("note", "x".into())]).unwrap();
        save(&path, &params, &[("note", "x".into()), ("step", "7".into())]).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&path).unwrap());

        // A tensor with the wrong shape, a missing tensor and a foreign tensor are each named.
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
            params.tensors().map(|(n, s, v)| (n.to_string(), s.to_vec(), v.to_vec())).collect();
        let meta = HashMap::from([("config".to_string(), cfg.to_json())]);
        let write = |t: &[(String, Vec<usize>, Vec<f32>)]| {
            let views: Vec<(&str, Vec<usize>, &[f32])> =
                t.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice())).collect();
            write_f32_safetensors(&path, &views, meta.clone()).unwrap();
            load(&path).err().map(|e| (crate::error::is_input_error(&e), e.to_string()))
        };
        let head = tensors.iter().position(|t| t.0 == "head.bias").unwrap();
        tensors[head].1 = vec![tensors[head].2.len() / 2, 2];
        let (is_input, msg) = write(&tensors).unwrap();
        assert!(is_input && msg.contains("tensor head.bias has shape"), "{msg}");
        tensors.remove(head);
        let (_, msg) = write(&tensors).unwrap();
        assert!(msg.contains("missing tensor head.bias"), "{msg}");
        tensors.push(("extra.weight".into(), vec![1], vec![0.0]));
        let (_, msg) = write(&tensors).unwrap();
        assert!(msg.contains("extra.weight"), "{msg}");

        write_f32_safetensors(&path, &[("head.bias", vec![1], &[0.0])], HashMap::new()).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("no \"config\""));
    }
}
