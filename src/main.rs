//! The `learn-kern` command line (SPEC §1): one binary, one subcommand per job.

use clap::{Parser, Subcommand};
use learn_kern::cli::Common;
use learn_kern::commands::{
    bench, convert, demo, embed, eval, infer, init_model, neighbors, sequences, tokenizer, train,
};
use learn_kern::error;

#[derive(Parser)]
#[command(
    name = "learn-kern",
    version,
    about = "LEARN content embeddings and preference model: CPU reference and CUDA engine"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded default: init-model → embed → neighbours on a generated catalogue.
    Demo(demo::DemoArgs),
    /// Write a random-weight model in the Baichuan2 layout, with a tokenizer.
    InitModel(init_model::InitModelArgs),
    /// Item text → content embeddings store (CEG).
    Embed(embed::EmbedArgs),
    /// Exact cosine nearest items of a store.
    Neighbors(neighbors::NeighborsArgs),
    /// PyTorch .bin checkpoints → safetensors.
    Convert(convert::ConvertArgs),
    /// Train the PCH model (user and item towers) with the dense all-action InfoNCE loss.
    Train(Box<train::TrainArgs>),
    /// Retrieval metrics (H@K, R@K, N@K) of a checkpoint, beside a most-popular baseline.
    Eval(eval::EvalArgs),
    /// Write user or item embeddings of a checkpoint for serving.
    Infer(infer::InferArgs),
    /// Interactions table → train/test sequences files.
    Sequences(sequences::SequencesArgs),
    /// Tokenizer tools (export a SentencePiece tokenizer.model as tokenizer.json).
    Tokenizer(tokenizer::TokenizerArgs),
    /// Throughput benchmarks of the CUDA engine (embed, train, kernels).
    Bench(bench::BenchArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    common.init_threads()?;
    match &cli.command {
        Command::Demo(args) => demo::run(args, common),
        Command::InitModel(args) => init_model::run(args, common),
        Command::Embed(args) => embed::run(args, common),
        Command::Neighbors(args) => neighbors::run(args, common),
        Command::Convert(args) => convert::run(args, common),
        Command::Train(args) => train::run(args, common),
        Command::Eval(args) => eval::run(args, common),
        Command::Infer(args) => infer::run(args, common),
        Command::Sequences(args) => sequences::run(args, common),
        Command::Tokenizer(args) => tokenizer::run(args, common),
        Command::Bench(args) => bench::run(args, common),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("error: {}", error::one_line(&err));
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            eprintln!("{}", err.backtrace());
        }
        std::process::exit(error::exit_status(&err));
    }
}
