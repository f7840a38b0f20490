//! SentencePiece BPE models (`tokenizer.model`, as Baichuan2 ships it), encoded exactly as
//! `sentencepiece.SentencePieceProcessor.encode` does, without Python.
//!
//! Supported: BPE models with the identity normaliser (no precompiled map), with any whitespace flags
//! (dummy prefix or suffix, whitespace removal, escaping), byte fallback or `<unk>`, user-defined symbols and
//! UNUSED pieces. Refused with a message naming the file and the setting: other model types (unigram, word,
//! char), a precompiled normalisation map, and models SentencePiece itself would not load.
//!
//! Encoding (SentencePieceProcessor::Encode): normalise (normalize.rs), cut into pieces (bpe.rs), then map
//! each piece to its id: UNUSED pieces are split back into the pieces they were made of, an unknown piece
//! becomes one `<0xNN>` byte piece per UTF-8 byte with byte fallback, or `<unk>` otherwise (a run of unknown
//! pieces giving one `<unk>`). No BOS or EOS is added: [`Specials`] reads what a Hugging Face
//! `tokenizer_config.json` asks for.
//!
//! The trainer's pre-tokenisation settings (split_digits, split_by_whitespace, split_by_number,
//! split_by_unicode_script, allow_whitespace_only_pieces, max_sentencepiece_length) only decide which pieces
//! training creates; encoding merges any neighbours whose concatenation is a piece, so they are not read.
//! treat_whitespace_as_suffix does matter: it moves the dummy space after the text.

mod bpe;
pub mod export;
mod normalize;
pub mod proto;

pub use export::export_tokenizer_json;

