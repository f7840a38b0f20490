//! Interactions tables (CSV/TSV with user, item and timestamp columns) → the sequences files of §4.1.
//!
//! Two splits: by a time cutoff (the LEARN paper's: history before the cutoff, targets from it on), or by
//! each user's last fraction of interactions. A seeded fraction of users is held out as test users.

use crate::error::input;
use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

/// A column given by 0-based index or, with a header line, by name.
#[derive(Clone, Debug)]
pub enum Column {
    Index(usize),
    Name(String),
}

impl Column {
    pub fn parse(text: &str) -> Column {
        match text.parse() {
            Ok(i) => Column::Index(i),
            Err(_) => Column::Name(text.to_string()),
        }
    }

    fn resolve(&self, header: Option<&[&str]>, path: &Path) -> Result<usize> {
        match (self, header) {
            (Column::Index(i), _) => Ok(*i),
            (Column::Name(name), Some(fields)) => fields
                .iter()
                .position(|f| f.trim() == name)
                .ok_or_else(|| input(format!("{}: no column named {name:?} in the header {fields:?}", path.display()))),
            (Column::Name(name), None) => {
                Err(input(format!("column {name:?} is a name, but --no-header says the table has no header line")))
            }
        }
    }
}

/// How to read the table.
#[derive(Clone, Debug)]
pub struct TableFormat {
    /// Field separator; `None` detects tab or comma from the first line.
    pub separator: Option<char>,
    pub header: bool,
    pub user: Column,
    pub item: Column,
    pub time: Column,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Interaction {
    pub user: String,
    pub item: String,
    pub time: f64,
}

/// Reads every interaction, in file order.
pub fn read_table(path: &Path, format: &TableFormat) -> Result<Vec<Interaction>> {
    let file = std::fs::File::open(path)
        .map_err(|e| input(format!("{}: cannot open the interactions table ({e})", path.display())))?;
    let lines = BufReader::new(file).lines().enumerate();
    let mut out = Vec::new();
    let mut columns: Option<(char, [usize; 3])> = None;
    let resolve = |sep: char, header: Option<&str>| -> Result<(char, [usize; 3])> {
        let fields: Option<Vec<&str>> = header.map(|h| h.split(sep).collect());
        let cols = [&format.user, &format.item, &format.time].map(|c| c.resolve(fields.as_deref(), path));
        let [u, i, t] = cols;
        Ok((sep, [u?, i?, t?]))
    };
    for (index, line) in lines {
        let number = index + 1;
        let line = line.map_err(|_| input(format!("{} line {number}: is not valid UTF-8", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let (sep, [u, i, t]) = match columns {
            Some(c) => c,
            None => {
                let sep = format.separator.unwrap_or(if line.contains('\t') { '\t' } else { ',' });
                let resolved = resolve(sep, format.header.then_some(line.as_str()))?;
                columns = Some(resolved);
                if format.header {
                    continue;
                }
                resolved
            }
        };
        let fields: Vec<&str> = line.split(sep).map(str::trim).collect();
        let get = |c: usize, what: &str| -> Result<&str> {
            fields.get(c).copied().filter(|f| !f.is_empty()).ok_or_else(|| {
                input(format!("{} line {number}: no {what} in column {c} ({} fields)", path.display(), fields.len()))
            })
        };
        let time_text = get(t, "timestamp")?;
        let time: f64 = time_text
            .parse()
            .map_err(|_| input(format!("{} line {number}: timestamp {time_text:?} is not a number", path.display())))?;
        out.push(Interaction { user: get(u, "user")?.to_string(), item: get(i, "item")?.to_string(), time });
    }
    Ok(out)
}

/// How interactions become history and targets.
#[derive(Clone, Copy, Debug)]
pub enum Split {
    /// History before `cutoff`, targets at or after it.
    Time { cutoff: f64 },
    /// Each user's last `fraction` of interactions (at least one, leaving at least one) are targets.
    LastFraction { fraction: f64 },
}

/// One line of a sequences file.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceRecord {
    pub user: String,
    pub history: Vec<String>,
    pub targets: Vec<String>,
}

/// The split and what it left out.
#[derive(Debug, Default)]
pub struct SplitResult {
    pub train: Vec<SequenceRecord>,
    pub test: Vec<SequenceRecord>,
    /// Users left out because one side of the split was empty.
    pub dropped_users: usize,
}

/// Splits each user's interactions (ordered by time, ties in file order) and holds out a seeded
/// `test_fraction` of the users.
pub fn split(interactions: &[Interaction], how: Split, test_fraction: f64, seed: u64) -> Result<SplitResult> {
    if !(0.0..=1.0).contains(&test_fraction) {
        return Err(input(format!("--test-users {test_fraction}: expected a fraction in [0, 1]")));
    }
    if let Split::LastFraction { fraction } = how
        && !(fraction > 0.0 && fraction < 1.0)
    {
        return Err(input(format!("--fraction {fraction}: expected a fraction in (0, 1)")));
    }
    let mut order: Vec<&str> = Vec::new();
    let mut by_user: HashMap<&str, Vec<&Interaction>> = HashMap::new();
    for row in interactions {
        by_user
            .entry(&row.user)
            .or_insert_with(|| {
                order.push(&row.user);
                Vec::new()
            })
            .push(row);
    }
    let mut records = Vec::new();
    let mut dropped = 0;
    for user in &order {
        let rows = by_user.get_mut(user).map(std::mem::take).unwrap_or_default();
        let mut rows = rows;
        rows.sort_by(|a, b| a.time.total_cmp(&b.time)); // stable: ties keep file order
        let cut = match how {
            Split::Time { cutoff } => rows.partition_point(|r| r.time < cutoff),
            Split::LastFraction { fraction } => {
                let n = rows.len();
                let targets = ((fraction * n as f64).round() as usize).clamp(1, n.saturating_sub(1).max(1));
                n - targets
            }
        };
        if cut == 0 || cut == rows.len() {
            dropped += 1;
            continue;
        }
        let ids = |part: &[&Interaction]| part.iter().map(|r| r.item.clone()).collect::<Vec<_>>();
        records.push(SequenceRecord { user: user.to_string(), history: ids(&rows[..cut]), targets: ids(&rows[cut..]) });
    }
    let mut picks: Vec<usize> = (0..records.len()).collect();
    picks.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test_count = (test_fraction * records.len() as f64).round() as usize;
    let mut is_test = vec![false; records.len()];
    for &i in &picks[..test_count] {
        is_test[i] = true;
    }
    let mut result = SplitResult { dropped_users: dropped, ..Default::default() };
    for (record, test) in records.into_iter().zip(is_test) {
        if test { result.test.push(record) } else { result.train.push(record) }
    }
    Ok(result)
}

/// Writes records as a sequences file, atomically.
pub fn write_sequences(path: &Path, records: &[SequenceRecord]) -> Result<()> {
    let mut text = Vec::new();
    for r in records {
        writeln!(text, "{}", json!({"user": r.user, "history": r.history, "targets": r.targets}))
            .context("cannot format a sequence")?;
    }
    crate::fsutil::write_atomic(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str, format: &TableFormat) -> Result<Vec<Interaction>> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        read_table(f.path(), format)
    }

    fn movielens() -> TableFormat {
        TableFormat {
            separator: None,
            header: false,
            user: Column::Index(0),
            item: Column::Index(1),
            time: Column::Index(3),
        }
    }

    #[test]
    fn tables_read_by_index_or_header_name() {
        let rows = table("1\t10\t5\t300\n1\t11\t3\t100\n", &movielens()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].user.as_str(), rows[1].item.as_str(), rows[1].time), ("1", "11", 100.0));
        let named = TableFormat {
            separator: None,
            header: true,
            user: Column::parse("uid"),
            item: Column::parse("item"),
            time: Column::parse("ts"),
        };
        let rows = table("ts,item,uid\n5,a,u\n", &named).unwrap();
        assert_eq!((rows[0].user.as_str(), rows[0].item.as_str(), rows[0].time), ("u", "a", 5.0));
        let err = table("ts,item\n5,a\n", &named).unwrap_err();
        assert!(err.to_string().contains("no column named \"uid\""), "{err}");
        let err = table("1\t10\t5\tyesterday\n", &movielens()).unwrap_err();
        assert!(err.to_string().contains("line 1: timestamp \"yesterday\""), "{err}");
        let err = table("1\t10\n", &movielens()).unwrap_err();
        assert!(err.to_string().contains("line 1: no timestamp in column 3"), "{err}");
    }

