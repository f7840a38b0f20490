//! The CPU emulator of the CUDA driver (tools/cuda_emu), on which the GPU tests run where there is no GPU,
//! finds what it exists to find: a missing barrier, lanes diverged around a warp shuffle, a trap, a read
//! past an allocation, a host that reads before waiting; and computes halves and tensor-core products as a
//! GPU does. tools/cuda_emu/selftest.cpp holds the cases.

use std::path::Path;
use std::process::Command;

#[test]
fn the_emulator_catches_the_mistakes_it_is_for() {
    if !cfg!(target_arch = "x86_64") || Command::new("g++").arg("--version").output().is_err() {
        eprintln!("skipping: the emulator needs g++ on x86-64");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cuda_emu/selftest.sh");
    let out = Command::new("bash").arg(&script).output().expect("bash runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("selftest: ok"), "{text}");
    for reported in ["wait at different operations", "__trap()", "segmentation fault"] {
        assert!(text.contains(reported), "the emulator did not report: {reported}\n{text}");
    }
}
