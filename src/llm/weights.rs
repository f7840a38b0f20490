//! The LLM's weights, memory-mapped from `model.safetensors` or from the shards that
//! `model.safetensors.index.json` lists (SPEC §2.1).
//!
//! Matrices stay in the dtype they were stored in (bf16, f16 or f32), so a 7B bf16 model costs its 14 GB of
//! page cache and nothing more. The forward pass asks for one matrix at a time as f32: a zero-copy view when
//! the file holds aligned f32, otherwise a conversion into a buffer the caller reuses. Every tensor the
//! forward pass needs is found and shape-checked when the model is loaded, so a bad checkpoint fails before
//! any work starts.

use super::LlmConfig;
use crate::error::input;
use anyhow::{Context, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types a checkpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
}

impl WeightDtype {
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::BF16 => "bfloat16",
        }
    }
}

/// Where one checked tensor lies: a byte range of one mapped shard.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub name: String,
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One transformer block's weights. The norm vectors are small and kept as f32; matrices stay mapped.
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    /// `[3D, D]`, rows Q | K | V.
    pub w_pack: TensorRef,
    pub o_proj: TensorRef,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: TensorRef,
    pub up_proj: TensorRef,
    pub down_proj: TensorRef,
}

pub struct LlmWeights {
    maps: Vec<Mmap>,
    /// `[V, D]`, read one row per token.
    pub embed_tokens: TensorRef,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
}

/// The opened shards and which of them holds each tensor name.
struct Checkpoint {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    headers: Vec<(usize, safetensors::tensor::Metadata)>,
    /// Tensor name → shard, from the index; `None` for a single file.
    weight_map: Option<(PathBuf, HashMap<String, usize>)>,
}

