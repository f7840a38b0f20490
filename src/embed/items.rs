//! The items file (SPEC §2.4): JSON Lines, one object per item with a string or integer `id`.
//!
//! A first pass validates every line and keeps only what later passes need — each item's id and where its
//! line lies in the file — so a catalogue of tens of millions of items is never held in memory as text.
//! Texts are re-read a chunk at a time when they are tokenised.

use super::text::TextRecipe;
use crate::error::input;
use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A validated catalogue: ids in row order and the byte span of each item's line.
pub struct Catalogue {
    pub path: PathBuf,
    pub ids: Vec<String>,
    spans: Vec<(u64, u32)>,
    /// Lines refused under `--skip-invalid`, with the first reason seen (for the final report).
    pub skipped: usize,
    pub first_skip_reason: Option<String>,
}

/// Why a line cannot be an item; the caller turns it into an error or a skip.
fn parse_line(bytes: &[u8], recipe: &TextRecipe) -> Result<(String, Map<String, Value>), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("is not valid UTF-8 (byte {})", e.valid_up_to()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e})"))?;
    let Value::Object(record) = value else {
        return Err("is not a JSON object".to_string());
    };
    let id = match record.get("id") {
        Some(Value::String(s)) if s.is_empty() => return Err("has an empty \"id\"".to_string()),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => return Err(format!("has an \"id\" that is neither a string nor an integer ({other})")),
        None => return Err("has no \"id\"".to_string()),
    };
    if id.contains(['\n', '\r']) {
        return Err("has an \"id\" containing a line break".to_string());
    }
    if recipe.render(&record).trim().is_empty() {
        return Err(format!("(id {id:?}) has no text: no \"text\" field and no non-empty catalogue field"));
    }
    Ok((id, record))
}

