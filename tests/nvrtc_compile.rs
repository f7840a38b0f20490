//! Every kernel compiles with NVRTC for compute_70 (the V100) and compute_90 (the H100), without a warning,
//! to PTX that declares each entry point and, for compute_70, uses nothing newer than sm_70; and to machine
//! code for sm_70 and sm_90 without register spills; and the same for sm_90 with the NVRTC of CUDA 13, the
//! one the lent H100/H200 machines carry. No GPU is needed, but both NVRTCs are: these tests fail, they do
//! not skip, when one cannot be found, because CI must check the kernels on every run. `tools/test.sh`
//! installs them from the Python package index where the machine has none.

use learn_kern::cuda::kernels::{self, ENTRY_POINTS, SOURCES};
use learn_kern::cuda::nvrtc::{self, Nvrtc, Target};
use std::path::Path;

/// NVRTC 12.x warns that it will drop pre-sm_75 targets one day; that notice is the only message allowed.
const DEPRECATION: &str = "Architectures prior to '<compute/sm>_75' are deprecated";

/// Instructions a compute_70 kernel must not contain: they need sm_75 / sm_80 / sm_90.
const NEWER_THAN_SM70: &[&str] =
    &["cp.async", "ldmatrix", "stmatrix", ".bf16", "mma.sync.aligned.m16n8", "wgmma", "cp.async.bulk", "mbarrier"];

fn nvrtc() -> &'static Nvrtc {
    let nvrtc = nvrtc::get().unwrap_or_else(|why| {
        panic!("NVRTC is needed to check the kernels: {why}. Run tools/test.sh, which installs it, or set LEARN_KERN_CUDA_LIBS")
    });
    assert!(
        nvrtc.supported_archs().contains(&70),
        "{} (NVRTC {}.{}) cannot target sm_70; the V100 check needs NVRTC from CUDA 12 (pip install nvidia-cuda-nvrtc-cu12)",
        nvrtc.path,
        nvrtc.version.0,
        nvrtc.version.1
    );
    nvrtc
}

fn messages(log: &str) -> Vec<&str> {
    log.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains(DEPRECATION)).collect()
}

#[test]
fn every_kernel_compiles_to_ptx_for_compute_70_and_compute_90() {
    let nvrtc = nvrtc();
    eprintln!("NVRTC {}.{} from {}", nvrtc.version.0, nvrtc.version.1, nvrtc.path);
    for arch in [70, 90] {
        for (name, source) in SOURCES {
            let compiled = kernels::compile(nvrtc, name, source, Target::Ptx(arch), &[])
                .unwrap_or_else(|log| panic!("{name}.cu, compute_{arch}: {log}"));
            assert!(messages(&compiled.log).is_empty(), "{name}.cu, compute_{arch}: warnings:\n{}", compiled.log);
            let ptx = String::from_utf8_lossy(&compiled.code);
            assert!(ptx.contains(&format!(".target sm_{arch}")), "{name}.cu: PTX for another target");
            let entries = ENTRY_POINTS.iter().find(|(file, _)| file == name).map(|(_, e)| *e).unwrap();
            for entry in entries {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{name}.cu, compute_{arch}: no entry {entry}");
            }
            if arch == 70 {
                for instruction in NEWER_THAN_SM70 {
                    assert!(!ptx.contains(instruction), "{name}.cu: compute_70 PTX uses {instruction}");
                }
            }
        }
    }
    // The attention families and InfoNCE are the tensor-core users: their sm_70 PTX must hold the wmma products
    // (Q·Kᵀ as row.col, P·V as row.row), or they silently fell back to scalar FMAs.
    for family in ["attention", "masked_attention", "infonce"] {
        let (_, source) = SOURCES.iter().find(|(name, _)| *name == family).unwrap();
        let ptx = kernels::compile(nvrtc, family, source, Target::Ptx(70), &[]).unwrap();
        let ptx = String::from_utf8_lossy(&ptx.code);
        assert!(ptx.contains("wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32"), "{family}.cu: no Q·Kᵀ wmma");
        assert!(ptx.contains("wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32"), "{family}.cu: no P·V wmma");
    }
}

#[test]
fn every_kernel_assembles_for_sm_70_and_sm_90_without_spills() {
    let nvrtc = nvrtc();
    for arch in [70, 90] {
        assemble_without_spills(nvrtc, arch);
    }
}

/// The NVRTC of CUDA 13.0, as PyTorch's cu130 wheels and the image of the lent H100/H200 machines carry it
/// (`nvidia/cu13/lib`): what the engine finds first on such a machine. It can no longer target the V100,
/// and its library has no RUNPATH, so this also checks that it finds its builtins (src/cuda/libs.rs).
/// `tools/test.sh` installs it and names its folder in `LEARN_KERN_NVRTC13_LIBS`.
#[test]
fn every_kernel_compiles_with_the_nvrtc_of_cuda_13_for_sm_90() {
    let dir = std::env::var_os("LEARN_KERN_NVRTC13_LIBS")
        .unwrap_or_else(|| panic!("LEARN_KERN_NVRTC13_LIBS is not set: run tools/test.sh, which installs NVRTC 13"));
    let nvrtc = nvrtc::open_from(Path::new(&dir)).unwrap_or_else(|why| panic!("NVRTC 13: {why}"));
    assert_eq!(nvrtc.version.0, 13, "{} is NVRTC {}.{}", nvrtc.path, nvrtc.version.0, nvrtc.version.1);
    for (name, source) in SOURCES {
        let compiled = kernels::compile(&nvrtc, name, source, Target::Ptx(90), &[])
            .unwrap_or_else(|log| panic!("{name}.cu, compute_90, NVRTC 13: {log}"));
        assert!(messages(&compiled.log).is_empty(), "{name}.cu, compute_90, NVRTC 13: warnings:\n{}", compiled.log);
    }
    assemble_without_spills(&nvrtc, 90);
}

/// Every kernel file to machine code for `sm_{arch}`: one resource report per kernel, none spilling, and no
/// other message.
fn assemble_without_spills(nvrtc: &Nvrtc, arch: u32) {
    for (name, source) in SOURCES {
        let compiled = kernels::compile(nvrtc, name, source, Target::Cubin(arch), &["--ptxas-options=-v"])
            .unwrap_or_else(|log| panic!("{name}.cu, sm_{arch}: {log}"));
        assert!(!compiled.code.is_empty(), "{name}.cu, sm_{arch}: empty CUBIN");
        let entries = ENTRY_POINTS.iter().find(|(file, _)| file == name).map(|(_, e)| e.len()).unwrap();
        let spill_lines: Vec<&str> = compiled.log.lines().filter(|l| l.contains("spill stores")).collect();
        assert_eq!(spill_lines.len(), entries, "{name}.cu, sm_{arch}: one report per kernel:\n{}", compiled.log);
        for line in spill_lines {
            assert!(
                line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                "{name}.cu, sm_{arch} spills registers: {line}\n{}",
                compiled.log
            );
        }
        let unexpected: Vec<&str> = messages(&compiled.log).into_iter().filter(|l| !l.starts_with("ptxas")).collect();
        assert!(unexpected.is_empty(), "{name}.cu, sm_{arch}: warnings:\n{}", compiled.log);
    }
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    let nvrtc = nvrtc();
    let err =
        kernels::compile(nvrtc, "broken", "extern \"C\" __global__ void k() { undeclared(); }", Target::Ptx(70), &[])
            .err()
            .expect("an undeclared function must not compile");
    assert!(err.contains("broken.cu") && err.contains("undeclared"), "{err}");
}
