//! SentencePiece's BPE segmentation (`bpe::Model::SampleEncode` without dropout), step for step.
//!
//! The normalised text starts as one symbol per character, except that user-defined symbols (longest match
//! first) are single symbols that never merge. Every pair of neighbours whose concatenation is a piece
//! (NORMAL, USER_DEFINED or UNUSED) goes on an agenda; the agenda yields the pair with the highest piece
//! score, ties to the leftmost pair; a pair whose symbols changed since it was queued is dropped; a merge
//! queues the two new pairs it creates. Scores are compared as SentencePiece compares its floats (equal
//! scores tie, -0.0 ties with 0.0), through precomputed integer ranks. A heap keeps the whole loop
//! O(n log n) in the number of characters.

use super::{FastMap, SentencePiece};
use std::collections::BinaryHeap;

/// No symbol, or no piece id.
pub(super) const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Symbol {
    start: u32,
    /// Byte length; 0 once merged into its left neighbour.
    len: u32,
    prev: u32,
    next: u32,
    /// The piece id once the symbol is the result of a merge, NONE before.
    id: u32,
    frozen: bool,
}

/// Agenda entry: (key, right symbol, byte size of the merged piece, its id).
type Entry = (u64, u32, u32, u32);

/// The buffers of one segmentation, kept between calls (one per thread) so that encoding does not allocate.
#[derive(Default)]
pub(super) struct Scratch {
    symbols: Vec<Symbol>,
    agenda: BinaryHeap<Entry>,
    /// The final symbols: (start, end) byte offsets of the normalised text and the piece id when the
    /// symbol came from a merge (NONE for a symbol left as it started: a character or user-defined symbol).
    pub finals: Vec<(u32, u32, u32)>,
    /// The last merge as (start, split, end) byte offsets: for a text that ends as one symbol, the pair of
    /// symbols it was made from.
    pub last_merge: Option<(u32, u32, u32)>,
    /// For each UNUSED piece queued, the (start, split, end) of the pair that formed it when it was last
    /// queued: SentencePiece splits such pieces back into those parts.
    pub unused_parts: FastMap<u32, (u32, u32, u32)>,
}

impl Scratch {
    /// Gives back memory after an unusually long text.
    pub fn trim(&mut self) {
        const KEEP: usize = 1 << 16;
        if self.symbols.capacity() > KEEP {
            self.symbols = Vec::new();
            self.agenda = BinaryHeap::new();
            self.finals = Vec::new();
        }
    }
}

/// The byte length of the UTF-8 sequence that starts with `lead`.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Heap key: the score rank above, the left index (inverted, so that lower indices come first) below.
fn key(rank: u32, left: u32) -> u64 {
    (u64::from(rank) << 32) | u64::from(!left)
}

/// Cuts normalised `text` into pieces; the result is in `s.finals`.
pub(super) fn segment(model: &SentencePiece, text: &str, s: &mut Scratch) {
    let bytes = text.as_bytes();
    let symbols = &mut s.symbols;
    symbols.clear();
    s.agenda.clear();
    s.finals.clear();
    s.last_merge = None;
    s.unused_parts.clear();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let (len, frozen) =
            if model.matcher.is_empty() { (utf8_len(bytes[pos]), false) } else { model.matcher.step(&text[pos..]) };
        let index = symbols.len() as u32;
        symbols.push(Symbol {
            start: pos as u32,
            len: len as u32,
            prev: if index == 0 { NONE } else { index - 1 },
            next: if pos + len == bytes.len() { NONE } else { index + 1 },
            id: NONE,
            frozen,
        });
        pos += len;
    }
    if symbols.is_empty() {
        return;
    }

    let max_len = model.max_piece_bytes;
    let unused_parts = &mut s.unused_parts;
    let mut try_pair = |symbols: &[Symbol], agenda: &mut BinaryHeap<Entry>, left: u32, right: u32| {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let size = (l.len + r.len) as usize;
        if l.frozen || r.frozen || size > max_len {
            return;
        }
        let start = l.start as usize;
        let Some(&id) = model.merge_targets.get(&bytes[start..start + size]) else { return };
        agenda.push((key(model.score_rank[id as usize], left), right, size as u32, id));
        if model.is_unused(id) {
            unused_parts.insert(id, (l.start, r.start, l.start + size as u32));
        }
    };

    for i in 1..symbols.len() as u32 {
        try_pair(symbols, &mut s.agenda, i - 1, i);
    }

    while let Some((k, right, size, id)) = s.agenda.pop() {
        let left = !(k as u32);
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        // Stale: one side was merged away, or grew (then the sizes no longer add up).
        if l.len == 0 || r.len == 0 || l.len + r.len != size {
            continue;
        }
        s.last_merge = Some((l.start, r.start, l.start + size));
        let merged = &mut symbols[left as usize];
        merged.len = size;
        merged.next = r.next;
        merged.id = id;
        if r.next != NONE {
            symbols[r.next as usize].prev = left;
        }
        symbols[right as usize].len = 0;
        try_pair(symbols, &mut s.agenda, l.prev, left);
        try_pair(symbols, &mut s.agenda, left, r.next);
    }

    let mut i = 0u32;
    while i != NONE {
        let sym = symbols[i as usize];
        s.finals.push((sym.start, sym.start + sym.len, sym.id));
        i = sym.next;
    }
}
