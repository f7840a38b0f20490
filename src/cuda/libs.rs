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

use libloading::Library;
use std::path::{Path, PathBuf};

/// An opened library and where it was found.
pub struct Loaded {
    pub library: Library,
    pub path: String,
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
            return Ok(Loaded { library, path: soname.clone() });
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

fn open_in(dirs: &[PathBuf], names: &[String]) -> Option<Loaded> {
    for soname in names {
        for dir in dirs {
            let path = dir.join(soname);
            if !path.is_file() {
                continue;
            }
            // SAFETY: as in `open`. An absolute path: the library's own RUNPATH ($ORIGIN in the Python
            // packages) then finds its companions (libnvrtc-builtins, libcublasLt) in the same folder.
            if let Ok(library) = unsafe { Library::new(&path) } {
                return Some(Loaded { library, path: path.display().to_string() });
            }
        }
    }
    None
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
    fn a_missing_library_is_an_error_naming_it() {
        let err = open("learn-kern-no-such-library").err().expect("no such library");
        assert!(err.contains("liblearn-kern-no-such-library"), "{err}");
    }
}
