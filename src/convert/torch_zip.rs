//! A PyTorch checkpoint as `torch.save` writes it since torch 1.6: a zip archive holding `<archive>/data.pkl`
//! (the pickled state dict, whose tensors point at storages by key), `<archive>/data/<key>` (each storage's
//! raw little-endian bytes, stored uncompressed) and `<archive>/byteorder`.
//!
//! Opening reads only the zip directory and the pickle, and checks every tensor against its storage, so all
//! problems surface before any output is written. Tensor data is then read storage slice by storage slice with
//! plain positioned reads (not a memory map, whose touched pages would count toward the resident set).

use super::gather::{Gather, Source};
use super::pickle;
use super::tensor::TensorRef;
use crate::error::input;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use zip::{CompressionMethod, ZipArchive};

/// `data.pkl` larger than this is refused: a state dict's pickle holds names and shapes only (Baichuan2-7B's
/// is about 40 KB), so a bigger one is not a checkpoint this reader should trust with memory.
const MAX_PICKLE: u64 = 256 << 20;

/// Where a storage's bytes lie in the file.
#[derive(Clone, Copy, Debug)]
struct Storage {
    start: u64,
    size: u64,
    crc: u32,
    stored: bool,
}

/// An open checkpoint: its tensors, in pickle order, and the storages they read.
pub struct Checkpoint {
    shown: String,
    file: File,
    prefix: String,
    storages: HashMap<String, Storage>,
    pub tensors: Vec<(String, TensorRef)>,
    /// Entries of the pickled dict that are not tensors (left out of the output).
    pub ignored: Vec<String>,
}

impl Checkpoint {
    /// Opens `path`, reads its state dict and checks every tensor against the storage it reads.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| input(format!("{shown}: cannot open ({e})")))?;
        let file_len = file.metadata().with_context(|| format!("{shown}: cannot read"))?.len();
        let mut magic = [0u8; 24];
        let got = file.read(&mut magic).with_context(|| format!("{shown}: cannot read"))?;
        if got < 4 || magic[..4] != *b"PK\x03\x04" {
            if magic.starts_with(b"version https://git-lfs") {
                return Err(input(format!(
                    "{shown}: a Git LFS pointer, not the weights; fetch them with `git lfs pull` in the model repository"
                )));
            }
            if magic[0] == 0x80 {
                return Err(input(format!(
                    "{shown}: a legacy (torch < 1.6, non-zip) checkpoint, which this converter does not read; \
                     re-save it with torch.save from torch 1.6 or later"
                )));
            }
            return Err(input(format!("{shown}: not a PyTorch checkpoint (no zip signature at the start)")));
        }
        let corrupt = |e: &dyn std::fmt::Display| {
            input(format!("{shown}: not a readable zip archive, the file is truncated or corrupt ({e})"))
        };
        let mut zip = ZipArchive::new(BufReader::new(file)).map_err(|e| corrupt(&e))?;

        let mut names = Vec::with_capacity(zip.len());
        for i in 0..zip.len() {
            let entry = zip.by_index_raw(i).map_err(|e| corrupt(&e))?;
            let name = entry.name().map_err(|e| corrupt(&e))?.to_string();
            let start = entry.data_start().ok_or_else(|| corrupt(&"an entry without a local header"))?;
            let storage = Storage {
                start,
                size: entry.size(),
                crc: entry.crc32(),
                stored: entry.compression() == CompressionMethod::Stored,
            };
            names.push((name, storage));
        }
        let pkls: Vec<&str> =
            names.iter().filter_map(|(n, _)| n.strip_suffix("/data.pkl").filter(|p| !p.contains('/'))).collect();
        let prefix = match pkls[..] {
            [p] => p.to_string(),
            [] => return Err(input(format!("{shown}: a zip archive without data.pkl, not a PyTorch checkpoint"))),
            _ => return Err(input(format!("{shown}: holds {} data.pkl entries; expected one", pkls.len()))),
        };

        let data_dir = format!("{prefix}/data/");
        let mut storages = HashMap::new();
        for (name, storage) in &names {
            if let Some(key) = name.strip_prefix(&data_dir) {
                if storage.start.checked_add(storage.size).is_none_or(|end| end > file_len) {
                    return Err(input(format!(
                        "{shown}: storage {name} runs past the end of the file, which is truncated"
                    )));
                }
                storages.insert(key.to_string(), *storage);
            }
        }

