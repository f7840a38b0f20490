//! The kernels of `kernels/*.cu`: their embedded sources, their compilation for a device (cached on disk),
//! and the loaded functions.
//!
//! Which code a device runs, in order of preference (SPEC §6):
//! 1. PTX that `nvcc` made at build time (build.rs), when the device's architecture is at least the PTX's
//!    and the driver accepts it;
//! 2. otherwise NVRTC compiles the embedded sources for the device's own architecture (`sm_XY` machine
//!    code, or PTX for the newest architecture this NVRTC knows when the device is newer still), and the
//!    result is cached in `$LEARN_KERN_CACHE`, `$XDG_CACHE_HOME/learn-kern` or `~/.cache/learn-kern`, keyed by
//!    the sources, the options, the architecture and the NVRTC and driver versions. A broken cache entry is
//!    recompiled; an unwritable cache only costs the compile time of the next run.

use super::nvrtc::{self, Compiled, Nvrtc, Target};
use anyhow::{Context, Result, anyhow};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use embedded::{HEADERS, PTX, PTX_ARCH, SOURCES};

/// Every entry point, by source file (the stem of its `kernels/*.cu`).
pub const ENTRY_POINTS: &[(&str, &[&str])] = &[
    ("adam", &["grad_sumsq", "grad_norm_finish", "adam_update"]),
    ("attention", &["attention_fwd_hd16", "attention_fwd_hd32", "attention_fwd_hd64", "attention_fwd_hd128"]),
    ("convert", &["convert_bf16_f16", "convert_f32_f16", "fill_uniform_f16", "fill_uniform_f32"]),
    ("embedding", &["embedding_gather"]),
    ("gelu", &["gelu_bias_fwd", "gelu_bias_bwd"]),
    (
        "infonce",
        &[
            "infonce_split",
            "infonce_pos",
            "infonce_lse_dq_d32",
            "infonce_dc_d32",
            "infonce_lse_dq_d64",
            "infonce_dc_d64",
        ],
    ),
    ("l2norm", &["l2norm_fwd", "l2norm_bwd"]),
    ("layernorm", &["layernorm_fwd", "layernorm_bwd"]),
    (
        "masked_attention",
        &["masked_attention_fwd", "masked_attention_bwd_dq", "masked_attention_bwd_dkdv", "masked_attention_diag"],
    ),
    ("pch_layout", &["pack_rows_f32", "pack_rows_f16"]),
    ("pool", &["final_norm_pool"]),
    ("reduce", &["column_sums"]),
    ("rmsnorm", &["rmsnorm_residual"]),
    ("rope", &["rope_table", "rope_apply"]),
    ("swiglu", &["swiglu"]),
    ("topk", &["topk_select", "topk_merge"]),
];

/// Options of every compilation. No fast-math: RoPE's sincosf and the softmax's exp2f keep full accuracy.
pub const OPTIONS: &[&str] = &["-std=c++17"];

/// Compiles the kernel file `name` (its source as embedded) for `target`, with `extra` options.
pub fn compile(nvrtc: &Nvrtc, name: &str, source: &str, target: Target, extra: &[&str]) -> Result<Compiled, String> {
    let options: Vec<&str> = OPTIONS.iter().chain(extra).copied().collect();
    nvrtc.compile(&format!("{name}.cu"), source, HEADERS, target, &options)
}

/// The loaded entry points of every kernel file, for one device.
pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    /// Where the code came from, for logs: build-time PTX or NVRTC (and whether from the cache).
    pub origin: String,
}

impl Kernels {
    /// Loads every kernel into `ctx`, compiling with NVRTC when no build-time PTX fits the device.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        if let Some(ptx_arch) = PTX_ARCH
            && ptx_arch <= arch
        {
            let modules: Result<Vec<_>, _> =
                PTX.iter().map(|(name, ptx)| ctx.load_module(Ptx::from_src(*ptx)).map(|m| (*name, m))).collect();
            // A driver older than the toolkit that built the PTX refuses it: NVRTC may still serve.
            if let Ok(modules) = modules {
                return Self::collect(modules, format!("nvcc compute_{ptx_arch} PTX built in"));
            }
        }
        let nvrtc = nvrtc::get().map_err(|why| anyhow!("the CUDA kernels need NVRTC to compile: {why}"))?;
        let target = target_for(nvrtc, arch)?;
        let driver = driver_version();
        let cache = cache_dir();
        let mut cached = 0;
        let mut modules = Vec::with_capacity(SOURCES.len());
        for (name, source) in SOURCES {
            let key = cache_key(name, source, nvrtc.version, target, driver);
            let path = cache.as_ref().map(|dir| dir.join(&key));
            if let Some(code) = path.as_ref().and_then(|p| std::fs::read(p).ok())
                && let Ok(module) = load(ctx, target, code)
            {
                modules.push((*name, module));
                cached += 1;
                continue;
            }
            let compiled = compile(nvrtc, name, source, target, &[]).map_err(|log| anyhow!(log))?;
            if let Some(path) = &path {
                let _ = std::fs::create_dir_all(path.parent().unwrap_or(path)).map(|_| {
                    // The cache only saves time: failing to write it is not an error.
                    let _ = crate::fsutil::write_atomic(path, &compiled.code);
                });
            }
            let module = load(ctx, target, compiled.code)
                .with_context(|| format!("loading {name}.cu ({})", target.describe()))?;
            modules.push((*name, module));
        }
        let origin = format!(
            "NVRTC {}.{} {} ({} of {} from the cache)",
            nvrtc.version.0,
            nvrtc.version.1,
            target.describe(),
            cached,
            SOURCES.len()
        );
        Self::collect(modules, origin)
    }

    fn collect(modules: Vec<(&str, Arc<CudaModule>)>, origin: String) -> Result<Self> {
        let mut functions = HashMap::new();
        for (file, names) in ENTRY_POINTS {
            let module = modules
                .iter()
                .find(|(name, _)| name == file)
                .map(|(_, m)| m)
                .ok_or_else(|| anyhow!("kernel file {file}.cu is missing from the build"))?;
            for name in *names {
                let function = module.load_function(name).with_context(|| format!("{file}.cu has no kernel {name}"))?;
                functions.insert(*name, function);
            }
        }
        Ok(Kernels { functions, origin })
    }

    /// The entry point `name`, one of [`ENTRY_POINTS`].
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| anyhow!("internal: no kernel named {name}"))
    }
}

