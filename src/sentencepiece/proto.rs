//! The parts of SentencePiece's `ModelProto` (sentencepiece_model.proto, proto2) that encoding depends on,
//! read straight from the protobuf wire format.
//!
//! Field numbers: ModelProto { pieces = 1, trainer_spec = 2, normalizer_spec = 3 }, SentencePiece { piece = 1,
//! score = 2, type = 3 }, TrainerSpec { model_type = 3, treat_whitespace_as_suffix = 24, byte_fallback = 35,
//! unk_surface = 44, unk_piece = 45, bos_piece = 46, eos_piece = 47 }, NormalizerSpec { name = 1,
//! precompiled_charsmap = 2, add_dummy_prefix = 3, remove_extra_whitespaces = 4, escape_whitespaces = 5 }.
//! Every other field (the trainer's corpus and pre-tokenisation settings such as split_digits or
//! split_by_whitespace, which only shape which pieces training creates; the self-test data; the denormaliser)
//! is skipped: none of them changes how text is encoded. proto2 semantics apply: an absent field takes its
//! declared default (`add_dummy_prefix`, `remove_extra_whitespaces` and `escape_whitespaces` default to true,
//! `model_type` to UNIGRAM), the last occurrence of a scalar wins, and repeated occurrences of a message merge.

/// The type of a piece (`SentencePiece.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// `TrainerSpec.ModelType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

#[derive(Clone, Debug)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Clone, Debug)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    pub treat_whitespace_as_suffix: bool,
    pub byte_fallback: bool,
    pub unk_piece: String,
    /// What `<unk>` decodes to.
    pub unk_surface: String,
    pub bos_piece: String,
    pub eos_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: ModelType::Unigram,
            treat_whitespace_as_suffix: false,
            byte_fallback: false,
            unk_piece: "<unk>".into(),
            unk_surface: " \u{2047} ".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ModelProto {
    pub pieces: Vec<Piece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

/// Why bytes are not a `ModelProto`: a sentence naming the byte offset and the field.
pub type WireResult<T> = Result<T, String>;

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// A cursor over one message; `base` is the message's offset in the file, for error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn varint(&mut self) -> WireResult<u64> {
        let start = self.offset();
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(format!("byte {start}: truncated varint"));
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("byte {start}: varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize, what: &str) -> WireResult<&'a [u8]> {
        let start = self.offset();
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let Some(end) = end else {
            return Err(format!("byte {start}: {what} of {n} bytes runs past the end of its message"));
        };
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The next field as (number, value, offset of its payload), or None at the end of the message.
    fn field(&mut self) -> WireResult<Option<(u64, Value<'a>, usize)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let at = self.offset();
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(format!("byte {at}: field number 0"));
        }
        let payload = self.offset();
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8, "fixed64 field")?;
                Value::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| format!("byte {at}: length {len} too large"))?;
                let body_at = self.offset();
                return Ok(Some((number, Value::Bytes(self.take(len, "length-delimited field")?), body_at)));
            }
            5 => {
                let b = self.take(4, "fixed32 field")?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => return Err(format!("byte {at}: field {number} has wire type {wire}, which ModelProto never uses")),
        };
        Ok(Some((number, value, payload)))
    }
}

fn wrong_type(message: &str, number: u64, at: usize, expected: &str) -> String {
    format!("byte {at}: field {number} of {message} is not {expected}")
}

fn as_bool(message: &str, number: u64, value: Value, at: usize) -> WireResult<bool> {
    match value {
        Value::Varint(v) => Ok(v != 0),
        _ => Err(wrong_type(message, number, at, "a varint (bool)")),
    }
}

fn as_bytes<'a>(message: &str, number: u64, value: Value<'a>, at: usize) -> WireResult<&'a [u8]> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err(wrong_type(message, number, at, "length-delimited")),
    }
}

fn as_string(message: &str, number: u64, value: Value, at: usize) -> WireResult<String> {
    let bytes = as_bytes(message, number, value, at)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("byte {at}: field {number} of {message} is not UTF-8"))
}

fn as_enum(message: &str, number: u64, value: Value, at: usize) -> WireResult<u64> {
    match value {
        Value::Varint(v) => Ok(v),
        _ => Err(wrong_type(message, number, at, "a varint (enum)")),
    }
}

