//! SentencePiece's normaliser for models without a precompiled normalisation map, and the longest-match
//! scanner for user-defined symbols that both the normaliser and the BPE encoder use.
//!
//! With the identity map, normalisation only touches ASCII spaces: it can drop leading, trailing and repeated
//! spaces (`remove_extra_whitespaces`), add one space before the text (`add_dummy_prefix`; after the text when
//! the trainer treated whitespace as a suffix), and write every space as U+2581 (`escape_whitespaces`). The
//! text is walked in the same steps as SentencePiece walks it: one user-defined symbol (longest match) or one
//! character at a time, which matters for where repeated spaces are cut.

/// U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's visible space.
pub const SPACE_SYMBOL: &str = "\u{2581}";

/// Longest-prefix matcher over the user-defined symbols: a byte trie with sorted edges.
#[derive(Clone, Debug)]
pub struct PrefixMatcher {
    /// Per node: its edges (byte, child) sorted by byte, and whether a symbol ends here.
    edges: Vec<Vec<(u8, u32)>>,
    terminal: Vec<bool>,
    /// Bytes that start some symbol: a cheap test before walking the trie.
    first: [bool; 256],
}

impl Default for PrefixMatcher {
    fn default() -> Self {
        Self::new([])
    }
}

impl PrefixMatcher {
    pub fn new<'a>(symbols: impl IntoIterator<Item = &'a str>) -> Self {
        let mut m = Self { edges: vec![Vec::new()], terminal: vec![false], first: [false; 256] };
        for symbol in symbols {
            let bytes = symbol.as_bytes();
            let Some(&b0) = bytes.first() else { continue };
            m.first[b0 as usize] = true;
            let mut node = 0usize;
            for &b in bytes {
                node = match m.edges[node].binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => m.edges[node][i].1 as usize,
                    Err(i) => {
                        let child = m.edges.len();
                        m.edges[node].insert(i, (b, child as u32));
                        m.edges.push(Vec::new());
                        m.terminal.push(false);
                        child
                    }
                };
            }
            m.terminal[node] = true;
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.edges[0].is_empty()
    }

    /// Byte length of the longest symbol that `text` starts with.
    pub fn longest(&self, text: &[u8]) -> Option<usize> {
        if !self.first[*text.first()? as usize] {
            return None;
        }
        let (mut node, mut best) = (0usize, None);
        for (i, &b) in text.iter().enumerate() {
            match self.edges[node].binary_search_by_key(&b, |e| e.0) {
                Ok(k) => node = self.edges[node][k].1 as usize,
                Err(_) => break,
            }
            if self.terminal[node] {
                best = Some(i + 1);
            }
        }
        best
    }

    /// The next step of the walk: (byte length, whether it is a user-defined symbol). Symbols are whole
    /// UTF-8 strings, so a match always ends on a character boundary.
    pub fn step(&self, text: &str) -> (usize, bool) {
        match self.longest(text.as_bytes()) {
            Some(n) => (n, true),
            None => (text.chars().next().map_or(0, char::len_utf8), false),
        }
    }
}

/// The whitespace handling of an identity `NormalizerSpec` (plus the trainer's suffix flag).
#[derive(Clone, Copy, Debug)]
pub struct Normalizer {
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
    pub treat_whitespace_as_suffix: bool,
}

