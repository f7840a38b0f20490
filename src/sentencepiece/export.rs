//! `tokenizer.json` (Hugging Face `tokenizers` format) for a SentencePiece BPE model, written only when it
//! provably encodes every text exactly as SentencePiece does.
//!
//! Why one merge per piece is enough. Whenever SentencePiece queues a pair (A, B) with A+B = P, the two
//! symbols cover exactly an occurrence of P and were built only from merges inside it (a merge across its
//! edge would have left a symbol crossing the edge). Merges inside the occurrence are popped in the same
//! relative order as when P is encoded on its own: they are ordered by (score, position) among themselves,
//! and nothing outside can invalidate them. So the occurrence is in the unique two-symbol state of P's own
//! encoding, and (A, B) is always the last merge of encoding P alone: its *canonical split*. A piece whose
//! own encoding does not end as one symbol can never be produced. `tokenizers` BPE queues exactly the
//! listed pairs, checks staleness equivalently, and pops by (merge rank, position); with one merge per
//! reachable piece ranked by score, that is SentencePiece's (score, position) order — except between
//! different pieces of equal score, which SentencePiece orders by position and `tokenizers` by rank.
//!
//! Ties are harmless when (i) no two tied pieces' canonical pairs can share a symbol (the right part of one is
//! never the left part of the other), and (ii) merging a tied piece never queues a pair of equal or higher
//! score (every piece built from it scores lower): then the pairs at a tied score form a fixed set whose
//! non-overlapping members commute. Models that fail either condition are refused, naming the pieces.
//!
//! Also refused, because `tokenizers` cannot express them: UNUSED pieces (SentencePiece splits them back
//! after merging), a dummy whitespace suffix, a dummy prefix together with user-defined symbols (`tokenizers`
//! runs added tokens through the normaliser, which would prefix them too), user-defined symbols containing
//! spaces or, when trailing spaces are removed, ending with one, a one-character `<unk>` piece, and pieces
//! built from characters that have no piece of their own (`tokenizers` byte-falls-back such characters
//! before merging).

use super::normalize::SPACE_SYMBOL;
use super::proto::PieceType;
use super::{FastMap, SentencePiece, Specials, bpe};
use crate::error::input;
use anyhow::Result;
use serde_json::json;
use std::fmt::Write;
use std::path::Path;

