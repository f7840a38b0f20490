//! Flags shared by every subcommand (SPEC §1) and the process set-up they imply.

use crate::error::input;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Where to compute: auto (the GPU when one is usable, else the CPU), cpu, cuda, cuda:N or cuda:N,M,…
    #[arg(long, global = true, default_value = "auto")]
    pub device: String,

    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// No progress bars or notices on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,

    /// Machine-readable figures: to FILE, or to stdout when no FILE is given.
    #[arg(long, global = true, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
}

impl Common {
    /// Sizes the global rayon pool; call once before any parallel work.
    pub fn init_threads(&self) -> Result<()> {
        let mut builder = rayon::ThreadPoolBuilder::new();
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(input("--threads must be at least 1"));
            }
            builder = builder.num_threads(n);
        }
        // A second call (tests running several commands in one process) keeps the first pool.
        let _ = builder.build_global();
        Ok(())
    }

    /// Prints a one-line notice on stderr unless `--quiet`.
    pub fn notice(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Writes a JSON report where `--json` asked for one (stdout for a bare `--json`).
    pub fn write_json(&self, value: &serde_json::Value) -> Result<()> {
        match &self.json {
            None => Ok(()),
            Some(p) if p.as_os_str() == "-" => {
                println!("{}", serde_json::to_string_pretty(value)?);
                Ok(())
            }
            Some(p) => crate::fsutil::write_atomic(p, serde_json::to_string_pretty(value)?.as_bytes()),
        }
    }
}