impl Normalizer {
    /// The space as it appears in normalised text.
    pub fn space(&self) -> &'static str {
        if self.escape_whitespaces { SPACE_SYMBOL } else { " " }
    }

    fn push_escaped(&self, out: &mut String, text: &str) {
        if self.escape_whitespaces {
            let mut rest = text;
            while let Some(i) = rest.find(' ') {
                out.push_str(&rest[..i]);
                out.push_str(SPACE_SYMBOL);
                rest = &rest[i + 1..];
            }
            out.push_str(rest);
        } else {
            out.push_str(text);
        }
    }

    /// Writes the normalised form of `input` to `out` (cleared first).
    pub fn normalize(&self, input: &str, matcher: &PrefixMatcher, out: &mut String) {
        out.clear();
        let mut rest = input;
        if self.remove_extra_whitespaces {
            // Leading spaces go, one step at a time; a user-defined symbol is a step even if it is spaces.
            loop {
                let (n, _) = matcher.step(rest);
                if n == 0 || &rest[..n] != " " {
                    break;
                }
                rest = &rest[n..];
            }
        }
        if rest.is_empty() {
            return;
        }
        out.reserve(rest.len() + rest.len() / 2 + 4);
        let dummy = self.add_dummy_prefix;
        if dummy && !self.treat_whitespace_as_suffix {
            out.push_str(self.space());
        }
        if self.remove_extra_whitespaces {
            // A step that follows one ending in a space loses its leading spaces.
            let mut prev_space = true;
            while !rest.is_empty() {
                let (n, _) = matcher.step(rest);
                let mut piece = &rest[..n];
                if prev_space {
                    piece = piece.trim_start_matches(' ');
                }
                if !piece.is_empty() {
                    self.push_escaped(out, piece);
                    prev_space = piece.ends_with(' ');
                }
                rest = &rest[n..];
            }
            let space = self.space();
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        } else {
            // Without whitespace removal the walk changes nothing: every space is escaped where it stands.
            self.push_escaped(out, rest);
        }
        if dummy && self.treat_whitespace_as_suffix {
            out.push_str(self.space());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(add_dummy_prefix: bool, remove_extra_whitespaces: bool, escape: bool, suffix: bool) -> Normalizer {
        Normalizer {
            add_dummy_prefix,
            remove_extra_whitespaces,
            escape_whitespaces: escape,
            treat_whitespace_as_suffix: suffix,
        }
    }

    fn run(n: Normalizer, m: &PrefixMatcher, s: &str) -> String {
        let mut out = String::from("poison");
        n.normalize(s, m, &mut out);
        out
    }

    #[test]
    fn matcher_takes_the_longest_symbol() {
        let m = PrefixMatcher::new(["<a>", "<a>b", "中文"]);
        assert_eq!(m.longest(b"<a>bc"), Some(4));
        assert_eq!(m.longest(b"<a>c"), Some(3));
        assert_eq!(m.longest(b"<a"), None);
        assert_eq!(m.longest("中文字".as_bytes()), Some(6));
        assert_eq!(m.step("xyz"), (1, false));
        assert_eq!(m.step("字x"), (3, false));
        assert_eq!(m.step(""), (0, false));
        assert!(PrefixMatcher::new([]).is_empty());
    }

    #[test]
    fn whitespace_handling_follows_the_flags() {
        let m = PrefixMatcher::default();
        // Baichuan2: spaces escaped where they stand, nothing added or removed.
        assert_eq!(run(norm(false, false, true, false), &m, "  a  b "), "▁▁a▁▁b▁");
        // proto2 defaults: dummy prefix, leading/trailing/repeated spaces removed.
        assert_eq!(run(norm(true, true, true, false), &m, "  a  b "), "▁a▁b");
        assert_eq!(run(norm(true, true, true, false), &m, "   "), "");
        assert_eq!(run(norm(true, true, true, false), &m, ""), "");
        // A literal U+2581 at the end goes with the trailing spaces, and can take the dummy prefix with it.
        assert_eq!(run(norm(true, true, true, false), &m, "a▁ "), "▁a");
        assert_eq!(run(norm(true, true, true, false), &m, "▁"), "");
        // Suffix mode and unescaped spaces.
        assert_eq!(run(norm(true, true, false, true), &m, " a  b "), "a b ");
        assert_eq!(run(norm(true, false, true, true), &m, "a "), "a▁▁");
        // Tabs and newlines are not spaces.
        assert_eq!(run(norm(true, true, true, false), &m, "\ta \n"), "▁\ta▁\n");
    }

    #[test]
    fn user_symbols_are_single_steps() {
        let m = PrefixMatcher::new(["New York", "  "]);
        let n = norm(true, true, true, false);
        // The two-space symbol is one step, so it is not a leading " " and survives the leading loop; it is
        // then stripped because the text starts as if after a space.
        assert_eq!(run(n, &m, "  x"), "▁x");
        // Inside a symbol, spaces are kept (and escaped like any space): after "a", the two-space symbol is
        // one step that does not follow a space. (Expected values from sentencepiece 0.2.)
        assert_eq!(run(n, &m, "a New York"), "▁a▁New▁York");
        assert_eq!(run(n, &m, "a  New York"), "▁a▁▁New▁York");
        assert_eq!(run(n, &m, "a   New York"), "▁a▁▁New▁York");
    }
}
