//! Converts a model directory's PyTorch `.bin` weights to safetensors, as `learn-kern convert --model DIR
//! [--out DIR]` does, and prints the report as JSON. It exists to measure the conversion on its own
//! (tools/convert/measure_peak.py runs it under `/usr/bin/time -v`).
//!
//! `cargo run --example convert_model -- DIR [OUT]`

use learn_kern::convert::convert_model_dir;
use learn_kern::error;
use std::path::PathBuf;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (dir, out) = match &args[..] {
        [dir] => (dir, None),
        [dir, out] => (dir, Some(out.as_path())),
        _ => {
            eprintln!("usage: convert_model DIR [OUT]");
            std::process::exit(2);
        }
    };
    match convert_model_dir(dir, out, true) {
        Ok(report) => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
        Err(err) => {
            eprintln!("error: {}", error::one_line(&err));
            std::process::exit(error::exit_status(&err));
        }
    }
}