    fn rows(spec: &[(&str, &str, f64)]) -> Vec<Interaction> {
        spec.iter().map(|&(u, i, t)| Interaction { user: u.into(), item: i.into(), time: t }).collect()
    }

    #[test]
    fn time_split_puts_history_before_the_cutoff() {
        let data = rows(&[
            ("a", "x", 5.0),
            ("a", "y", 1.0),
            ("a", "z", 9.0),
            ("b", "x", 8.0),
            ("c", "q", 1.0),
            ("c", "r", 7.0),
        ]);
        let r = split(&data, Split::Time { cutoff: 6.0 }, 0.0, 0).unwrap();
        assert_eq!(r.dropped_users, 1, "b has no history before the cutoff");
        assert_eq!(
            r.train,
            vec![
                SequenceRecord { user: "a".into(), history: vec!["y".into(), "x".into()], targets: vec!["z".into()] },
                SequenceRecord { user: "c".into(), history: vec!["q".into()], targets: vec!["r".into()] },
            ]
        );
    }

    #[test]
    fn fraction_split_keeps_both_sides_and_test_users_are_seeded() {
        let mut data = Vec::new();
        for u in 0..50 {
            for i in 0..10 {
                data.push(Interaction { user: format!("u{u}"), item: format!("i{i}"), time: (10 - i) as f64 });
            }
        }
        data.push(Interaction { user: "lonely".into(), item: "i0".into(), time: 0.0 });
        let r = split(&data, Split::LastFraction { fraction: 0.2 }, 0.1, 3).unwrap();
        assert_eq!(r.dropped_users, 1);
        assert_eq!((r.train.len(), r.test.len()), (45, 5));
        let first = &r.train[0];
        assert_eq!(first.history.len(), 8);
        assert_eq!(first.targets, vec!["i1".to_string(), "i0".to_string()], "latest interactions are the targets");
        let again = split(&data, Split::LastFraction { fraction: 0.2 }, 0.1, 3).unwrap();
        assert_eq!(r.test, again.test);
        let other = split(&data, Split::LastFraction { fraction: 0.2 }, 0.1, 4).unwrap();
        assert_ne!(r.test, other.test);
        assert!(split(&data, Split::LastFraction { fraction: 1.0 }, 0.1, 3).is_err());
    }
}