/// The `tokenizer.json` for `model` (a model directory holding `tokenizer.model`, or the `.model` file itself;
/// `tokenizer_config.json` beside it decides the BOS / EOS post-processor).
pub fn export_tokenizer_json(model: &Path) -> Result<String> {
    let (file, dir) = if model.is_dir() {
        (model.join("tokenizer.model"), model.to_path_buf())
    } else {
        (model.to_path_buf(), model.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    let sp = SentencePiece::load(&file)?;
    let specials = sp.specials(&dir)?;
    to_tokenizer_json(&sp, specials, &file.display().to_string())
}

/// A merge: the piece it makes and the byte offset where its canonical split cuts it.
struct Merge {
    id: u32,
    split: usize,
}

fn refuse(origin: &str, why: String) -> anyhow::Error {
    input(format!("{origin}: no exact tokenizer.json exists for this model: {why}"))
}

/// The `tokenizer.json` text for a loaded model; `origin` names it in error messages.
pub fn to_tokenizer_json(sp: &SentencePiece, specials: Specials, origin: &str) -> Result<String> {
    let user: Vec<u32> =
        (0..sp.vocab_size() as u32).filter(|&id| sp.kinds[id as usize] == PieceType::UserDefined).collect();
    if let Some(why) = inexpressible_setting(sp, &user) {
        return Err(refuse(origin, why));
    }
    let merges = canonical_merges(sp, origin)?;
    check_ties(sp, &merges, origin)?;
    Ok(write_json(sp, specials, &user, &merges))
}

/// The first setting of the model that `tokenizers` cannot reproduce, if any.
fn inexpressible_setting(sp: &SentencePiece, user: &[u32]) -> Option<String> {
    let norm = sp.normalizer;
    let text = |id: &u32| &sp.pieces[*id as usize];
    if let Some(id) = (0..sp.vocab_size() as u32).find(|&id| sp.is_unused(id)) {
        let piece = text(&id);
        return Some(format!("piece {id} ({piece:?}) is UNUSED: SentencePiece splits it back after merging"));
    }
    if norm.add_dummy_prefix && norm.treat_whitespace_as_suffix {
        return Some("the dummy whitespace goes after the text (treat_whitespace_as_suffix)".into());
    }
    if let Some(symbol) = user.iter().map(text).find(|t| t.contains(' ')) {
        return Some(format!("user-defined symbol {symbol:?} contains a space"));
    }
    let space = norm.space();
    if let Some(symbol) = user.iter().map(text).find(|t| norm.remove_extra_whitespaces && t.ends_with(space)) {
        return Some(format!(
            "user-defined symbol {symbol:?} ends with {space:?}, which the trailing-whitespace rule of \
             tokenizers' normaliser would strip from the symbol as well"
        ));
    }
    if norm.add_dummy_prefix && !user.is_empty() {
        let why = "the model adds a dummy prefix and has user-defined symbols, which tokenizers' normaliser \
                   would prefix as well";
        return Some(why.into());
    }
    let unk = text(&sp.unk_id);
    if unk.chars().count() == 1 {
        return Some(format!("the unknown piece {unk:?} is a single character"));
    }
    None
}

/// The canonical split of every reachable piece, highest score first (ties by id).
fn canonical_merges(sp: &SentencePiece, origin: &str) -> Result<Vec<Merge>> {
    let mut merges = Vec::new();
    let mut seg = bpe::Scratch::default();
    for (id, piece) in sp.pieces.iter().enumerate() {
        if sp.kinds[id] != PieceType::Normal || piece.chars().nth(1).is_none() {
            continue;
        }
        bpe::segment(sp, piece, &mut seg);
        let (1, Some((_, split, _))) = (seg.finals.len(), seg.last_merge) else { continue };
        let split = split as usize;
        for part in [&piece[..split], &piece[split..]] {
            let single = part.chars().nth(1).is_none();
            if single && !sp.ids.contains_key(part.as_bytes()) {
                let why = format!(
                    "piece {id} ({piece:?}) is built from the character {part:?}, which has no piece of its own \
                     (tokenizers would replace it by bytes before merging)"
                );
                return Err(refuse(origin, why));
            }
        }
        merges.push(Merge { id: id as u32, split });
    }
    merges.sort_by_key(|m| (std::cmp::Reverse(sp.score_rank[m.id as usize]), m.id));
    Ok(merges)
}

fn check_ties(sp: &SentencePiece, merges: &[Merge], origin: &str) -> Result<()> {
    let parts = |m: &Merge| {
        let p = &sp.pieces[m.id as usize];
        (&p[..m.split], &p[m.split..])
    };
    let rank = |id: u32| sp.score_rank[id as usize];
    let piece = |id: u32| &sp.pieces[id as usize];
    let score = |id: u32| sp.scores[id as usize];
    let mut tied = vec![false; sp.vocab_size()];
    // Merges are sorted by rank, so the pieces of one score are one run.
    for group in merges.chunk_by(|a, b| rank(a.id) == rank(b.id)).filter(|g| g.len() > 1) {
        let mut by_left: FastMap<&str, Vec<u32>> = FastMap::default();
        for m in group {
            by_left.entry(parts(m).0).or_default().push(m.id);
            tied[m.id as usize] = true;
        }
        for m in group {
            let right = parts(m).1;
            if let Some(&other) = by_left.get(right).and_then(|ids| ids.iter().find(|&&q| q != m.id)) {
                let why = format!(
                    "pieces {:?} and {:?} share the score {} and can compete for the symbol {right:?}; \
                     SentencePiece breaks such ties by position, tokenizer.json's ranked merges cannot",
                    piece(m.id),
                    piece(other),
                    score(m.id)
                );
                return Err(refuse(origin, why));
            }
        }
    }
    for m in merges {
        let (left, right) = parts(m);
        for part in [left, right] {
            let Some(&pid) = sp.merge_targets.get(part.as_bytes()) else { continue };
            if tied[pid as usize] && rank(m.id) >= rank(pid) {
                let why = format!(
                    "piece {part:?} shares its score {} with other pieces, and merging it can at once enable {:?} \
                     (score {}); SentencePiece then breaks the tie by position, tokenizer.json's ranked merges cannot",
                    score(pid),
                    piece(m.id),
                    score(m.id)
                );
                return Err(refuse(origin, why));
            }
        }
    }
    Ok(())
}

fn write_json(sp: &SentencePiece, specials: Specials, user: &[u32], merges: &[Merge]) -> String {
    let norm = sp.normalizer;
    let space = norm.space();
    let quote = |s: &str| serde_json::Value::from(s).to_string();

    // The normaliser, in SentencePiece's order: collapse and strip leading spaces, add the dummy prefix,
    // escape spaces, strip trailing (escaped) spaces — the last also takes a literal trailing U+2581.
    let mut normalizers = Vec::new();
    if norm.remove_extra_whitespaces {
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\A "}, "content": ""}));
    }
    if norm.add_dummy_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": space}));
    }
    if norm.escape_whitespaces {
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL}));
    }
    if norm.remove_extra_whitespaces {
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": format!("{space}+\\z")}, "content": ""}));
    }
    let normalizer =
        if normalizers.is_empty() { json!(null) } else { json!({"type": "Sequence", "normalizers": normalizers}) };

    // Decoding (a convenience; encoding is the contract): `<unk>` shows as the model's unk_surface, unless
    // another piece contains the `<unk>` text and would be rewritten too.
    let mut decoders = Vec::new();
    let unk = &sp.pieces[sp.unk_id as usize];
    if !sp.pieces.iter().enumerate().any(|(id, p)| id as u32 != sp.unk_id && p.contains(unk.as_str())) {
        decoders.push(json!({"type": "Replace", "pattern": {"String": unk}, "content": sp.unk_surface}));
    }
    if norm.escape_whitespaces {
        decoders.push(json!({"type": "Replace", "pattern": {"String": SPACE_SYMBOL}, "content": " "}));
    }
    decoders.push(json!({"type": "ByteFallback"}));
    decoders.push(json!({"type": "Fuse"}));
    if norm.add_dummy_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let decoder = json!({"type": "Sequence", "decoders": decoders});

    let post_processor = if specials.count() == 0 {
        json!(null)
    } else {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut tokens = serde_json::Map::new();
        for (sequence, type_id) in [("A", 0), ("B", 1)] {
            let steps = if sequence == "A" { &mut single } else { &mut pair };
            if let Some(bos) = specials.bos {
                steps.push(json!({"SpecialToken": {"id": sp.pieces[bos as usize], "type_id": type_id}}));
            }
            steps.push(json!({"Sequence": {"id": sequence, "type_id": type_id}}));
            if let Some(eos) = specials.eos {
                steps.push(json!({"SpecialToken": {"id": sp.pieces[eos as usize], "type_id": type_id}}));
            }
        }
        let pair = [single.clone(), pair].concat();
        for id in [specials.bos, specials.eos].into_iter().flatten() {
            let piece = &sp.pieces[id as usize];
            tokens.insert(piece.clone(), json!({"id": piece, "ids": [id], "tokens": [piece]}));
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
    };

    // User-defined symbols are matched on the normalised text, longest first, before BPE: tokenizers' added
    // tokens with `normalized: true` (their content passes through the normaliser unchanged).
    let added: Vec<serde_json::Value> = user
        .iter()
        .map(|&id| {
            json!({"id": id, "content": sp.pieces[id as usize], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": false})
        })
        .collect();

    let mut out = String::with_capacity(64 * sp.vocab_size() + 1024);
    out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
    let _ = writeln!(out, "  \"added_tokens\": {},", serde_json::Value::from(added));
    let _ = writeln!(out, "  \"normalizer\": {normalizer},");
    out.push_str("  \"pre_tokenizer\": null,\n");
    let _ = writeln!(out, "  \"post_processor\": {post_processor},");
    let _ = writeln!(out, "  \"decoder\": {decoder},");
    let _ = write!(
        out,
        "  \"model\": {{\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": {},\n    \
         \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": {},\n    \
         \"byte_fallback\": {},\n    \"ignore_merges\": false,\n    \"vocab\": {{",
        quote(&sp.pieces[sp.unk_id as usize]),
        sp.byte_ids.is_none(),
        sp.byte_ids.is_some()
    );
    for (id, piece) in sp.pieces.iter().enumerate() {
        let sep = if id == 0 { "" } else { "," };
        let _ = write!(out, "{sep}\n      {}: {id}", quote(piece));
    }
    out.push_str("\n    },\n    \"merges\": [");
    for (i, m) in merges.iter().enumerate() {
        let piece = &sp.pieces[m.id as usize];
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}\n      [{}, {}]", quote(&piece[..m.split]), quote(&piece[m.split..]));
    }
    out.push_str("\n    ]\n  }\n}\n");
    out
}
