//! kernels/topk.cu's logic on every CI run, without a GPU: tools/topk_emu/run.sh compiles the kernel's own
//! source with g++ over emulated CUDA built-ins (threads as fibers switched at barriers and warp operations)
//! and checks two cases against the definition bit for bit. tests/cuda_topk.rs is the real check on a GPU.

use std::path::Path;
use std::process::Command;

#[test]
fn the_top_k_kernel_source_ranks_like_the_definition_when_emulated() {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("skipping: no g++ to build the emulated kernel");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/topk_emu/run.sh");
    let out = Command::new("bash").arg(&script).arg("quick").output().expect("bash runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.ends_with(": ok")).count(), 2, "{text}");
}
