//! Finding the CUDA libraries the engine opens itself: NVRTC (kernel compiler) and cuBLAS (GEMMs).
//!
//! The driver library comes with the GPU driver and cudarc finds it. NVRTC and cuBLAS come with a CUDA
//! toolkit or from the Python package index (`nvidia-cuda-nvrtc-cu12`, `nvidia-cublas-cu12`, or CUDA 13's
//! packages under `nvidia/cu13/lib`), often off the loader's search path and named for their major version
//! (`libnvrtc.so.12`, `libcublas.so.13`). cudarc looks them up under names fixed when it was built (major 12
//! and older, never 13) and panics when none loads, so the engine opens these two itself and turns a
//! missing library into an error that says where it looked. Search order, first hit wins:
//! 1. the directories in `LEARN_KERN_CUDA_LIBS` (`:`-separated);
//! 2. the loader's own search (`LD_LIBRARY_PATH`, the ldconfig cache);
//! 3. `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`;
//! 4. the `nvidia/*/lib` folders of the Python packages that `python3` sees (where `tools/test.sh` puts
//!    NVRTC on a machine without a toolkit).
//!
//! Within each place, major version 12 comes first: it is the last whose NVRTC targets the V100 (sm_70),
//! and CUDA 12 libraries run on every driver from 12.0 on. NVRTC and cuBLAS may come from different
//! places and versions; each only has to run on the installed driver.
//!
//! NVRTC opens its builtins library (`libnvrtc-builtins.so.13.0`) by name when it first compiles. CUDA 12's
//! Python package gives `libnvrtc.so.12` a RUNPATH of `$ORIGIN`, so the loader looks beside it; CUDA 13's
//! (`nvidia/cu13/lib`, as in PyTorch's cu130 wheels) gives it none, and every compilation fails with
//! "failed to open libnvrtc-builtins.so.13.0". So a library found in a folder has its companions there
//! opened first, by path: the later lookup by name then finds them already loaded.

use libloading::Library;
use std::path::{Path, PathBuf};

/// An opened library and where it was found.
pub struct Loaded {
    pub library: Library,
    pub path: String,
    /// What it opens by name at run time, opened first from its folder; dropped after `library`.
    _companions: Vec<Library>,
}

/// File names tried for `lib{name}`, in order of preference.
fn sonames(name: &str) -> Vec<String> {
    ["12", "13", "11"].iter().map(|major| format!("lib{name}.so.{major}")).chain([format!("lib{name}.so")]).collect()
}

/// Opens `lib{name}` (`nvrtc`, `cublas`) from the first place that has it, or says where it looked.
pub fn open(name: &str) -> Result<Loaded, String> {
    let names = sonames(name);
    let explicit: Vec<PathBuf> =
        std::env::var_os("LEARN_KERN_CUDA_LIBS").map(|dirs| std::env::split_paths(&dirs).collect()).unwrap_or_default();
    if let Some(found) = open_in(&explicit, &names) {
        return Ok(found);
    }
    for soname in &names {
        // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
        if let Ok(library) = unsafe { Library::new(soname) } {
            return Ok(Loaded { library, path: soname.clone(), _companions: Vec::new() });
        }
    }
    let mut toolkit: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|home| Path::new(&home).join("lib64"))
        .collect();
    toolkit.push("/usr/local/cuda/lib64".into());
    if let Some(found) = open_in(&toolkit, &names) {
        return Ok(found);
    }
    let python = python_library_dirs();
    if let Some(found) = open_in(&python, &names) {
        return Ok(found);
    }
    Err(format!(
        "lib{name} (CUDA {}) was not found in LEARN_KERN_CUDA_LIBS, the loader's path, a CUDA toolkit or \
         python3's nvidia packages ({} folders); install it (e.g. `pip install nvidia-{}-cu12`) or point \
         LEARN_KERN_CUDA_LIBS at its folder",
        if name == "nvrtc" { "runtime compiler" } else { "BLAS" },
        python.len(),
        if name == "nvrtc" { "cuda-nvrtc" } else { "cublas" },
    ))
}

