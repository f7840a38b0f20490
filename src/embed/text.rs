//! Item records → the text the LLM reads (SPEC §2.3).
//!
//! A record's `text` field is used verbatim. Otherwise the text is built from the catalogue fields in a
//! fixed order, one `Label: value` line each, leaving out missing or empty fields. `--template` replaces
//! that with a string of `{field}` placeholders (`{{` and `}}` are literal braces).

use crate::error::input;
use anyhow::Result;
use serde_json::{Map, Value};

/// The catalogue fields, in the order and with the labels the default text uses.
const FIELDS: [(&str, &str); 6] = [
    ("title", "Title"),
    ("category", "Category"),
    ("brand", "Brand"),
    ("price", "Price"),
    ("keywords", "Keywords"),
    ("attributes", "Attributes"),
];

/// How item text is made: the default layout, or a user template parsed once.
#[derive(Clone, Debug)]
pub enum TextRecipe {
    Default,
    Template(Vec<Piece>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Literal(String),
    Field(String),
}

impl TextRecipe {
    /// Parses `--template`; unbalanced braces are bad input.
    pub fn template(source: &str) -> Result<Self> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(input(format!("--template: placeholder {{{name}… is never closed")));
                    }
                    if name.is_empty() || name.contains('{') {
                        return Err(input(format!("--template: empty or nested placeholder in {source:?}")));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => return Err(input(format!("--template: a lone '}}' in {source:?} (write '}}}}' for a brace)"))),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(TextRecipe::Template(pieces))
    }

    /// The recipe as written in `meta.json`: `null` for the default layout.
    pub fn describe(&self, source: Option<&str>) -> Value {
        match (self, source) {
            (TextRecipe::Template(_), Some(s)) => Value::String(s.to_string()),
            _ => Value::Null,
        }
    }

    /// The text of one record (possibly empty: the caller decides whether that is an error).
    pub fn render(&self, record: &Map<String, Value>) -> String {
        match self {
            TextRecipe::Default => {
                if let Some(Value::String(text)) = record.get("text") {
                    return text.clone();
                }
                let mut lines = Vec::new();
                for (key, label) in FIELDS {
                    let value = record.get(key).map(field_text).unwrap_or_default();
                    if !value.is_empty() {
                        lines.push(format!("{label}: {value}"));
                    }
                }
                lines.join("\n")
            }
            TextRecipe::Template(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Literal(s) => out.push_str(s),
                        Piece::Field(name) => out.push_str(&record.get(name).map(field_text).unwrap_or_default()),
                    }
                }
                out
            }
        }
    }
}

/// One field as text: strings verbatim, numbers as JSON writes them, lists joined by ", ", objects as
/// `key: value` pairs joined by ", ", null and booleans false as empty.
pub fn field_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        Value::Array(items) => items.iter().map(field_text).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(", "),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k, field_text(v)))
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn default_layout_orders_fields_and_skips_empty_ones() {
        let r = record(json!({
            "id": 7, "brand": "Acme", "title": "Kettle", "price": 19.5, "category": "",
            "keywords": ["tea", "", "steel"], "attributes": {"colour": "red", "size": ""}, "extra": "ignored"
        }));
        assert_eq!(
            TextRecipe::Default.render(&r),
            "Title: Kettle\nBrand: Acme\nPrice: 19.5\nKeywords: tea, steel\nAttributes: colour: red"
        );
    }

    #[test]
    fn text_field_wins_verbatim() {
        let r = record(json!({"id": "a", "text": "  raw 文本 🙂 ", "title": "ignored"}));
        assert_eq!(TextRecipe::Default.render(&r), "  raw 文本 🙂 ");
    }

    #[test]
    fn no_fields_gives_empty_text() {
        assert_eq!(TextRecipe::Default.render(&record(json!({"id": 1, "keywords": []}))), "");
    }

    #[test]
    fn templates_fill_placeholders_and_escape_braces() {
        let t = TextRecipe::template("{title} by {brand} {{x}} ({missing})").unwrap();
        let r = record(json!({"title": "Kettle", "brand": "Acme"}));
        assert_eq!(t.render(&r), "Kettle by Acme {x} ()");
    }

    #[test]
    fn broken_templates_are_input_errors() {
        for bad in ["{title", "title}", "{}", "{a{b}}"] {
            let err = TextRecipe::template(bad).unwrap_err();
            assert!(crate::error::is_input_error(&err), "{bad}: {err}");
        }
    }
}
