//! `learn-kern demo`: the embedded default job, no arguments and no downloads. It makes a tiny random
//! Baichuan2-layout model and a generated catalogue, embeds the catalogue, shows item → neighbour examples
//! (the LEARN paper's Fig. 2), then trains a small PCH model on generated users and evaluates it on held-out
//! users beside the most-popular baseline.

use super::embed::{self, EmbedArgs};
use super::eval::{self, EvalArgs};
use super::neighbors::nearest;
use super::train::{self, TrainArgs};
use crate::cli::Common;
use crate::data::interactions::write_sequences;
use crate::demo::catalogue;
use crate::embed::store::ContentStore;
use crate::init_model::{init_model, weights::InitDtype};
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Working directory for the model, catalogue and stores (default: a new folder in the temp directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Catalogue size.
    #[arg(long, default_value_t = 3000)]
    pub items: usize,
    /// Generated users (a tenth are held out for evaluation).
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Training updates of the preference model.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Seed of the model weights and the generated data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &DemoArgs, common: &Common) -> Result<()> {
    let workdir = match &args.workdir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("learn-kern-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&workdir).with_context(|| format!("{}: cannot create", workdir.display()))?;
    println!("learn-kern demo — working in {}", workdir.display());

    let model = workdir.join("model");
    let report = init_model(&model, "tiny", args.seed, InitDtype::F32, true)?;
    println!(
        "1. model: random Baichuan2-layout weights, {} layers × D {} (tokenizer of {} ids)",
        report.config.num_hidden_layers, report.config.hidden_size, report.tokenizer_vocab
    );

    let items = catalogue::generate(args.items, args.seed);
    let items_path = workdir.join("items.jsonl");
    write_items(&items_path, &items)?;
    println!("2. catalogue: {} generated products → {}", items.len(), items_path.display());

    let content = workdir.join("content");
    println!("3. embed (mean-pooled last hidden state, L2-normalised):");
    embed::run(
        &EmbedArgs {
            model: Some(model.clone()),
            items: Some(items_path.clone()),
            out: content.clone(),
            dtype: "f16".into(),
            max_tokens: 500,
            batch_tokens: 8192,
            sort_window: 65536,
            template: None,
            skip_invalid: false,
            shard: None,
            merge: Vec::new(),
            overwrite: true,
        },
        common,
    )?;

    let store = ContentStore::open(&content)?;
    println!("4. nearest items by content (cosine):");
    let title = |row: usize| items[row].record["title"].as_str().unwrap_or("?").to_string();
    for row in [0, items.len() / 3, 2 * items.len() / 3].into_iter().filter(|&r| r < items.len()) {
        println!("   {}  [{}]", title(row), items[row].record["category"].as_str().unwrap_or("?"));
        for hit in nearest(&store, row, 3) {
            println!(
                "      {:.3}  {}  [{}]",
                hit.score,
                title(hit.row),
                items[hit.row].record["category"].as_str().unwrap_or("?")
            );
        }
    }

    let users = crate::demo::users::generate(&items, args.users, args.seed);
    let (test, train) = users.split_at((users.len() / 10).max(1));
    let (train_path, test_path) = (workdir.join("train.jsonl"), workdir.join("test.jsonl"));
    write_sequences(&train_path, train)?;
    write_sequences(&test_path, test)?;
    println!(
        "5. users: {} generated with category and brand tastes ({} train, {} held out)",
        users.len(),
        train.len(),
        test.len()
    );

    let run_dir = workdir.join("run");
    println!("6. train the preference model (dense all-action InfoNCE, {} updates):", args.steps);
    let (steps, seed) = (args.steps.to_string(), args.seed.to_string());
    let train_args: TrainArgs = parse_args(&[
        "--content",
        &show(&content),
        "--sequences",
        &show(&train_path),
        "--out",
        &show(&run_dir),
        "--preset",
        "pch-tiny",
        "--batch-users",
        "32",
        "--steps",
        &steps,
        "--lr",
        "1e-3",
        "--seed",
        &seed,
        "--overwrite",
    ])?;
    train::run(&train_args, common)?;

    println!("7. evaluate on the held-out users (gallery: every item, their history items excluded):");
    let eval_args: EvalArgs = parse_args(&[
        "--checkpoint",
        &show(&run_dir.join("checkpoint.safetensors")),
        "--content",
        &show(&content),
        "--sequences",
        &show(&test_path),
        "--k",
        "10,50",
        "--baseline",
        "popular",
        "--popularity-from",
        &show(&train_path),
    ])?;
    eval::run(&eval_args, common)
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// A subcommand's flags parsed as its command line would parse them, so the demo gets every default.
fn parse_args<A: clap::Args + clap::FromArgMatches>(argv: &[&str]) -> Result<A> {
    let command = A::augment_args(clap::Command::new("demo-step"));
    let matches = command.try_get_matches_from(std::iter::once("demo-step").chain(argv.iter().copied()))?;
    Ok(A::from_arg_matches(&matches)?)
}

fn write_items(path: &Path, items: &[catalogue::GeneratedItem]) -> Result<()> {
    let mut text = Vec::new();
    for item in items {
        writeln!(text, "{}", item.record)?;
    }
    crate::fsutil::write_atomic(path, &text)
}
