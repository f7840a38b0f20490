//! The embedding store (SPEC §2.4): a directory NumPy reads with no custom code.
//!
//! - `embeddings.npy` `[N, D]` f16 or f32, row r = item r; created full-size when the job starts;
//! - `ids.txt`, one id per line in row order;
//! - `meta.json`, written last: its presence is what marks a store finished.
//!
//! While a job runs, `job.json` records the arguments that determine the result and `progress.journal`
//! appends the key of every batch whose rows are on disk. A rerun with the same arguments skips those
//! batches, so a kill costs at most the batches in flight.

use crate::error::input;
use crate::fsutil::write_atomic;
use crate::npy::{Dtype, NpyMatrix, NpyMatrixMut};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const EMBEDDINGS: &str = "embeddings.npy";
pub const IDS: &str = "ids.txt";
pub const META: &str = "meta.json";
const JOB: &str = "job.json";
const JOURNAL: &str = "progress.journal";

/// Everything that determines a store's contents; a resumed job must match it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobKey {
    pub tool_version: String,
    pub items: String,
    pub items_count: usize,
    pub ids_digest: String,
    pub model: String,
    pub model_fingerprint: String,
    pub dim: usize,
    pub dtype: String,
    pub template: Option<String>,
    pub max_tokens: usize,
    pub batch_tokens: usize,
    pub sort_window: usize,
    pub shard: Option<(usize, usize)>,
}

impl JobKey {
    /// The first field that differs from `other`, for the error message.
    fn first_difference(&self, other: &JobKey) -> String {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        if let (Value::Object(a), Value::Object(b)) = (&a, &b) {
            for (key, value) in a {
                if b.get(key) != Some(value) {
                    return format!("{key}: {} then, {} now", b.get(key).unwrap_or(&Value::Null), value);
                }
            }
        }
        "unknown".to_string()
    }
}

/// A stable digest of the ids in row order (FNV-1a over the ids and separators).
pub fn ids_digest(ids: &[String]) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for id in ids {
        for &b in id.as_bytes().iter().chain(b"\n") {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    format!("{hash:016x}")
}

/// What opening a store for writing found.
pub enum Opened {
    /// A new store, or an unfinished one to continue (`done` batches already on disk).
    Writing { writer: StoreWriter, done: usize },
    /// The store was already finished by an earlier run with the same arguments.
    AlreadyComplete,
}

/// Writes rows of a store and journals finished batches.
pub struct StoreWriter {
    dir: PathBuf,
    matrix: NpyMatrixMut,
    journal: File,
    done: HashSet<u64>,
}

impl StoreWriter {
    /// Starts a new store in `dir`, or continues the unfinished one a killed run left there.
    pub fn open(dir: &Path, key: &JobKey, ids: &[String], dtype: Dtype, overwrite: bool) -> Result<Opened> {
        let job_path = dir.join(JOB);
        if dir.exists() && !overwrite {
            match read_job(&job_path)? {
                Some(previous) if previous != *key => {
                    return Err(input(format!(
                        "{}: holds a store made with different arguments ({}); use another --out or --overwrite",
                        dir.display(),
                        key.first_difference(&previous)
                    )));
                }
                Some(_) if dir.join(META).is_file() => return Ok(Opened::AlreadyComplete),
                Some(_) => return Self::resume(dir, key, dtype),
                None if std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) => {
                    return Err(input(format!(
                        "{}: exists and is not an embedding store of this job; use another --out or --overwrite",
                        dir.display()
                    )));
                }
                None => {}
            }
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the store directory", dir.display()))?;
        for name in [META, JOURNAL, JOB] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
            }
        }
        let matrix = NpyMatrixMut::create(&dir.join(EMBEDDINGS), ids.len(), key.dim, dtype)?;
        let mut id_text = String::with_capacity(ids.iter().map(|s| s.len() + 1).sum());
        for id in ids {
            id_text.push_str(id);
            id_text.push('\n');
        }
        write_atomic(&dir.join(IDS), id_text.as_bytes())?;
        // job.json last: a store without it is not resumable, so a crash above restarts from scratch.
        write_atomic(&job_path, serde_json::to_string_pretty(key)?.as_bytes())?;
        let journal = open_journal(dir)?;
        Ok(Opened::Writing {
            writer: StoreWriter { dir: dir.to_path_buf(), matrix, journal, done: HashSet::new() },
            done: 0,
        })
    }

    fn resume(dir: &Path, key: &JobKey, dtype: Dtype) -> Result<Opened> {
        let matrix = NpyMatrixMut::reopen(&dir.join(EMBEDDINGS), key.items_count_in_store(), key.dim, dtype)?;
        let path = dir.join(JOURNAL);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .with_context(|| format!("{}: cannot read", path.display()))?;
        }
        // A kill can tear the last record; whole records are batches whose rows were flushed first.
        let whole = bytes.len() / 8 * 8;
        let done: HashSet<u64> =
            bytes[..whole].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let journal = open_journal(dir)?;
        journal.set_len(whole as u64).with_context(|| format!("{}: cannot repair", path.display()))?;
        let count = done.len();
        Ok(Opened::Writing { writer: StoreWriter { dir: dir.to_path_buf(), matrix, journal, done }, done: count })
    }

    /// True when an earlier run already wrote batch `key`.
    pub fn is_done(&self, key: u64) -> bool {
        self.done.contains(&key)
    }

    /// The batches already on disk.
    pub fn done_keys(&self) -> HashSet<u64> {
        self.done.clone()
    }

    /// Writes the rows of one batch (`values` is `[rows.len(), dim]`), makes them durable, then journals it.
    pub fn write_batch(&mut self, key: u64, rows: &[usize], values: &[f32]) -> Result<()> {
        let dim = self.matrix.cols;
        for (i, &row) in rows.iter().enumerate() {
            self.matrix.write_row(row, &values[i * dim..(i + 1) * dim]);
        }
        if let (Some(&first), Some(&last)) = (rows.iter().min(), rows.iter().max()) {
            self.matrix.flush_rows(first, last)?;
        }
        self.journal.write_all(&key.to_le_bytes()).context("cannot append to the progress journal")?;
        self.journal.sync_data().context("cannot sync the progress journal")?;
        self.done.insert(key);
        Ok(())
    }

    /// Flushes everything and writes `meta.json`, which marks the store finished.
    pub fn finish(self, meta: &Value) -> Result<()> {
        self.matrix.flush()?;
        write_atomic(&self.dir.join(META), serde_json::to_string_pretty(meta)?.as_bytes())?;
        let _ = std::fs::remove_file(self.dir.join(JOURNAL));
        Ok(())
    }
}

