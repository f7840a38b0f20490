//! A streaming safetensors writer: the header is computed from the tensor descriptions alone, then the tensors
//! are written one after another, so no tensor data is ever held beyond what the caller streams.
//!
//! Format: an 8-byte little-endian header length, the JSON header (`{"__metadata__": {...}, name: {"dtype",
//! "shape", "data_offsets": [begin, end]}}`, padded with spaces to a multiple of 8), then the data, tensors back
//! to back in the order given.

use super::tensor::Dtype;
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Bytes per write buffer.
const BUFFER: usize = 8 << 20;

/// One tensor as the header describes it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub nbytes: u64,
}

/// The header bytes for `entries`, laid out in the given order. Put larger elements first to keep every
/// tensor aligned to its element size (the data starts on a multiple of 8).
pub fn header(entries: &[Entry]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut begin = 0u64;
    for e in entries {
        let end = begin + e.nbytes;
        let desc =
            serde_json::json!({ "dtype": e.dtype.safetensors_name(), "shape": e.shape, "data_offsets": [begin, end] });
        map.insert(e.name.clone(), desc);
        begin = end;
    }
    let mut json = serde_json::Value::Object(map).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// A writer that counts the bytes passing through it.
pub struct Counted<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A safetensors file being written: header first, then each tensor in header order.
pub struct ShardWriter {
    path: PathBuf,
    out: Counted<BufWriter<File>>,
    entries: Vec<Entry>,
    next: usize,
}

impl ShardWriter {
    /// Creates `path` (the caller's temporary name) and writes the header for `entries`.
    pub fn create(path: &Path, entries: Vec<Entry>) -> Result<ShardWriter> {
        let file = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = Counted { inner: BufWriter::with_capacity(BUFFER, file), count: 0 };
        out.write_all(&header(&entries)).with_context(|| format!("{}: cannot write", path.display()))?;
        out.count = 0;
        Ok(ShardWriter { path: path.to_path_buf(), out, entries, next: 0 })
    }

    /// Writes the next tensor's data with `fill`, which must write exactly the bytes the header declares.
    pub fn write_next(&mut self, fill: impl FnOnce(&mut Counted<BufWriter<File>>) -> Result<()>) -> Result<()> {
        let Some(entry) = self.entries.get(self.next) else {
            bail!("{}: more tensors written than the header declares", self.path.display());
        };
        let begin = self.out.count;
        fill(&mut self.out)?;
        let wrote = self.out.count - begin;
        if wrote != entry.nbytes {
            bail!("{}: tensor `{}` wrote {wrote} bytes, not {}", self.path.display(), entry.name, entry.nbytes);
        }
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs the file once every tensor is written.
    pub fn finish(self) -> Result<()> {
        if self.next != self.entries.len() {
            bail!("{}: {} of {} tensors written", self.path.display(), self.next, self.entries.len());
        }
        let file = self.out.inner.into_inner().map_err(|e| e.into_error());
        file.and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let entries = vec![
            Entry { name: "b.weight".into(), dtype: Dtype::F32, shape: vec![2, 3], nbytes: 24 },
            Entry { name: "a".into(), dtype: Dtype::BF16, shape: vec![3], nbytes: 6 },
            Entry { name: "empty".into(), dtype: Dtype::F16, shape: vec![0, 4], nbytes: 0 },
            Entry { name: "flag".into(), dtype: Dtype::Bool, shape: vec![], nbytes: 1 },
        ];
        let data: Vec<Vec<u8>> = entries.iter().map(|e| (0..e.nbytes).map(|i| (i * 37 + 11) as u8).collect()).collect();
        let mut w = ShardWriter::create(&path, entries.clone()).unwrap();
        for d in &data {
            w.write_next(|out| Ok(out.write_all(d)?)).unwrap();
        }
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(header_len % 8, 0);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (e, d) in entries.iter().zip(&data) {
            let t = st.tensor(&e.name).unwrap();
            assert_eq!(t.dtype().to_string(), e.dtype.safetensors_name());
            assert_eq!(t.shape(), e.shape.iter().map(|&s| s as usize).collect::<Vec<_>>());
            assert_eq!(t.data(), &d[..]);
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn a_wrong_byte_count_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![Entry { name: "x".into(), dtype: Dtype::F32, shape: vec![2], nbytes: 8 }];
        let mut w = ShardWriter::create(&dir.path().join("m.safetensors"), entries).unwrap();
        let err = w.write_next(|out| Ok(out.write_all(&[0; 4])?)).unwrap_err();
        assert!(err.to_string().contains("tensor `x` wrote 4 bytes, not 8"), "{err}");
    }
}
