//! Sequences files (SPEC §4.1): JSON Lines, one user per line,
//! `{"user": "u1", "history": [item ids…], "targets": [item ids…]}`, oldest first.
//!
//! Ids are resolved to rows of the content store once, here. Full lists are kept: training truncates them
//! (last H of the history, first T targets) when it batches, evaluation needs them whole.

use crate::error::input;
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One user, with item ids resolved to store rows.
#[derive(Clone, Debug, PartialEq)]
pub struct UserSequence {
    pub user: String,
    /// 1-based line in the file, for messages.
    pub line: usize,
    pub history: Vec<u32>,
    pub targets: Vec<u32>,
}

/// A loaded sequences file and what was left out of it.
#[derive(Debug, Default)]
pub struct Sequences {
    pub users: Vec<UserSequence>,
    /// Users skipped because their history or targets were empty (after dropping unknown ids).
    pub skipped_users: usize,
    /// Item ids dropped because the store does not have them (`--skip-unknown`).
    pub dropped_ids: usize,
}

fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Reads `path`, resolving ids with `row_of`. An unknown id is an error naming it and the line, unless
/// `skip_unknown` (then it is dropped and counted).
pub fn load(path: &Path, row_of: impl Fn(&str) -> Option<usize>, skip_unknown: bool) -> Result<Sequences> {
    let file = std::fs::File::open(path)
        .map_err(|e| input(format!("{}: cannot open the sequences file ({e})", path.display())))?;
    let mut out = Sequences::default();
    for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
        let number = index + 1;
        let bytes = line.with_context(|| format!("{}: read failed", path.display()))?;
        let at = |why: String| input(format!("{} line {number}: {why}", path.display()));
        let text = std::str::from_utf8(&bytes).map_err(|_| at("is not valid UTF-8".into()))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| at(format!("is not valid JSON ({e})")))?;
        let user = value.get("user").and_then(id_text).ok_or_else(|| at("has no \"user\" string or integer".into()))?;
        let mut lists = [Vec::new(), Vec::new()];
        for (key, list) in ["history", "targets"].iter().zip(lists.iter_mut()) {
            let items =
                value.get(*key).and_then(Value::as_array).ok_or_else(|| at(format!("has no \"{key}\" list")))?;
            for item in items {
                let id = id_text(item).ok_or_else(|| at(format!("\"{key}\" holds {item}, not an item id")))?;
                match row_of(&id) {
                    Some(row) => list.push(row as u32),
                    None if skip_unknown => out.dropped_ids += 1,
                    None => {
                        return Err(at(format!(
                            "item {id:?} (in \"{key}\" of user {user:?}) is not in the content store; \
                             pass --skip-unknown to drop such items"
                        )));
                    }
                }
            }
        }
        let [history, targets] = lists;
        if history.is_empty() || targets.is_empty() {
            out.skipped_users += 1;
            continue;
        }
        out.users.push(UserSequence { user, line: number, history, targets });
    }
    Ok(out)
}

impl UserSequence {
    /// The last `h` history rows (the model's input).
    pub fn recent_history(&self, h: usize) -> &[u32] {
        &self.history[self.history.len().saturating_sub(h)..]
    }

    /// The first `t` target rows (the loss's positives).
    pub fn first_targets(&self, t: usize) -> &[u32] {
        &self.targets[..self.targets.len().min(t)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;

    fn rows(id: &str) -> Option<usize> {
        id.strip_prefix('i').and_then(|n| n.parse().ok())
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn users_resolve_to_rows_and_empty_ones_are_counted() {
        let f = write(concat!(
            "{\"user\": \"u1\", \"history\": [\"i3\", \"i1\", \"i4\"], \"targets\": [\"i5\"]}\n",
            "\n",
            "{\"user\": 7, \"history\": [], \"targets\": [\"i2\"]}\n",
            "{\"user\": \"u3\", \"history\": [\"i9\"], \"targets\": [\"i2\", \"i6\"], \"extra\": 1}\n",
        ));
        let s = load(f.path(), rows, false).unwrap();
        assert_eq!(s.users.len(), 2);
        assert_eq!(s.skipped_users, 1);
        assert_eq!(s.users[0], UserSequence { user: "u1".into(), line: 1, history: vec![3, 1, 4], targets: vec![5] });
        assert_eq!(s.users[1].line, 4);
        assert_eq!(s.users[0].recent_history(2), &[1, 4]);
        assert_eq!(s.users[1].first_targets(1), &[2]);
    }

    #[test]
    fn unknown_ids_are_errors_naming_the_line_or_dropped() {
        let f = write(
            "{\"user\": \"u1\", \"history\": [\"i1\", \"x\"], \"targets\": [\"i2\"]}\n{\"user\": \"u2\", \"history\": [\"x\"], \"targets\": [\"i2\"]}\n",
        );
        let err = load(f.path(), rows, false).unwrap_err();
        assert!(is_input_error(&err));
        assert!(err.to_string().contains("line 1: item \"x\""), "{err}");
        let s = load(f.path(), rows, true).unwrap();
        assert_eq!((s.users.len(), s.dropped_ids, s.skipped_users), (1, 2, 1));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        for (text, want) in [
            ("{\"user\": \"u\", \"history\": [\"i1\"]}\n", "line 1: has no \"targets\" list"),
            ("nope\n", "line 1: is not valid JSON"),
            ("{\"history\": [], \"targets\": []}\n", "no \"user\""),
            ("{\"user\": \"u\", \"history\": [1.5], \"targets\": [\"i1\"]}\n", "not an item id"),
        ] {
            let f = write(text);
            let err = load(f.path(), rows, false).unwrap_err();
            assert!(is_input_error(&err) && err.to_string().contains(want), "{err}");
        }
    }
}
