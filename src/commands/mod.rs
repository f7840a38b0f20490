//! One module per subcommand: its flags (clap derive) and the glue from flags to the library.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod infer;
pub mod init_model;
pub mod neighbors;
pub mod sequences;
pub mod tokenizer;
pub mod train;