use crate::error::input;
use anyhow::Result;
use normalize::{Normalizer, PrefixMatcher};
use proto::{ModelType, PieceType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;

/// SentencePiece refuses pieces this long (model_interface.cc).
const MAX_PIECE_BYTES: usize = 8000;

/// The longest text encoded: byte offsets into its normalised form (at most three times longer) are 32-bit.
pub const MAX_TEXT_BYTES: usize = 1 << 30;

/// A multiply-rotate hasher for the piece tables: piece lookups are the inner loop of encoding, and the keys
/// come from the model file, not from the text being encoded.
#[derive(Clone, Copy, Default)]
pub(crate) struct PieceHasher(u64);

impl PieceHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for PieceHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        // Fold the well-mixed high bits into the low ones, which pick the bucket.
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(Self::K) ^ (h >> 32)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<PieceHasher>>;

/// A loaded SentencePiece BPE model.
pub struct SentencePiece {
    pieces: Vec<String>,
    kinds: Vec<PieceType>,
    scores: Vec<f32>,
    /// NORMAL, USER_DEFINED and UNUSED pieces: what neighbouring symbols may merge into.
    merge_targets: FastMap<Box<[u8]>, u32>,
    /// Every piece. SentencePiece looks CONTROL, UNKNOWN and BYTE pieces up before the others; with no
    /// piece text repeated, one table answers the same.
    ids: FastMap<Box<[u8]>, u32>,
    /// Per id, the rank of its score among the scores of `merge_targets` (equal scores share a rank).
    score_rank: Vec<u32>,
    max_piece_bytes: usize,
    unk_id: u32,
    unk_surface: String,
    /// Ids of `<0x00>`..`<0xFF>` when byte fallback is on.
    byte_ids: Option<Box<[u32; 256]>>,
    matcher: PrefixMatcher,
    normalizer: Normalizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

/// The BOS / EOS ids to put around every encoding.
///
/// SentencePiece adds none. A Hugging Face model directory says what its (slow) tokenizer adds in
/// `tokenizer_config.json`: `add_bos_token` / `add_eos_token` (false when absent, as for Baichuan2); the ids
/// are the model's own `<s>` / `</s>` (trainer_spec.bos_piece / eos_piece, which must be CONTROL pieces).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl Specials {
    pub fn count(&self) -> usize {
        usize::from(self.bos.is_some()) + usize::from(self.eos.is_some())
    }
}

impl SentencePiece {
    /// Reads a `.model` file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| input(format!("{}: cannot read ({e})", path.display())))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses a serialized ModelProto; `origin` names it in error messages.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let model =
            proto::parse(bytes).map_err(|e| input(format!("{origin}: not a SentencePiece model (ModelProto): {e}")))?;
        Self::from_proto(model, origin)
    }

    /// Checks a parsed model (every check SentencePiece makes when loading, plus the settings this encoder
    /// does not implement) and builds the lookup tables.
    pub fn from_proto(model: proto::ModelProto, origin: &str) -> Result<Self> {
        if model.pieces.is_empty() {
            crate::bail_input!("{origin}: the model has no pieces");
        }
        let trainer = &model.trainer;
        if trainer.model_type != ModelType::Bpe {
            let name = format!("{:?}", trainer.model_type).to_uppercase();
            crate::bail_input!(
                "{origin}: trainer_spec.model_type is {name} (an absent model_type means UNIGRAM); \
                 only BPE SentencePiece models are supported"
            );
        }
        let norm = &model.normalizer;
        if !norm.precompiled_charsmap.is_empty() {
            crate::bail_input!(
                "{origin}: normalizer_spec {:?} has a precompiled normalisation map ({} bytes); only the identity \
                 normaliser (no map) is supported",
                norm.name,
                norm.precompiled_charsmap.len()
            );
        }
        if model.pieces.len() >= u32::MAX as usize {
            crate::bail_input!("{origin}: {} pieces are more than 32-bit ids can hold", model.pieces.len());
        }

        let n = model.pieces.len();
        let mut merge_targets: FastMap<Box<[u8]>, u32> = FastMap::default();
        let mut ids: FastMap<Box<[u8]>, u32> = FastMap::default();
        let mut unk_id = None;
        let mut byte_ids = [u32::MAX; 256];
        let mut user_symbols = Vec::new();
        for (i, p) in model.pieces.iter().enumerate() {
            let text = p.piece.as_str();
            if text.is_empty() {
                crate::bail_input!("{origin}: piece {i} is empty");
            }
            if text.contains('\0') {
                crate::bail_input!("{origin}: piece {i} ({text:?}) contains a NUL character");
            }
            if text.len() >= MAX_PIECE_BYTES {
                crate::bail_input!("{origin}: piece {i} is {} bytes long (at most {MAX_PIECE_BYTES})", text.len());
            }
            if p.score.is_nan() {
                crate::bail_input!("{origin}: piece {i} ({text:?}) has a NaN score");
            }
            let id = i as u32;
            // SentencePiece keeps two tables and only refuses a repeat within one; a piece in both would make
            // ids depend on which table is asked first, so it is refused here.
            if let Some(first) = ids.insert(text.as_bytes().into(), id) {
                crate::bail_input!("{origin}: piece {text:?} is defined twice (ids {first} and {i})");
            }
            match p.kind {
                PieceType::Normal | PieceType::Unused => {
                    merge_targets.insert(text.as_bytes().into(), id);
                }
                PieceType::UserDefined => {
                    merge_targets.insert(text.as_bytes().into(), id);
                    user_symbols.push(text);
                }
                PieceType::Control => {
                    // A one-character control piece would be emitted without consuming its character, which
                    // SentencePiece reports as an error for any text containing that character.
                    if text.chars().count() == 1 {
                        crate::bail_input!(
                            "{origin}: control piece {i} ({text:?}) is a single character, which SentencePiece \
                             cannot encode"
                        );
                    }
                }
                PieceType::Unknown => {
                    if let Some(first) = unk_id {
                        crate::bail_input!("{origin}: pieces {first} and {i} are both of type UNKNOWN");
                    }
                    unk_id = Some(id);
                }
                PieceType::Byte => {
                    if !trainer.byte_fallback {
                        crate::bail_input!(
                            "{origin}: byte piece {i} ({text:?}) in a model without trainer_spec.byte_fallback"
                        );
                    }
                    let Some(b) = byte_of_piece(text) else {
                        crate::bail_input!("{origin}: piece {i} ({text:?}) has type BYTE but is not <0xNN>");
                    };
                    byte_ids[b as usize] = id;
                }
            }
        }
        let Some(unk_id) = unk_id else {
            crate::bail_input!("{origin}: no piece has type UNKNOWN");
        };
        let byte_ids = if trainer.byte_fallback {
            if let Some(b) = byte_ids.iter().position(|&id| id == u32::MAX) {
                crate::bail_input!("{origin}: trainer_spec.byte_fallback is on but piece <0x{b:02X}> is missing");
            }
            Some(Box::new(byte_ids))
        } else {
            None
        };

        // Equal floats (0.0 and -0.0 included) must share a rank: SentencePiece compares scores with == and <.
        let canonical = |s: f32| if s == 0.0 { 0.0 } else { s };
        let mut distinct: Vec<f32> =
            merge_targets.values().map(|&id| canonical(model.pieces[id as usize].score)).collect();
        distinct.sort_by(f32::total_cmp);
        distinct.dedup();
        let mut score_rank = vec![0u32; n];
        for &id in merge_targets.values() {
            let s = canonical(model.pieces[id as usize].score);
            score_rank[id as usize] = distinct.partition_point(|&d| d < s) as u32;
        }
        let max_piece_bytes = merge_targets.keys().map(|k| k.len()).max().unwrap_or(0);

        let normalizer = Normalizer {
            add_dummy_prefix: norm.add_dummy_prefix,
            remove_extra_whitespaces: norm.remove_extra_whitespaces,
            escape_whitespaces: norm.escape_whitespaces,
            treat_whitespace_as_suffix: trainer.treat_whitespace_as_suffix,
        };
        let matcher = PrefixMatcher::new(user_symbols);
        let mut sp = Self {
            pieces: model.pieces.iter().map(|p| p.piece.clone()).collect(),
            kinds: model.pieces.iter().map(|p| p.kind).collect(),
            scores: model.pieces.iter().map(|p| p.score).collect(),
            merge_targets,
            ids,
            score_rank,
            max_piece_bytes,
            unk_id,
            unk_surface: trainer.unk_surface.clone(),
            byte_ids,
            matcher,
            normalizer,
            bos_id: None,
            eos_id: None,
        };
        let control = |sp: &Self, piece: &str| {
            let id = sp.piece_to_id(piece.as_bytes());
            (sp.kinds[id as usize] == PieceType::Control).then_some(id)
        };
        sp.bos_id = control(&sp, &trainer.bos_piece);
        sp.eos_id = control(&sp, &trainer.eos_piece);
        Ok(sp)
    }

    /// Number of pieces (ids are 0..vocab_size).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The text of piece `id`.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// SentencePiece's PieceToId: the piece's id, else `<unk>`.
    fn piece_to_id(&self, piece: &[u8]) -> u32 {
        self.ids.get(piece).copied().unwrap_or(self.unk_id)
    }

    fn is_unused(&self, id: u32) -> bool {
        self.kinds[id as usize] == PieceType::Unused
    }

    /// The ids of `text`, exactly as `SentencePieceProcessor.encode(text)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids)?;
        Ok(ids)
    }

    /// Appends the ids of `text` to `ids`; fails only for a text over [`MAX_TEXT_BYTES`].
    pub fn encode_into(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if text.len() > MAX_TEXT_BYTES {
            crate::bail_input!(
                "a text of {} bytes is longer than the {MAX_TEXT_BYTES} bytes encoding takes",
                text.len()
            );
        }
        thread_local! {
            static SCRATCH: RefCell<(String, bpe::Scratch)> = RefCell::new(Default::default());
        }
        SCRATCH.with(|cell| {
            let (normalized, seg) = &mut *cell.borrow_mut();
            self.encode_with(text, normalized, seg, ids);
            if normalized.capacity() > 1 << 20 {
                *normalized = String::new();
            }
            seg.trim();
        });
        Ok(())
    }

    fn encode_with(&self, text: &str, normalized: &mut String, seg: &mut bpe::Scratch, ids: &mut Vec<u32>) {
        self.normalizer.normalize(text, &self.matcher, normalized);
        bpe::segment(self, normalized, seg);
        ids.reserve(seg.finals.len());
        let mut out = Output { model: self, text: normalized.as_bytes(), seg, ids, prev_unknown: false };
        for &(start, end, id) in &seg.finals {
            out.piece(start, end, id);
        }
    }

    /// What `model_dir/tokenizer_config.json` asks to add around each text (nothing when the file is absent).
    pub fn specials(&self, model_dir: &Path) -> Result<Specials> {
        let path = model_dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Specials::default());
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| input(format!("{}: cannot read ({e})", path.display())))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| input(format!("{}: not valid JSON ({e})", path.display())))?;
        let flag = |key: &str| -> Result<bool> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(other) => Err(input(format!("{}: \"{key}\" must be true or false, not {other}", path.display()))),
            }
        };
        let pick = |key: &str, id: Option<u32>, what: &str| -> Result<Option<u32>> {
            if !flag(key)? {
                return Ok(None);
            }
            match id {
                Some(id) => Ok(Some(id)),
                None => Err(input(format!(
                    "{}: \"{key}\" is true but the SentencePiece model has no {what} control piece",
                    path.display()
                ))),
            }
        };
        Ok(Specials {
            bos: pick("add_bos_token", self.bos_id, "BOS")?,
            eos: pick("add_eos_token", self.eos_id, "EOS")?,
        })
    }
}