impl Catalogue {
    /// Reads and validates the whole file. Bad lines are errors naming the line, or skipped and counted with
    /// `skip_invalid`; a duplicate id is always an error naming the first duplicate.
    pub fn scan(path: &Path, recipe: &TextRecipe, skip_invalid: bool) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| input(format!("{}: cannot open the items file ({e})", path.display())))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut catalogue = Catalogue {
            path: path.to_path_buf(),
            ids: Vec::new(),
            spans: Vec::new(),
            skipped: 0,
            first_skip_reason: None,
        };
        let mut line = Vec::new();
        let mut offset = 0u64;
        for number in 1.. {
            line.clear();
            let read =
                reader.read_until(b'\n', &mut line).with_context(|| format!("{}: read failed", path.display()))?;
            if read == 0 {
                break;
            }
            let start = offset;
            offset += read as u64;
            let content = trim_line_end(&line);
            if content.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_line(content, recipe) {
                Ok((id, _)) => {
                    catalogue.ids.push(id);
                    catalogue.spans.push((start, content.len() as u32));
                }
                Err(why) if skip_invalid => {
                    catalogue.skipped += 1;
                    catalogue.first_skip_reason.get_or_insert_with(|| format!("line {number} {why}"));
                }
                Err(why) => return Err(input(format!("{} line {number} {why}", path.display()))),
            }
        }
        catalogue.check_unique()?;
        Ok(catalogue)
    }

    fn check_unique(&self) -> Result<()> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.ids.len());
        for (row, id) in self.ids.iter().enumerate() {
            if let Some(first) = seen.insert(id, row) {
                return Err(input(format!(
                    "{}: duplicate id {id:?} (items {} and {} of the file)",
                    self.path.display(),
                    first + 1,
                    row + 1
                )));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The texts of the given rows (ascending), re-read from the file with one read per contiguous span.
    pub fn texts(&self, rows: &[usize], recipe: &TextRecipe) -> Result<Vec<String>> {
        let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
            return Ok(Vec::new());
        };
        let start = self.spans[first].0;
        let end = self.spans[last].0 + self.spans[last].1 as u64;
        let mut buf = vec![0u8; (end - start) as usize];
        let file = File::open(&self.path).with_context(|| format!("{}: cannot reopen", self.path.display()))?;
        file.read_exact_at(&mut buf, start)
            .with_context(|| format!("{}: changed while it was being embedded", self.path.display()))?;
        rows.iter()
            .map(|&row| {
                let (offset, len) = self.spans[row];
                let at = (offset - start) as usize;
                parse_line(&buf[at..at + len as usize], recipe).map(|(_, record)| recipe.render(&record)).map_err(
                    |why| {
                        input(format!(
                            "{}: item {} {why} (the file changed during the run)",
                            self.path.display(),
                            row + 1
                        ))
                    },
                )
            })
            .collect()
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_input_error;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn scan_err(bytes: &[u8]) -> String {
        let f = file_with(bytes);
        let err = Catalogue::scan(f.path(), &TextRecipe::Default, false).err().expect("must fail");
        assert!(is_input_error(&err));
        err.to_string()
    }

    #[test]
    fn valid_lines_keep_ids_and_texts_in_row_order() {
        let f = file_with(
            b"{\"id\": 3, \"title\": \"A\"}\r\n\n{\"id\": \"x\", \"text\": \"caf\xc3\xa9\"}\n{\"id\": -5, \"brand\": \"B\"}",
        );
        let c = Catalogue::scan(f.path(), &TextRecipe::Default, false).unwrap();
        assert_eq!(c.ids, ["3", "x", "-5"]);
        assert_eq!(c.texts(&[0, 2], &TextRecipe::Default).unwrap(), ["Title: A", "Brand: B"]);
        assert_eq!(c.texts(&[1], &TextRecipe::Default).unwrap(), ["café"]);
    }

    #[test]
    fn each_bad_line_names_its_line_number() {
        assert!(scan_err(b"{\"id\":1,\"title\":\"a\"}\nnot json\n").contains("line 2 is not valid JSON"));
        assert!(scan_err(b"{\"title\":\"a\"}\n").contains("line 1 has no \"id\""));
        assert!(scan_err(b"{\"id\":1.5,\"title\":\"a\"}\n").contains("neither a string nor an integer"));
        assert!(scan_err(b"{\"id\":1}\n").contains("line 1 (id \"1\") has no text"));
        assert!(scan_err(b"{\"id\":1,\"text\":\"   \"}\n").contains("has no text"));
        assert!(scan_err(b"[1,2]\n").contains("line 1 is not a JSON object"));
        // MovieLens's u.item is Latin-1: "Caf\xe9" is not UTF-8.
        assert!(
            scan_err(b"{\"id\":1,\"title\":\"a\"}\n{\"id\":2,\"title\":\"Caf\xe9\"}\n")
                .contains("line 2 is not valid UTF-8")
        );
        let dup =
            scan_err(b"{\"id\":1,\"title\":\"a\"}\n{\"id\":\"2\",\"title\":\"b\"}\n{\"id\":\"1\",\"title\":\"c\"}\n");
        assert!(dup.contains("duplicate id \"1\" (items 1 and 3"), "{dup}");
    }

    #[test]
    fn skip_invalid_counts_instead_of_failing() {
        let f = file_with(b"{\"id\":1,\"title\":\"a\"}\noops\n{\"id\":2}\n{\"id\":3,\"title\":\"c\"}\n");
        let c = Catalogue::scan(f.path(), &TextRecipe::Default, true).unwrap();
        assert_eq!(c.ids, ["1", "3"]);
        assert_eq!(c.skipped, 2);
        assert!(c.first_skip_reason.unwrap().starts_with("line 2"));
    }

    #[test]
    fn a_missing_file_is_an_input_error() {
        let err = Catalogue::scan(Path::new("/nonexistent/items.jsonl"), &TextRecipe::Default, false).err().unwrap();
        assert!(is_input_error(&err));
        assert!(err.to_string().contains("/nonexistent/items.jsonl"));
    }
}
