//! `learn-kern sequences`: an interactions table (CSV/TSV of user, item, timestamp) → the train and test
//! sequences files of SPEC §4.1.

use crate::cli::Common;
use crate::data::interactions::{Column, Split, TableFormat, read_table, split, write_sequences};
use crate::error::input;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SequencesArgs {
    /// Interactions table: one interaction per line (CSV or TSV).
    #[arg(long)]
    pub interactions: PathBuf,
    /// Field separator (default: tab if the first line has one, else comma).
    #[arg(long)]
    pub sep: Option<char>,
    /// The first line is a header; columns may then be given by name.
    #[arg(long)]
    pub header: bool,
    /// User column (0-based index, or a name with --header).
    #[arg(long, default_value = "0")]
    pub user_col: String,
    /// Item column.
    #[arg(long, default_value = "1")]
    pub item_col: String,
    /// Timestamp column (numeric). MovieLens u.data: 3.
    #[arg(long, default_value = "2")]
    pub time_col: String,
    /// History before this timestamp, targets from it on (the LEARN paper's split).
    #[arg(long, conflicts_with = "target_fraction")]
    pub cutoff: Option<f64>,
    /// Each user's last fraction of interactions are targets (default 0.2 when no --cutoff).
    #[arg(long)]
    pub target_fraction: Option<f64>,
    /// Fraction of users held out as test users.
    #[arg(long, default_value_t = 0.1)]
    pub test_users: f64,
    /// Seed of the test-user draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output sequences file of the training users.
    #[arg(long)]
    pub train_out: PathBuf,
    /// Output sequences file of the test users.
    #[arg(long)]
    pub test_out: PathBuf,
}

pub fn run(args: &SequencesArgs, common: &Common) -> Result<()> {
    let format = TableFormat {
        separator: args.sep,
        header: args.header,
        user: Column::parse(&args.user_col),
        item: Column::parse(&args.item_col),
        time: Column::parse(&args.time_col),
    };
    let how = match (args.cutoff, args.target_fraction) {
        (Some(cutoff), _) => Split::Time { cutoff },
        (None, fraction) => Split::LastFraction { fraction: fraction.unwrap_or(0.2) },
    };
    let rows = read_table(&args.interactions, &format)?;
    if rows.is_empty() {
        return Err(input(format!("{}: holds no interactions", args.interactions.display())));
    }
    let result = split(&rows, how, args.test_users, args.seed)?;
    write_sequences(&args.train_out, &result.train)?;
    write_sequences(&args.test_out, &result.test)?;
    common.notice(format!(
        "{} interactions → {} train users, {} test users ({} users left out: one side of the split was empty)",
        rows.len(),
        result.train.len(),
        result.test.len(),
        result.dropped_users
    ));
    common.write_json(&json!({
        "interactions": rows.len(),
        "train_users": result.train.len(),
        "test_users": result.test.len(),
        "dropped_users": result.dropped_users,
    }))
}