/// Turns final pieces into ids, as SentencePieceProcessor::PopulateSentencePieceText does.
struct Output<'a> {
    model: &'a SentencePiece,
    text: &'a [u8],
    seg: &'a bpe::Scratch,
    ids: &'a mut Vec<u32>,
    prev_unknown: bool,
}

impl Output<'_> {
    /// Appends the ids of the piece `text[start..end]`; `id` when known, else bpe::NONE.
    fn piece(&mut self, start: u32, end: u32, id: u32) {
        let model = self.model;
        let piece = &self.text[start as usize..end as usize];
        let id = if id == bpe::NONE { model.piece_to_id(piece) } else { id };
        let kind = model.kinds[id as usize];
        if kind == PieceType::Unused
            && let Some(&(s, m, e)) = self.seg.unused_parts.get(&id)
        {
            self.piece(s, m, bpe::NONE);
            self.piece(m, e, bpe::NONE);
            return;
        }
        let unknown = kind == PieceType::Unknown;
        match (&model.byte_ids, unknown) {
            (Some(bytes), true) => self.ids.extend(piece.iter().map(|&b| bytes[b as usize])),
            // Without byte fallback, a run of unknown pieces is one <unk>.
            (None, true) if self.prev_unknown => {}
            _ => self.ids.push(id),
        }
        self.prev_unknown = unknown;
    }
}

/// The byte of a `<0xNN>` piece (upper-case hex, as SentencePiece writes them).
fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