fn parse_piece(buf: &[u8], base: usize, index: usize) -> WireResult<Piece> {
    let message = format!("pieces[{index}]");
    let mut piece = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut r = Reader::new(buf, base);
    while let Some((number, value, at)) = r.field()? {
        match number {
            1 => piece.piece = as_string(&message, number, value, at)?,
            2 => match value {
                Value::Fixed32(bits) => piece.score = f32::from_bits(bits),
                _ => return Err(wrong_type(&message, number, at, "a float")),
            },
            3 => {
                piece.kind = match as_enum(&message, number, value, at)? {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(format!("byte {at}: {message} has unknown type {other}")),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(buf: &[u8], base: usize, spec: &mut TrainerSpec) -> WireResult<()> {
    let message = "trainer_spec";
    let mut r = Reader::new(buf, base);
    while let Some((number, value, at)) = r.field()? {
        match number {
            3 => {
                // proto2 keeps an unknown enum value out of the field, which then reads as its default.
                spec.model_type = match as_enum(message, number, value, at)? {
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    _ => ModelType::Unigram,
                }
            }
            24 => spec.treat_whitespace_as_suffix = as_bool(message, number, value, at)?,
            35 => spec.byte_fallback = as_bool(message, number, value, at)?,
            44 => spec.unk_surface = as_string(message, number, value, at)?,
            45 => spec.unk_piece = as_string(message, number, value, at)?,
            46 => spec.bos_piece = as_string(message, number, value, at)?,
            47 => spec.eos_piece = as_string(message, number, value, at)?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(buf: &[u8], base: usize, spec: &mut NormalizerSpec) -> WireResult<()> {
    let message = "normalizer_spec";
    let mut r = Reader::new(buf, base);
    while let Some((number, value, at)) = r.field()? {
        match number {
            1 => spec.name = as_string(message, number, value, at)?,
            2 => spec.precompiled_charsmap = as_bytes(message, number, value, at)?.to_vec(),
            3 => spec.add_dummy_prefix = as_bool(message, number, value, at)?,
            4 => spec.remove_extra_whitespaces = as_bool(message, number, value, at)?,
            5 => spec.escape_whitespaces = as_bool(message, number, value, at)?,
            _ => {}
        }
    }
    Ok(())
}

/// Parses a serialized `ModelProto`.
pub fn parse(buf: &[u8]) -> WireResult<ModelProto> {
    let mut model = ModelProto::default();
    let mut r = Reader::new(buf, 0);
    while let Some((number, value, at)) = r.field()? {
        match number {
            1 => {
                let bytes = as_bytes("ModelProto", number, value, at)?;
                let piece = parse_piece(bytes, at, model.pieces.len())?;
                model.pieces.push(piece);
            }
            2 => parse_trainer(as_bytes("ModelProto", number, value, at)?, at, &mut model.trainer)?,
            3 => parse_normalizer(as_bytes("ModelProto", number, value, at)?, at, &mut model.normalizer)?,
            _ => {}
        }
    }
    Ok(model)
}

/// Writes the wire format, for tests that build models by hand.
#[cfg(test)]
pub(crate) mod write {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn bytes(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    pub fn uint(out: &mut Vec<u8>, number: u64, v: u64) {
        varint(out, number << 3);
        varint(out, v);
    }

    pub fn float(out: &mut Vec<u8>, number: u64, v: f32) {
        varint(out, number << 3 | 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        write::bytes(&mut p, 1, text.as_bytes());
        write::float(&mut p, 2, score);
        write::uint(&mut p, 3, kind);
        p
    }

    #[test]
    fn reads_fields_and_keeps_proto2_defaults() {
        let mut buf = Vec::new();
        write::bytes(&mut buf, 1, &piece("<unk>", 0.0, 2));
        write::bytes(&mut buf, 1, &piece("▁ab", -1.5, 1));
        let mut trainer = Vec::new();
        write::uint(&mut trainer, 3, 2);
        write::uint(&mut trainer, 35, 1);
        write::bytes(&mut trainer, 1, b"corpus.txt"); // skipped
        write::bytes(&mut buf, 2, &trainer);
        let mut norm = Vec::new();
        write::bytes(&mut norm, 1, b"identity");
        write::uint(&mut norm, 3, 0);
        write::bytes(&mut buf, 3, &norm);
        // A second normalizer_spec merges into the first: only remove_extra_whitespaces changes.
        let mut norm2 = Vec::new();
        write::uint(&mut norm2, 4, 0);
        write::bytes(&mut buf, 3, &norm2);
        write::float(&mut buf, 9, 1.0); // an unknown fixed32 field is skipped

        let m = parse(&buf).unwrap();
        assert_eq!(m.pieces.len(), 2);
        assert_eq!(m.pieces[1].piece, "▁ab");
        assert_eq!(m.pieces[1].score, -1.5);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.trainer.model_type, ModelType::Bpe);
        assert!(m.trainer.byte_fallback && !m.trainer.treat_whitespace_as_suffix);
        assert_eq!(m.trainer.bos_piece, "<s>");
        assert_eq!(m.normalizer.name, "identity");
        assert!(!m.normalizer.add_dummy_prefix && !m.normalizer.remove_extra_whitespaces);
        assert!(m.normalizer.escape_whitespaces);
    }

    #[test]
    fn an_empty_message_is_all_defaults() {
        let m = parse(&[]).unwrap();
        assert!(m.pieces.is_empty());
        assert_eq!(m.trainer.model_type, ModelType::Unigram);
        assert!(m.normalizer.add_dummy_prefix && m.normalizer.remove_extra_whitespaces);
    }

    #[test]
    fn malformed_bytes_are_errors_with_offsets() {
        // A JSON file: '{' is field 15 with wire type 3 (start group).
        assert!(parse(b"{\"version\": \"1.0\"}").unwrap_err().contains("wire type 3"));
        // A length that runs past the end.
        let mut buf = Vec::new();
        write::bytes(&mut buf, 1, &piece("abc", 0.0, 1));
        buf.truncate(buf.len() - 2);
        assert!(parse(&buf).unwrap_err().contains("runs past the end"));
        // A truncated varint.
        assert!(parse(&[0x08, 0x80]).unwrap_err().contains("truncated varint"));
        // A score that is not a float.
        let mut p = Vec::new();
        write::uint(&mut p, 2, 7);
        let mut buf = Vec::new();
        write::bytes(&mut buf, 1, &p);
        assert!(parse(&buf).unwrap_err().contains("pieces[0]"));
        // An unknown piece type.
        let mut buf = Vec::new();
        write::bytes(&mut buf, 1, &piece("x", 0.0, 9));
        assert!(parse(&buf).unwrap_err().contains("unknown type 9"));
    }
}