impl LlmWeights {
    /// Maps and checks the weights of the model directory `dir` against `config`.
    pub fn load(dir: &Path, config: &LlmConfig) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let matrix = |name: &str, shape: &[usize]| checkpoint.tensor(name, shape);
        let vector = |name: &str| -> Result<Vec<f32>> {
            let t = checkpoint.tensor(name, &[d])?;
            let mut out = vec![0.0; d];
            decode(checkpoint.bytes(&t), t.dtype, &mut out);
            Ok(out)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}.");
                Ok(LayerWeights {
                    input_layernorm: vector(&format!("{p}input_layernorm.weight"))?,
                    w_pack: matrix(&format!("{p}self_attn.W_pack.weight"), &[3 * d, d])?,
                    o_proj: matrix(&format!("{p}self_attn.o_proj.weight"), &[d, d])?,
                    post_attention_layernorm: vector(&format!("{p}post_attention_layernorm.weight"))?,
                    gate_proj: matrix(&format!("{p}mlp.gate_proj.weight"), &[f, d])?,
                    up_proj: matrix(&format!("{p}mlp.up_proj.weight"), &[f, d])?,
                    down_proj: matrix(&format!("{p}mlp.down_proj.weight"), &[d, f])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = matrix("model.embed_tokens.weight", &[v, d])?;
        let norm = vector("model.norm.weight")?;
        Ok(LlmWeights { maps: checkpoint.maps, embed_tokens, layers, norm })
    }

    /// The stored little-endian bytes of a tensor (for uploading to a device as they are).
    pub fn bytes(&self, t: &TensorRef) -> &[u8] {
        &self.maps[t.shard][t.start..t.end]
    }

    /// Row `row` of a 2-D tensor, converted to f32 into `out` (its length is the row length).
    pub fn row_f32(&self, t: &TensorRef, row: usize, out: &mut [f32]) {
        let width = out.len() * t.dtype.size();
        decode(&self.bytes(t)[row * width..(row + 1) * width], t.dtype, out);
    }

    /// The matrices `parts` (same row length) stacked by rows, as f32: borrowed from the mapped file when they
    /// are f32, aligned and adjacent there, otherwise converted into `buf`, which grows as needed and is meant
    /// to be reused from call to call.
    pub fn stacked_f32<'a>(&'a self, parts: &[&TensorRef], buf: &'a mut Vec<f32>) -> &'a [f32] {
        if let Some(view) = self.zero_copy(parts) {
            return view;
        }
        let total: usize = parts.iter().map(|t| t.numel()).sum();
        if buf.len() < total {
            buf.resize(total, 0.0);
        }
        let mut rest = &mut buf[..total];
        for t in parts {
            let (head, tail) = rest.split_at_mut(t.numel());
            decode_parallel(self.bytes(t), t.dtype, head);
            rest = tail;
        }
        &buf[..total]
    }

    fn zero_copy(&self, parts: &[&TensorRef]) -> Option<&[f32]> {
        let first = parts.first()?;
        let last = parts.last()?;
        let contiguous = parts.windows(2).all(|w| w[0].shard == w[1].shard && w[0].end == w[1].start);
        let all_f32 = parts.iter().all(|t| t.dtype == WeightDtype::F32);
        if !(cfg!(target_endian = "little") && contiguous && all_f32) {
            return None;
        }
        bytemuck::try_cast_slice(&self.maps[first.shard][first.start..last.end]).ok()
    }
}

impl Checkpoint {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::with_shards(vec![single], None);
        }
        if index.is_file() {
            let (files, names) = read_index(&index)?;
            let paths = files.iter().map(|f| dir.join(f)).collect();
            return Self::with_shards(paths, Some((index, names)));
        }
        let has_bin = std::fs::read_dir(dir)
            .map_err(|e| input(format!("{}: cannot read the model directory ({e})", dir.display())))?
            .filter_map(|entry| entry.ok())
            .any(|entry| entry.file_name().to_string_lossy().starts_with("pytorch_model"));
        if has_bin {
            return Err(input(format!(
                "{}: holds PyTorch pytorch_model*.bin weights, which are not read directly; run \
                 `learn-kern convert --model {}` first to write model.safetensors",
                dir.display(),
                dir.display()
            )));
        }
        Err(input(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display())))
    }

    fn with_shards(paths: Vec<PathBuf>, weight_map: Option<(PathBuf, HashMap<String, usize>)>) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut headers = Vec::with_capacity(paths.len());
        for path in &paths {
            let file = File::open(path).map_err(|e| input(format!("{}: cannot open weights ({e})", path.display())))?;
            // SAFETY: the map is read-only. Weights files are not expected to change while a model is loaded;
            // one truncated underneath us would fault, as it would in any memory-mapping loader.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let header = SafeTensors::read_metadata(&map)
                .map_err(|e| input(format!("{}: not a valid safetensors file ({e})", path.display())))?;
            maps.push(map);
            headers.push(header);
        }
        Ok(Checkpoint { paths, maps, headers, weight_map })
    }

    /// Finds `name`, checks its dtype and shape, and records where its bytes lie.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        let shard = match &self.weight_map {
            None => 0,
            Some((index, names)) => *names
                .get(name)
                .ok_or_else(|| input(format!("{}: tensor {name} is missing from weight_map", index.display())))?,
        };
        let path = self.paths[shard].display();
        let (header_len, metadata) = &self.headers[shard];
        let info = metadata.info(name).ok_or_else(|| input(format!("{path}: tensor {name} is missing")))?;
        let dtype = match info.dtype {
            Dtype::F32 => WeightDtype::F32,
            Dtype::F16 => WeightDtype::F16,
            Dtype::BF16 => WeightDtype::BF16,
            other => {
                return Err(input(format!("{path}: tensor {name} is stored as {other:?}, expected BF16, F16 or F32")));
            }
        };
        if info.shape != shape {
            return Err(input(format!(
                "{path}: tensor {name} has shape {:?}, expected {shape:?} from config.json",
                info.shape
            )));
        }
        // `read_metadata` checked that the offsets tile the data section exactly.
        let data_start = 8 + header_len;
        let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
        Ok(TensorRef { name: name.to_owned(), dtype, shape: shape.to_vec(), shard, start, end })
    }

    fn bytes(&self, t: &TensorRef) -> &[u8] {
        &self.maps[t.shard][t.start..t.end]
    }
}

