//! learn-kern: the LEARN framework (LLM-driven knowledge adaptive recommendation) as a Rust engine with a
//! CPU reference path and hand-written CUDA kernels. `SPEC.md` is the contract.

pub mod cli;
pub mod commands;
pub mod convert;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod demo;
pub mod device;
pub mod embed;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod init_model;
pub mod llm;
pub mod npy;
pub mod pch;
pub mod sentencepiece;
pub mod tokenizer;
pub mod train;