impl JobKey {
    /// Rows this job's store holds: every item, or this shard's share of them.
    pub fn items_count_in_store(&self) -> usize {
        match self.shard {
            Some((index, count)) => shard_rows(self.items_count, index, count).len(),
            None => self.items_count,
        }
    }
}

/// Catalogue rows that shard `index` of `count` embeds: those ≡ index (mod count).
pub fn shard_rows(total: usize, index: usize, count: usize) -> std::iter::StepBy<std::ops::Range<usize>> {
    (index.min(total)..total).step_by(count.max(1))
}

fn read_job(path: &Path) -> Result<Option<JobKey>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            input(format!("{}: unreadable ({e}); remove the directory or use --overwrite", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

fn open_journal(dir: &Path) -> Result<File> {
    let path = dir.join(JOURNAL);
    OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("{}: cannot open", path.display()))
}

/// A finished store, memory-mapped for reading (training reads content embeddings from here).
pub struct ContentStore {
    pub dir: PathBuf,
    pub meta: Value,
    pub ids: Vec<String>,
    index: HashMap<String, usize>,
    matrix: NpyMatrix,
}

impl ContentStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META);
        let meta_bytes = std::fs::read(&meta_path).map_err(|_| {
            input(format!(
                "{}: not a finished embedding store (no {META}; rerun the embed command that made it to finish it)",
                dir.display()
            ))
        })?;
        let meta: Value = serde_json::from_slice(&meta_bytes)
            .map_err(|e| input(format!("{}: not valid JSON ({e})", meta_path.display())))?;
        if let Some(shard) = meta.get("shard").filter(|s| !s.is_null()) {
            return Err(input(format!(
                "{}: is shard {shard} of a sharded store; combine the shards with `learn-kern embed --merge`",
                dir.display()
            )));
        }
        let matrix = NpyMatrix::open(&dir.join(EMBEDDINGS))?;
        let ids_path = dir.join(IDS);
        let ids_text = std::fs::read_to_string(&ids_path)
            .map_err(|e| input(format!("{}: cannot read ({e})", ids_path.display())))?;
        let ids: Vec<String> = ids_text.lines().map(str::to_string).collect();
        if ids.len() != matrix.rows {
            return Err(input(format!(
                "{}: lists {} ids but {EMBEDDINGS} has {} rows",
                ids_path.display(),
                ids.len(),
                matrix.rows
            )));
        }
        let mut index = HashMap::with_capacity(ids.len());
        for (row, id) in ids.iter().enumerate() {
            if index.insert(id.clone(), row).is_some() {
                return Err(input(format!("{}: duplicate id {id:?}", ids_path.display())));
            }
        }
        Ok(Self { dir: dir.to_path_buf(), meta, ids, index, matrix })
    }

    pub fn len(&self) -> usize {
        self.matrix.rows
    }

    pub fn is_empty(&self) -> bool {
        self.matrix.rows == 0
    }

    pub fn dim(&self) -> usize {
        self.matrix.cols
    }

    pub fn dtype(&self) -> Dtype {
        self.matrix.dtype
    }

    /// The row of an item id.
    pub fn row_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Row `r` as f32 into `out` (length `dim`).
    pub fn read_row(&self, r: usize, out: &mut [f32]) {
        self.matrix.read_row(r, out);
    }

    pub fn row(&self, r: usize) -> Vec<f32> {
        self.matrix.row(r)
    }

    /// Row `r` as fp16 into `out` (length `dim`): the GPU's input, copied as stored when the store is f16.
    pub fn read_row_f16(&self, r: usize, out: &mut [half::f16]) {
        self.matrix.read_row_f16(r, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dim: usize, count: usize) -> JobKey {
        JobKey {
            tool_version: "t".into(),
            items: "items.jsonl".into(),
            items_count: count,
            ids_digest: "d".into(),
            model: "m".into(),
            model_fingerprint: "f".into(),
            dim,
            dtype: "float16".into(),
            template: None,
            max_tokens: 500,
            batch_tokens: 1000,
            sort_window: 10,
            shard: None,
        }
    }

    fn writer(opened: Opened) -> (StoreWriter, usize) {
        match opened {
            Opened::Writing { writer, done } => (writer, done),
            Opened::AlreadyComplete => panic!("expected a writable store"),
        }
    }

    #[test]
    fn a_store_resumes_from_its_journal_and_then_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("store");
        let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let k = key(2, 3);
        let (mut w, done) = writer(StoreWriter::open(&out, &k, &ids, Dtype::F32, false).unwrap());
        assert_eq!(done, 0);
        w.write_batch(7, &[2, 0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        drop(w);
        // A torn record at the end of the journal is ignored.
        OpenOptions::new().append(true).open(out.join(JOURNAL)).unwrap().write_all(&[1, 2, 3]).unwrap();
        assert!(ContentStore::open(&out).is_err(), "unfinished stores are not readable");

        let (mut w, done) = writer(StoreWriter::open(&out, &k, &ids, Dtype::F32, false).unwrap());
        assert_eq!(done, 1);
        assert!(w.is_done(7) && !w.is_done(8));
        w.write_batch(8, &[1], &[5.0, 6.0]).unwrap();
        w.finish(&serde_json::json!({"count": 3})).unwrap();

        assert!(matches!(StoreWriter::open(&out, &k, &ids, Dtype::F32, false).unwrap(), Opened::AlreadyComplete));
        let store = ContentStore::open(&out).unwrap();
        assert_eq!((store.len(), store.dim()), (3, 2));
        assert_eq!(store.row(0), vec![3.0, 4.0]);
        assert_eq!(store.row(1), vec![5.0, 6.0]);
        assert_eq!(store.row(2), vec![1.0, 2.0]);
        assert_eq!(store.row_of("c"), Some(2));
        assert_eq!(store.row_of("z"), None);
    }

    #[test]
    fn different_arguments_or_foreign_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("store");
        let ids = vec!["a".to_string()];
        drop(StoreWriter::open(&out, &key(2, 1), &ids, Dtype::F32, false).unwrap());
        let mut other = key(2, 1);
        other.max_tokens = 64;
        let err = StoreWriter::open(&out, &other, &ids, Dtype::F32, false).err().unwrap();
        assert!(crate::error::is_input_error(&err));
        assert!(err.to_string().contains("max_tokens: 500 then, 64 now"), "{err}");
        assert!(StoreWriter::open(&out, &other, &ids, Dtype::F32, true).is_ok());

        let foreign = dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "x").unwrap();
        assert!(StoreWriter::open(&foreign, &key(2, 1), &ids, Dtype::F32, false).is_err());
    }

    #[test]
    fn shard_rows_partition_the_catalogue() {
        let all: Vec<usize> = (0..3).flat_map(|i| shard_rows(10, i, 3)).collect::<Vec<_>>();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(shard_rows(10, 1, 3).collect::<Vec<_>>(), vec![1, 4, 7]);
        assert_eq!(shard_rows(2, 5, 8).count(), 0);
    }
}