/// Reads `model.safetensors.index.json`: the distinct shard files, and each tensor name's shard.
fn read_index(path: &Path) -> Result<(Vec<String>, HashMap<String, usize>)> {
    let origin = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| input(format!("{origin}: cannot read ({e})")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| input(format!("{origin}: not valid JSON ({e})")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| input(format!("{origin}: no \"weight_map\" object")))?;
    let mut files: Vec<String> = Vec::new();
    let mut names = HashMap::with_capacity(map.len());
    for (name, file) in map {
        let file =
            file.as_str().ok_or_else(|| input(format!("{origin}: weight_map entry {name} is not a file name")))?;
        let shard = match files.iter().position(|f| f == file) {
            Some(i) => i,
            None => {
                files.push(file.to_owned());
                files.len() - 1
            }
        };
        names.insert(name.clone(), shard);
    }
    Ok((files, names))
}

/// Little-endian stored values → f32 (`out` holds one value per stored element). bf16 and f16 widen exactly;
/// aligned half-precision data goes through `half`'s slice conversion, which uses F16C/SIMD where present.
fn decode(bytes: &[u8], dtype: WeightDtype, out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    let little = cfg!(target_endian = "little");
    match dtype {
        WeightDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WeightDtype::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) if little => src.convert_to_f32_slice(out),
            _ => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        WeightDtype::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(src) if little => src.convert_to_f32_slice(out),
            _ => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
    }
}

