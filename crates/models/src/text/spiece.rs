//! A reader for SentencePiece model files (`spiece.model`, a serialized `ModelProto`).
//!
//! Reference: `sentencepiece_model.proto` of google/sentencepiece. Only the fields a tokenizer
//! needs are read; every other field is skipped by its wire type, as protobuf readers do:
//! - `ModelProto.pieces` (1): `piece` (1, string), `score` (2, float), `type` (3, enum);
//! - `ModelProto.trainer_spec` (2): `model_type` (3), `vocab_size` (4), `byte_fallback` (35),
//!   `unk_id`/`bos_id`/`eos_id`/`pad_id` (40-43) and `unk_piece`/`bos_piece`/`eos_piece`/`pad_piece`
//!   (45-48), with proto2 defaults when absent;
//! - `ModelProto.normalizer_spec` (3): `name` (1), `precompiled_charsmap` (2, bytes),
//!   `add_dummy_prefix` (3), `remove_extra_whitespaces` (4), `escape_whitespaces` (5).
//!
//! A truncated or malformed file is an error naming the file and what was wrong, never a panic.

use std::path::Path;
use vdit_core::{Error, Result};

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_i64(v: i64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

/// The parts of `TrainerSpec` a tokenizer needs (ids are -1 when the token is disabled).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    pub vocab_size: i32,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
}

impl Default for TrainerSpec {
    /// The proto2 defaults of `sentencepiece_model.proto`.
    fn default() -> Self {
        Self {
            model_type: ModelType::Unigram,
            vocab_size: 8000,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
        }
    }
}

/// The parts of `NormalizerSpec` a tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    pub name: String,
    /// The compiled normalisation rules (a double-array trie plus replacement strings); empty
    /// when the model does no normalisation.
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

/// A parsed `spiece.model`.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    pub trainer_spec: TrainerSpec,
    pub normalizer_spec: NormalizerSpec,
}

impl SentencePieceModel {
    /// Reads and parses a SentencePiece model file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    /// Parses the bytes of a SentencePiece model; `path` is used in messages only.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |what: String| {
            Error::Msg(format!(
                "{}: not a valid SentencePiece model file: {what}",
                path.display()
            ))
        };
        let mut pieces = Vec::new();
        let mut trainer_spec = TrainerSpec::default();
        let mut normalizer_spec = NormalizerSpec::default();
        let mut r = Reader::new(bytes, "ModelProto");
        while let Some((field, value)) = r.next_field().map_err(bad)? {
            match (field, value) {
                (1, Value::Bytes(b)) => pieces.push(parse_piece(b, pieces.len()).map_err(bad)?),
                (2, Value::Bytes(b)) => trainer_spec = parse_trainer(b).map_err(bad)?,
                (3, Value::Bytes(b)) => normalizer_spec = parse_normalizer(b).map_err(bad)?,
                (1..=3, v) => {
                    return Err(bad(format!(
                        "ModelProto field {field} has wire type {}, expected a length-delimited message",
                        v.wire_name()
                    )))
                }
                _ => {}
            }
        }
        let model = Self {
            pieces,
            trainer_spec,
            normalizer_spec,
        };
        model.check().map_err(bad)?;
        Ok(model)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.pieces.is_empty() {
            return Err("it has no vocabulary pieces".into());
        }
        let unk = self.trainer_spec.unk_id;
        match usize::try_from(unk).ok().and_then(|i| self.pieces.get(i)) {
            Some(p) if p.kind == PieceType::Unknown => Ok(()),
            Some(p) => Err(format!(
                "trainer_spec.unk_id {unk} names piece `{}` of type {:?}, expected the unknown piece",
                p.piece, p.kind
            )),
            None => Err(format!(
                "trainer_spec.unk_id {unk} is outside the vocabulary of {} pieces",
                self.pieces.len()
            )),
        }
    }

    /// The id of a piece, if the vocabulary has it.
    pub fn piece_id(&self, piece: &str) -> Option<usize> {
        self.pieces.iter().position(|p| p.piece == piece)
    }
}

