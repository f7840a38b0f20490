//! File-system habits every output follows: write to a temporary name beside the target, then rename, so a
//! reader never sees half a file (SPEC §8).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: cannot write", path.display()))
}

/// Removes the temporaries that killed processes left in `dir` (`NAME.tmpPID` where no process PID runs any
/// more), so that a killed run's half-written checkpoint or shard does not sit there for ever. Only on
/// systems with `/proc`, where a live process can be told from a dead one; elsewhere nothing is removed.
pub fn remove_stale_temps(dir: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.rsplit_once(".tmp")).map(|(_, pid)| pid) else { continue };
        let live = pid.parse::<u32>().map(|pid| pid == std::process::id() || proc.join(pid.to_string()).exists());
        if live == Ok(false) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Renames a finished temporary file into place.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // PIDs above the kernel's limit (2^22) belong to no process.
        let names = ["checkpoint.safetensors.tmp4999999", "a.tmp", "b.tmpx", "notes.txt", "c.tmp1"];
        let own = temp_path(&dir.path().join("optimizer.safetensors"));
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(&own, b"x").unwrap();
        remove_stale_temps(dir.path());
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mut want = vec!["a.tmp", "b.tmpx", "notes.txt", "c.tmp1", own.file_name().unwrap().to_str().unwrap()];
        if !Path::new("/proc/self").exists() {
            want.push("checkpoint.safetensors.tmp4999999");
        }
        want.sort();
        assert_eq!(left, want, "pid 1 (init) is alive; unparsable suffixes are not ours");
    }
}