        if let Some(order) = read_entry(&mut zip, &format!("{prefix}/byteorder"), 64, &shown)?
            && order != b"little"
        {
            return Err(input(format!(
                "{shown}: byte order \"{}\"; only little-endian checkpoints convert",
                String::from_utf8_lossy(&order)
            )));
        }
        let pkl_name = format!("{prefix}/data.pkl");
        let Some(pkl) = read_entry(&mut zip, &pkl_name, MAX_PICKLE, &shown)? else {
            return Err(input(format!("{shown}: cannot find {pkl_name}")));
        };
        let pickle::StateDict { tensors, ignored } = pickle::read_state_dict(&pkl, &shown)?;

        let file = zip.into_inner().into_inner();
        let ckpt = Checkpoint { shown, file, prefix, storages, tensors, ignored };
        for (name, t) in &ckpt.tensors {
            ckpt.check(name, t)?;
        }
        Ok(ckpt)
    }

    /// The file as errors name it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn storage(&self, name: &str, t: &TensorRef) -> Result<Storage> {
        self.storages.get(&t.storage.key).copied().ok_or_else(|| {
            input(format!(
                "{}: tensor `{name}` reads storage {}/data/{}, which the archive does not hold",
                self.shown, self.prefix, t.storage.key
            ))
        })
    }

    /// Checks that `t` lies inside a storage of the size its persistent id declares.
    fn check(&self, name: &str, t: &TensorRef) -> Result<()> {
        let s = self.storage(name, t)?;
        let key = &t.storage.key;
        let elem = t.storage.dtype.size() as u64;
        if t.storage.numel.checked_mul(elem) != Some(s.size) {
            return Err(input(format!(
                "{}: storage data/{key} holds {} bytes, but tensor `{name}` declares it as {} {} elements",
                self.shown,
                s.size,
                t.storage.numel,
                t.storage.dtype.safetensors_name()
            )));
        }
        if !s.stored {
            return Err(input(format!(
                "{}: storage data/{key} is compressed; torch writes storages uncompressed, so re-save the \
                 checkpoint with torch.save",
                self.shown
            )));
        }
        match t.extent() {
            Some(end) if end <= t.storage.numel => Ok(()),
            _ => Err(input(format!(
                "{}: tensor `{name}` (offset {}, size {:?}, stride {:?}) reaches past the {} elements of storage \
                 data/{key}",
                self.shown, t.offset, t.shape, t.stride, t.storage.numel
            ))),
        }
    }

    /// Writes tensor `name` to `out` as a contiguous row-major copy. A tensor that is its whole storage, as
    /// most are, is checked against the archive's CRC on the way.
    pub fn copy_tensor<W: Write>(&mut self, name: &str, t: &TensorRef, gather: &mut Gather, out: &mut W) -> Result<()> {
        let s = self.storage(name, t)?;
        let reading = || format!("{}: cannot copy tensor `{name}`", self.shown);
        let dims = t.layout();
        if t.offset == 0 && dims[..] == [(t.numel(), 1)] && t.nbytes() == s.size {
            let mut crc = crc32fast::Hasher::new();
            gather.stream(&mut self.file, s.start, s.size, out, Some(&mut crc)).with_context(reading)?;
            if crc.finalize() != s.crc {
                return Err(input(format!(
                    "{}: storage data/{} of tensor `{name}` fails its CRC check; the file is corrupt",
                    self.shown, t.storage.key
                )));
            }
            return Ok(());
        }
        let at = Source { start: s.start, elem: t.storage.dtype.size() };
        gather.copy(&mut self.file, at, t.offset, &dims, out).with_context(reading)
    }
}

/// Reads a small entry whole (checking its CRC), or `None` when the archive has no such entry.
fn read_entry(zip: &mut ZipArchive<BufReader<File>>, name: &str, max: u64, shown: &str) -> Result<Option<Vec<u8>>> {
    let mut entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(input(format!("{shown}: cannot read {name} ({e})"))),
    };
    if entry.size() > max {
        return Err(input(format!("{shown}: {name} is {} bytes; more than {max} is not a checkpoint's", entry.size())));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    // `take` bounds a compressed entry whose declared size lies.
    (&mut entry).take(max).read_to_end(&mut bytes).map_err(|e| input(format!("{shown}: {name} is corrupt ({e})")))?;
    Ok(Some(bytes))
}