fn parse_piece(b: &[u8], index: usize) -> std::result::Result<Piece, String> {
    let mut piece = None;
    let mut score = 0f32;
    let mut kind = PieceType::Normal;
    let mut r = Reader::new(b, "SentencePiece");
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(s)) => {
                piece = Some(
                    String::from_utf8(s.to_vec())
                        .map_err(|_| format!("piece {index} is not valid UTF-8"))?,
                )
            }
            (2, Value::Fixed32(v)) => score = f32::from_bits(v),
            (3, Value::Varint(v)) => {
                kind = PieceType::from_i64(v as i64)
                    .ok_or_else(|| format!("piece {index} has unknown type {}", v as i64))?
            }
            (1..=3, v) => {
                return Err(format!(
                    "piece {index}: field {field} has unexpected wire type {}",
                    v.wire_name()
                ))
            }
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| format!("piece {index} has no text"))?;
    Ok(Piece { piece, score, kind })
}

fn parse_trainer(b: &[u8]) -> std::result::Result<TrainerSpec, String> {
    let mut t = TrainerSpec::default();
    let mut r = Reader::new(b, "TrainerSpec");
    let string = |s: &[u8], name: &str| {
        String::from_utf8(s.to_vec()).map_err(|_| format!("trainer_spec.{name} is not valid UTF-8"))
    };
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (3, Value::Varint(v)) => {
                t.model_type = match v {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    _ => {
                        return Err(format!(
                            "trainer_spec.model_type {v} is not a known model type"
                        ))
                    }
                }
            }
            // int32 fields: negative values are sign-extended to 64 bits on the wire.
            (4, Value::Varint(v)) => t.vocab_size = v as i64 as i32,
            (35, Value::Varint(v)) => t.byte_fallback = v != 0,
            (40, Value::Varint(v)) => t.unk_id = v as i64 as i32,
            (41, Value::Varint(v)) => t.bos_id = v as i64 as i32,
            (42, Value::Varint(v)) => t.eos_id = v as i64 as i32,
            (43, Value::Varint(v)) => t.pad_id = v as i64 as i32,
            (45, Value::Bytes(s)) => t.unk_piece = string(s, "unk_piece")?,
            (46, Value::Bytes(s)) => t.bos_piece = string(s, "bos_piece")?,
            (47, Value::Bytes(s)) => t.eos_piece = string(s, "eos_piece")?,
            (48, Value::Bytes(s)) => t.pad_piece = string(s, "pad_piece")?,
            (3 | 4 | 35 | 40..=43 | 45..=48, v) => {
                return Err(format!(
                    "trainer_spec field {field} has unexpected wire type {}",
                    v.wire_name()
                ))
            }
            _ => {}
        }
    }
    Ok(t)
}

fn parse_normalizer(b: &[u8]) -> std::result::Result<NormalizerSpec, String> {
    let mut n = NormalizerSpec::default();
    let mut r = Reader::new(b, "NormalizerSpec");
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(s)) => {
                n.name = String::from_utf8(s.to_vec())
                    .map_err(|_| "normalizer_spec.name is not valid UTF-8".to_string())?
            }
            (2, Value::Bytes(s)) => n.precompiled_charsmap = s.to_vec(),
            (3, Value::Varint(v)) => n.add_dummy_prefix = v != 0,
            (4, Value::Varint(v)) => n.remove_extra_whitespaces = v != 0,
            (5, Value::Varint(v)) => n.escape_whitespaces = v != 0,
            (1..=5, v) => {
                return Err(format!(
                    "normalizer_spec field {field} has unexpected wire type {}",
                    v.wire_name()
                ))
            }
            _ => {}
        }
    }
    Ok(n)
}

/// One field value in protobuf's wire format.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    fn wire_name(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64 => "64-bit",
            Value::Bytes(_) => "length-delimited",
            Value::Fixed32(_) => "32-bit",
        }
    }
}

/// A cursor over one protobuf message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], message: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            message,
        }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!(
                    "{}: truncated varint at byte {}",
                    self.message, self.pos
                ));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!(
            "{}: varint longer than 10 bytes at byte {}",
            self.message, self.pos
        ))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "{}: a field of {n} bytes at byte {} runs past the end ({} bytes)",
                    self.message,
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next_field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            return Err(format!("{}: field number 0 at byte {at}", self.message));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n)
                    .map_err(|_| format!("{}: length {n} too large", self.message))?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            w => {
                return Err(format!(
                    "{}: unsupported wire type {w} (field {field}) at byte {at}",
                    self.message
                ))
            }
        };
        Ok(Some((field, value)))
    }
}