/// [`decode`] split over the rayon pool: a 7B layer's gate and up matrices are 90M values.
fn decode_parallel(bytes: &[u8], dtype: WeightDtype, out: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * dtype.size())).for_each(|(o, b)| decode(b, dtype, o));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::is_input_error;
    use safetensors::tensor::TensorView;

    /// A named tensor of test values, written in whatever dtype a test asks for.
    pub(crate) struct Tensor {
        pub name: String,
        pub shape: Vec<usize>,
        pub values: Vec<f32>,
    }

    /// Every tensor of the Baichuan2 layout for `config`, with values that are random (a seeded LCG), of
    /// mixed sign and scaled so activations stay O(1); plus the two names a loader must skip.
    pub(crate) fn random_tensors(config: &LlmConfig, seed: u64) -> Vec<Tensor> {
        let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let mut state = seed;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as f32 / (1u64 << 31) as f32 - 0.5
        };
        let mut tensor = |name: String, shape: Vec<usize>, centre: f32, spread: f32| {
            let values = (0..shape.iter().product()).map(|_| centre + spread * uniform()).collect();
            Tensor { name, shape, values }
        };
        let lin = |fan_in: usize| 2.0 * (3.0 / fan_in as f32).sqrt();
        let mut out = vec![
            tensor("model.embed_tokens.weight".into(), vec![v, d], 0.0, 2.0),
            tensor("model.norm.weight".into(), vec![d], 1.0, 0.6),
            tensor("lm_head.weight".into(), vec![v + 3, d], 0.0, 1.0),
        ];
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            out.push(tensor(format!("{p}input_layernorm.weight"), vec![d], 1.0, 0.6));
            out.push(tensor(format!("{p}self_attn.W_pack.weight"), vec![3 * d, d], 0.0, 2.0 * lin(d)));
            out.push(tensor(format!("{p}self_attn.o_proj.weight"), vec![d, d], 0.0, lin(d)));
            out.push(tensor(format!("{p}self_attn.rotary_emb.inv_freq"), vec![d / 7], 0.0, 1.0));
            out.push(tensor(format!("{p}post_attention_layernorm.weight"), vec![d], 1.0, 0.6));
            out.push(tensor(format!("{p}mlp.gate_proj.weight"), vec![f, d], 0.0, lin(d)));
            out.push(tensor(format!("{p}mlp.up_proj.weight"), vec![f, d], 0.0, lin(d)));
            out.push(tensor(format!("{p}mlp.down_proj.weight"), vec![d, f], 0.0, lin(f)));
        }
        out
    }

    pub(crate) fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
        match dtype {
            Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F64 => values.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            other => panic!("test writer has no {other:?}"),
        }
    }

    /// Writes `tensors` as one safetensors file, each in the dtype `dtype_of` picks for its name.
    pub(crate) fn write_safetensors(path: &Path, tensors: &[&Tensor], dtype_of: impl Fn(&str) -> Dtype) {
        let bytes: Vec<(String, Dtype, Vec<u8>)> = tensors
            .iter()
            .map(|t| {
                let dtype = dtype_of(&t.name);
                (t.name.clone(), dtype, encode(&t.values, dtype))
            })
            .collect();
        let views = bytes
            .iter()
            .zip(tensors)
            .map(|((name, dtype, data), t)| (name.clone(), TensorView::new(*dtype, t.shape.clone(), data).unwrap()));
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// A model directory: `config.json` and a single `model.safetensors` in `dtype`.
    pub(crate) fn write_model(dir: &Path, config: &LlmConfig, tensors: &[Tensor], dtype: Dtype) {
        std::fs::write(dir.join("config.json"), config.to_json()).unwrap();
        let all: Vec<&Tensor> = tensors.iter().collect();
        write_safetensors(&dir.join("model.safetensors"), &all, |_| dtype);
    }

    /// Like [`write_model`] but split over two shards listed in `model.safetensors.index.json`.
    fn write_sharded(dir: &Path, config: &LlmConfig, tensors: &[Tensor], dtype: Dtype) {
        std::fs::write(dir.join("config.json"), config.to_json()).unwrap();
        let files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        let shard_of = |t: &Tensor| usize::from(!(t.name.contains("layers.0.") || t.name.contains("embed")));
        for (s, file) in files.iter().enumerate() {
            let part: Vec<&Tensor> = tensors.iter().filter(|t| shard_of(t) == s).collect();
            write_safetensors(&dir.join(file), &part, |_| dtype);
        }
        let map: serde_json::Map<String, serde_json::Value> =
            tensors.iter().map(|t| (t.name.clone(), files[shard_of(t)].into())).collect();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }

    fn small_config() -> LlmConfig {
        LlmConfig { num_hidden_layers: 2, ..LlmConfig::preset("tiny").unwrap() }.with_vocab_size(50)
    }

    fn find<'a>(tensors: &'a [Tensor], name: &str) -> &'a Tensor {
        tensors.iter().find(|t| t.name == name).unwrap()
    }

    /// The values as `dtype` stores them, rounded by `half` directly (not through the loader's decoding).
    fn rounded(values: &[f32], dtype: Dtype) -> Vec<f32> {
        values
            .iter()
            .map(|&x| match dtype {
                Dtype::F16 => f16::from_f32(x).to_f32(),
                Dtype::BF16 => bf16::from_f32(x).to_f32(),
                _ => x,
            })
            .collect()
    }

    #[test]
    fn decoding_does_not_depend_on_alignment() {
        let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.3) * 0.731).collect();
        for (dtype, kind) in
            [(Dtype::F32, WeightDtype::F32), (Dtype::F16, WeightDtype::F16), (Dtype::BF16, WeightDtype::BF16)]
        {
            // One leading byte shifts the data off its natural alignment, forcing the byte-wise path.
            let bytes = encode(&values, dtype);
            let mut shifted_bytes = vec![0u8];
            shifted_bytes.extend(&bytes);
            let (mut aligned, mut shifted) = (vec![f32::NAN; 37], vec![f32::NAN; 37]);
            decode(&bytes, kind, &mut aligned);
            decode(&shifted_bytes[1..], kind, &mut shifted);
            assert_eq!(aligned, rounded(&values, dtype), "{dtype:?}");
            assert_eq!(shifted, aligned, "{dtype:?}");
        }
    }

    #[test]
    fn every_dtype_reads_back_the_stored_values() {
        let config = small_config();
        let tensors = random_tensors(&config, 3);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let dir = tempfile::tempdir().unwrap();
            write_model(dir.path(), &config, &tensors, dtype);
            let w = LlmWeights::load(dir.path(), &config).unwrap();
            let layer = &w.layers[1];
            let gate = find(&tensors, "model.layers.1.mlp.gate_proj.weight");
            let up = find(&tensors, "model.layers.1.mlp.up_proj.weight");
            let mut want = rounded(&gate.values, dtype);
            want.extend(rounded(&up.values, dtype));
            if dtype != Dtype::F32 {
                // The rounding is real: these are not the f32 values.
                assert_ne!(want[..gate.values.len()], gate.values[..]);
            }
            let mut buf = vec![f32::NAN; 7];
            let got = w.stacked_f32(&[&layer.gate_proj, &layer.up_proj], &mut buf).to_vec();
            assert_eq!(got, want, "{dtype:?}");
            // f32 gate and up lie next to each other in the file: no copy is made.
            assert_eq!(buf.len() == 7, dtype == Dtype::F32, "{dtype:?}");

            let norm = find(&tensors, "model.layers.1.post_attention_layernorm.weight");
            assert_eq!(layer.post_attention_layernorm, rounded(&norm.values, dtype));
            let embed = find(&tensors, "model.embed_tokens.weight");
            let mut row = vec![f32::NAN; config.hidden_size];
            w.row_f32(&w.embed_tokens, 49, &mut row);
            assert_eq!(row, rounded(&embed.values[49 * config.hidden_size..], dtype)[..config.hidden_size]);
        }
    }

    #[test]
    fn shards_from_the_index_read_like_a_single_file() {
        let config = small_config();
        let tensors = random_tensors(&config, 4);
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_model(one.path(), &config, &tensors, Dtype::BF16);
        write_sharded(two.path(), &config, &tensors, Dtype::BF16);
        let (a, b) = (LlmWeights::load(one.path(), &config).unwrap(), LlmWeights::load(two.path(), &config).unwrap());
        assert_eq!(b.maps.len(), 2);
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            assert_eq!(a.bytes(&la.w_pack), b.bytes(&lb.w_pack));
            assert_eq!(a.bytes(&la.down_proj), b.bytes(&lb.down_proj));
            assert_eq!(la.input_layernorm, lb.input_layernorm);
        }
        assert_eq!(a.bytes(&a.embed_tokens), b.bytes(&b.embed_tokens));
        assert_eq!(a.norm, b.norm);
    }

    fn load_error(dir: &Path, config: &LlmConfig) -> String {
        let err = LlmWeights::load(dir, config).err().expect("loading should fail");
        assert!(is_input_error(&err), "{err}");
        err.to_string()
    }

    #[test]
    fn bad_checkpoints_are_input_errors_naming_the_tensor_or_file() {
        let config = small_config();
        let tensors = random_tensors(&config, 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let without = |skip: &str| -> Vec<&Tensor> { tensors.iter().filter(|t| t.name != skip).collect() };

        write_safetensors(&path, &without("model.layers.1.mlp.up_proj.weight"), |_| Dtype::F32);
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("model.safetensors: tensor model.layers.1.mlp.up_proj.weight is missing"), "{msg}");

        let wide = config.clone().with_vocab_size(51);
        write_safetensors(&path, &without(""), |_| Dtype::F32);
        let msg = load_error(dir.path(), &wide);
        assert!(msg.contains("model.embed_tokens.weight has shape [50, 128], expected [51, 128]"), "{msg}");

        write_safetensors(&path, &without(""), |n| if n == "model.norm.weight" { Dtype::F64 } else { Dtype::F32 });
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("tensor model.norm.weight is stored as F64, expected BF16, F16 or F32"), "{msg}");

        std::fs::write(&path, b"not a safetensors file at all").unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("model.safetensors: not a valid safetensors file"), "{msg}");

        std::fs::remove_file(&path).unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("no model.safetensors or model.safetensors.index.json"), "{msg}");

        std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains(&format!("run `learn-kern convert --model {}` first", dir.path().display())), "{msg}");
    }

    #[test]
    fn index_errors_name_the_shard_or_the_tensor() {
        let config = small_config();
        let tensors = random_tensors(&config, 6);
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path(), &config, &tensors, Dtype::F16);
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("model-00002-of-00002.safetensors: cannot open weights"), "{msg}");

        write_sharded(dir.path(), &config, &tensors, Dtype::F16);
        let index = dir.path().join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).unwrap();
        std::fs::write(&index, text.replace("\"model.layers.1.self_attn.o_proj.weight\"", "\"renamed\"")).unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("tensor model.layers.1.self_attn.o_proj.weight is missing from weight_map"), "{msg}");

        std::fs::write(&index, "{\"metadata\": {}}").unwrap();
        let msg = load_error(dir.path(), &config);
        assert!(msg.contains("model.safetensors.index.json: no \"weight_map\" object"), "{msg}");
    }
}
