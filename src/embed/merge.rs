//! `learn-kern embed --merge`: shard stores made with `--shard I/N` back into one store, row r of the
//! whole catalogue from shard r mod N.

use super::store::{EMBEDDINGS, IDS, META};
use crate::error::input;
use crate::fsutil::write_atomic;
use crate::npy::{NpyMatrix, NpyMatrixMut};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Shard {
    dir: PathBuf,
    meta: Value,
    index: usize,
    ids: Vec<String>,
    matrix: NpyMatrix,
}

fn open_shard(dir: &Path) -> Result<Shard> {
    let meta_path = dir.join(META);
    let bytes = std::fs::read(&meta_path)
        .map_err(|_| input(format!("{}: not a finished shard store (no {META})", dir.display())))?;
    let meta: Value =
        serde_json::from_slice(&bytes).map_err(|e| input(format!("{}: not valid JSON ({e})", meta_path.display())))?;
    let shard = meta.get("shard").and_then(Value::as_str).unwrap_or_default().to_string();
    let (index, _) = super::job::parse_shard(&shard)
        .map_err(|_| input(format!("{}: not a shard store (meta.json has no \"shard\": \"I/N\")", dir.display())))?;
    let ids_path = dir.join(IDS);
    let ids = std::fs::read_to_string(&ids_path)
        .map_err(|e| input(format!("{}: cannot read ({e})", ids_path.display())))?
        .lines()
        .map(str::to_string)
        .collect();
    let matrix = NpyMatrix::open(&dir.join(EMBEDDINGS))?;
    Ok(Shard { dir: dir.to_path_buf(), meta, index, ids, matrix })
}

/// Keys of meta.json that every shard of one job shares.
const SHARED_KEYS: [&str; 8] =
    ["model", "model_fingerprint", "dim", "dtype", "template", "max_tokens", "items", "pooling"];

/// Merges the shard stores in `inputs` (any order) into a finished store at `out`; returns the row count.
pub fn merge(inputs: &[PathBuf], out: &Path, overwrite: bool) -> Result<usize> {
    let mut shards = inputs.iter().map(|d| open_shard(d)).collect::<Result<Vec<_>>>()?;
    shards.sort_by_key(|s| s.index);
    let Some(first) = shards.first() else {
        return Err(input("--merge needs the shard store directories"));
    };
    let count = first.meta["shard"].as_str().and_then(|s| super::job::parse_shard(s).ok()).map_or(0, |(_, n)| n);
    for shard in &shards {
        for key in SHARED_KEYS {
            if shard.meta.get(key) != first.meta.get(key) {
                return Err(input(format!(
                    "{} and {}: made by different jobs ({key} differs)",
                    first.dir.display(),
                    shard.dir.display()
                )));
            }
        }
        if shard.meta["shard"].as_str().and_then(|s| super::job::parse_shard(s).ok()).map(|(_, n)| n) != Some(count) {
            return Err(input(format!(
                "{}: is a shard of a different split than {}",
                shard.dir.display(),
                first.dir.display()
            )));
        }
        if shard.ids.len() != shard.matrix.rows {
            return Err(input(format!("{}: ids.txt and {EMBEDDINGS} disagree on the row count", shard.dir.display())));
        }
    }
    let found: Vec<usize> = shards.iter().map(|s| s.index).collect();
    if found != (0..count).collect::<Vec<_>>() {
        return Err(input(format!("--merge needs each of the {count} shards exactly once; got shards {found:?}")));
    }
    let total: usize = shards.iter().map(|s| s.ids.len()).sum();
    for (i, shard) in shards.iter().enumerate() {
        let expected = super::store::shard_rows(total, i, count).len();
        if shard.ids.len() != expected {
            return Err(input(format!(
                "{}: holds {} rows, shard {i}/{count} of {total} items holds {expected}",
                shard.dir.display(),
                shard.ids.len()
            )));
        }
    }
    if out.join(META).exists() && !overwrite {
        return Err(input(format!("{}: already holds a finished store; use --overwrite", out.display())));
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let _ = std::fs::remove_file(out.join(META));

    let (cols, dtype) = (first.matrix.cols, first.matrix.dtype);
    let mut merged = NpyMatrixMut::create(&out.join(EMBEDDINGS), total, cols, dtype)?;
    let mut ids = String::new();
    let mut row = vec![0.0f32; cols];
    for r in 0..total {
        let shard = &shards[r % count];
        shard.matrix.read_row(r / count, &mut row);
        merged.write_row(r, &row);
        ids.push_str(&shard.ids[r / count]);
        ids.push('\n');
    }
    merged.flush()?;
    write_atomic(&out.join(IDS), ids.as_bytes())?;
    let mut meta = first.meta.clone();
    meta["shard"] = Value::Null;
    meta["count"] = total.into();
    let tokens: u64 = shards.iter().filter_map(|s| s.meta["total_tokens"].as_u64()).sum();
    meta["total_tokens"] = tokens.into();
    meta["merged_from"] = shards.iter().map(|s| s.dir.display().to_string()).collect::<Vec<_>>().into();
    write_atomic(&out.join(META), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::Dtype;

    fn shard_store(dir: &Path, index: usize, count: usize, total: usize, dim: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let rows: Vec<usize> = crate::embed::store::shard_rows(total, index, count).collect();
        let mut m = NpyMatrixMut::create(&dir.join(EMBEDDINGS), rows.len(), dim, Dtype::F16).unwrap();
        let mut ids = String::new();
        for (local, &global) in rows.iter().enumerate() {
            m.write_row(local, &vec![global as f32; dim]);
            ids.push_str(&format!("id{global}\n"));
        }
        m.flush().unwrap();
        std::fs::write(dir.join(IDS), ids).unwrap();
        let meta = serde_json::json!({"model": "m", "dim": dim, "dtype": "float16", "shard": format!("{index}/{count}"),
                                      "count": rows.len(), "total_tokens": 10});
        std::fs::write(dir.join(META), meta.to_string()).unwrap();
    }

    #[test]
    fn shards_interleave_back_into_catalogue_order() {
        let dir = tempfile::tempdir().unwrap();
        let parts: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("s{i}"))).collect();
        for (i, p) in parts.iter().enumerate() {
            shard_store(p, i, 3, 11, 4);
        }
        let out = dir.path().join("merged");
        let reversed: Vec<PathBuf> = parts.iter().rev().cloned().collect();
        assert_eq!(merge(&reversed, &out, false).unwrap(), 11);
        let store = crate::embed::store::ContentStore::open(&out).unwrap();
        for r in 0..11 {
            assert_eq!(store.ids[r], format!("id{r}"));
            assert_eq!(store.row(r), vec![r as f32; 4]);
        }
        assert_eq!(store.meta["total_tokens"], 30);
        assert!(merge(&parts, &out, false).is_err(), "a finished store is not overwritten silently");
    }

    #[test]
    fn missing_or_foreign_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        shard_store(&a, 0, 2, 5, 2);
        shard_store(&b, 1, 2, 5, 3);
        let err = merge(std::slice::from_ref(&a), &dir.path().join("o"), false).unwrap_err();
        assert!(err.to_string().contains("exactly once"), "{err}");
        let err = merge(&[a, b], &dir.path().join("o"), false).unwrap_err();
        assert!(err.to_string().contains("dim differs"), "{err}");
    }
}