fn load(ctx: &Arc<CudaContext>, target: Target, code: Vec<u8>) -> Result<Arc<CudaModule>> {
    let image = match target {
        Target::Cubin(_) => Ptx::from_binary(code),
        Target::Ptx(_) => Ptx::from_src(String::from_utf8(code).map_err(|_| anyhow!("PTX that is not UTF-8"))?),
    };
    Ok(ctx.load_module(image)?)
}

/// Machine code for the device when this NVRTC knows its architecture, else PTX for the newest one it
/// knows below it (the driver compiles that for the device).
fn target_for(nvrtc: &Nvrtc, arch: u32) -> Result<Target> {
    let archs = nvrtc.supported_archs();
    if archs.contains(&arch) {
        return Ok(Target::Cubin(arch));
    }
    match archs.iter().filter(|&&a| a < arch).max() {
        Some(&older) => Ok(Target::Ptx(older)),
        None => Err(anyhow!(
            "NVRTC {}.{} ({}) cannot compile for this GPU (sm_{arch}); it knows sm_{:?}. A V100 (sm_70) needs \
             NVRTC from CUDA 12 (pip install nvidia-cuda-nvrtc-cu12)",
            nvrtc.version.0,
            nvrtc.version.1,
            nvrtc.path,
            archs
        )),
    }
}

fn driver_version() -> i32 {
    let mut version = 0;
    // SAFETY: a valid out-pointer; the driver was initialised by the caller's context.
    let _ = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    version
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("LEARN_KERN_CACHE").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(|d| PathBuf::from(d).join("learn-kern"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/learn-kern")))
    })?;
    Some(base.join("kernels"))
}

/// `{name}-{target}-{hash}.{ext}`: FNV-1a over everything that changes the compiled code.
fn cache_key(name: &str, source: &str, nvrtc: (i32, i32), target: Target, driver: i32) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let settings = [OPTIONS.join(" "), format!("{nvrtc:?} {target:?} {driver}")];
    let parts =
        std::iter::once(source).chain(HEADERS.iter().map(|(_, text)| *text)).chain(settings.iter().map(|s| s.as_str()));
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let (kind, ext) = match target {
        Target::Ptx(a) => (format!("compute_{a}"), "ptx"),
        Target::Cubin(a) => (format!("sm_{a}"), "cubin"),
    };
    format!("{name}-{kind}-{hash:016x}.{ext}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_is_listed_with_exactly_its_entry_points() {
        let mut files: Vec<&str> = SOURCES.iter().map(|(name, _)| *name).collect();
        let mut listed: Vec<&str> = ENTRY_POINTS.iter().map(|(name, _)| *name).collect();
        files.sort();
        listed.sort();
        assert_eq!(files, listed);
        for (file, source) in SOURCES {
            // The name follows `void`, after an optional `__launch_bounds__(…)`.
            let declared: Vec<&str> = source
                .split("extern \"C\" __global__ void")
                .skip(1)
                .map(|rest| {
                    let rest = rest.trim_start();
                    let rest = match rest.strip_prefix("__launch_bounds__") {
                        Some(bounds) => &bounds[bounds.find(')').map_or(0, |i| i + 1)..],
                        None => rest,
                    };
                    rest.split('(').next().unwrap_or("").trim()
                })
                .collect();
            let want = ENTRY_POINTS.iter().find(|(name, _)| name == file).map(|(_, e)| e.to_vec()).unwrap();
            assert_eq!(declared, want, "{file}.cu");
        }
    }

    #[test]
    fn cache_keys_follow_source_target_and_versions() {
        let a = cache_key("rope", "x", (12, 9), Target::Cubin(70), 12080);
        assert!(a.starts_with("rope-sm_70-") && a.ends_with(".cubin"), "{a}");
        assert_eq!(a, cache_key("rope", "x", (12, 9), Target::Cubin(70), 12080));
        for other in [
            cache_key("rope", "y", (12, 9), Target::Cubin(70), 12080),
            cache_key("rope", "x", (12, 8), Target::Cubin(70), 12080),
            cache_key("rope", "x", (12, 9), Target::Cubin(80), 12080),
            cache_key("rope", "x", (12, 9), Target::Cubin(70), 13000),
        ] {
            assert_ne!(a, other);
        }
        assert!(cache_key("rope", "x", (12, 9), Target::Ptx(90), 0).ends_with(".ptx"));
    }
}