/// Opens `lib{name}` from `dir` alone (for checks of one particular installation), or says why not.
pub fn open_from(dir: &Path, name: &str) -> Result<Loaded, String> {
    open_in(&[dir.to_path_buf()], &sonames(name))
        .ok_or_else(|| format!("no loadable lib{name}.so.* in {}", dir.display()))
}

fn open_in(dirs: &[PathBuf], names: &[String]) -> Option<Loaded> {
    for soname in names {
        for dir in dirs {
            let path = dir.join(soname);
            if !path.is_file() {
                continue;
            }
            let companions = open_companions(dir, soname);
            // SAFETY: as in `open`, by absolute path.
            if let Ok(library) = unsafe { Library::new(&path) } {
                return Some(Loaded { library, path: path.display().to_string(), _companions: companions });
            }
        }
    }
    None
}

/// The files in `dir` that the library `soname` opens by name (see the module's notes), opened. One that
/// does not load leaves the main library to find its own.
fn open_companions(dir: &Path, soname: &str) -> Vec<Library> {
    // SAFETY: as in `open`.
    companion_files(dir, soname).iter().filter_map(|path| unsafe { Library::new(path) }.ok()).collect()
}

/// `libnvrtc-builtins.so.13.*` beside `libnvrtc.so.13`, `libcublasLt.so.13*` beside `libcublas.so.13`.
fn companion_files(dir: &Path, soname: &str) -> Vec<PathBuf> {
    let Some((stem, major)) = soname.split_once(".so.") else { return Vec::new() };
    let companion = match stem {
        "libnvrtc" => format!("libnvrtc-builtins.so.{major}"),
        "libcublas" => format!("libcublasLt.so.{major}"),
        _ => return Vec::new(),
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let file = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
            file == companion || file.strip_prefix(&companion).is_some_and(|rest| rest.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// `<site>/nvidia/<package>/lib` for every entry of python3's `sys.path`; empty without python3.
fn python_library_dirs() -> Vec<PathBuf> {
    let output = std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(p for p in sys.path if p))"])
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(output) = output else { return Vec::new() };
    let mut dirs = Vec::new();
    for site in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(packages) = std::fs::read_dir(Path::new(site).join("nvidia")) else { continue };
        let mut found: Vec<PathBuf> =
            packages.filter_map(|e| e.ok()).map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
        found.sort();
        dirs.extend(found);
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sonames_prefer_cuda_12() {
        assert_eq!(sonames("nvrtc"), ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so.11", "libnvrtc.so"]);
    }

    #[test]
    fn companions_are_those_of_the_same_major_version_beside_the_library() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.0",
            "libnvrtc-builtins.alt.so.13.0",
            "libnvrtc-builtins.so.12.9",
            "libnvrtc-builtins.so.130",
            "libcublas.so.13",
            "libcublasLt.so.13",
            "libcublasLt.so.12",
        ] {
            std::fs::write(dir.path().join(name), b"not a library").unwrap();
        }
        let names = |soname| -> Vec<String> {
            companion_files(dir.path(), soname)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into())
                .collect()
        };
        assert_eq!(names("libnvrtc.so.13"), ["libnvrtc-builtins.so.13.0"]);
        assert_eq!(names("libnvrtc.so.12"), ["libnvrtc-builtins.so.12.9"]);
        assert_eq!(names("libcublas.so.13"), ["libcublasLt.so.13"]);
        assert!(names("libnvrtc.so").is_empty() && names("libcuda.so.1").is_empty());
        // Nothing here loads: the error names the folder, and no companion stopped the search.
        let err = open_from(dir.path(), "nvrtc").err().unwrap();
        assert!(err.contains("no loadable libnvrtc.so.*"), "{err}");
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let err = open("learn-kern-no-such-library").err().expect("no such library");
        assert!(err.contains("liblearn-kern-no-such-library"), "{err}");
    }
}
