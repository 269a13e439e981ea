//! The prompt tokenizer, as `CogVideoXPipeline._get_t5_prompt_embeds` calls it:
//! `tokenizer(prompts, padding="max_length", max_length=226, truncation=True,
//! add_special_tokens=True)`, so every prompt becomes exactly `max_len` ids: its tokens, cut to
//! leave room for the special tokens, then `</s>`, then `<pad>` up to `max_len`.
//!
//! A folder is read in this order:
//! 1. `tokenizer.json`: any model of the `tokenizers` library, used as it is (the truncation and
//!    padding settings stored in it are replaced by the call's).
//! 2. `spiece.model` (+ optional `tokenizer_config.json` / `special_tokens_map.json`): a
//!    SentencePiece unigram model, converted exactly as transformers 5.23's `T5Tokenizer`
//!    (= `T5TokenizerFast`) converts it: the pieces plus `extra_ids` sentinels `<extra_id_N>`
//!    appended in reverse order with score 0; the proto's precompiled normaliser; whitespace
//!    split then Metaspace `▁` prepended to every word; `</s>` appended; the special tokens
//!    (`</s>`, `<unk>`, `<pad>`, the sentinels and the model's control pieces) matched whole in the
//!    text before normalisation.

use crate::text::spiece::{ModelType, PieceType, SentencePieceModel};
use std::path::{Path, PathBuf};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessor, Tokenizer, TruncationDirection};
use vdit_core::{Error, Result};

const TOKENIZER_JSON: &str = "tokenizer.json";
const SPIECE_MODEL: &str = "spiece.model";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// transformers' `T5Tokenizer(extra_ids=100)` default.
const DEFAULT_EXTRA_IDS: usize = 100;

/// A loaded tokenizer plus the pad token its padding uses.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    /// The id unknown text maps to, when the model has one.
    unk_id: Option<u32>,
    /// Where it came from, for messages.
    source: PathBuf,
}

/// The id of the model's unknown token: `unk_token` (WordLevel, WordPiece, BPE) or `unk_id`
/// (Unigram) of the model as `tokenizers` serialises it.
fn model_unk_id(tok: &Tokenizer) -> Option<u32> {
    let m = serde_json::to_value(tok.get_model()).ok()?;
    match (m.get("unk_id"), m.get("unk_token")) {
        (Some(id), _) if id.is_u64() => id.as_u64().map(|i| i as u32),
        (_, Some(t)) => t.as_str().and_then(|t| tok.token_to_id(t)),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads the tokenizer of a folder: `tokenizer.json` when present, otherwise `spiece.model`.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = dir.join(TOKENIZER_JSON);
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let spiece = dir.join(SPIECE_MODEL);
        if spiece.is_file() {
            return Self::from_spiece_dir(dir);
        }
        Err(Error::invalid(
            "tokenizer",
            format!(
                "{} has neither {TOKENIZER_JSON} nor {SPIECE_MODEL}",
                dir.display()
            ),
        ))
    }

    /// A `tokenizers` `tokenizer.json`. The pad token is the file's `padding.pad_id` when set,
    /// else `pad_token` of a `tokenizer_config.json` beside it, else `<pad>`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut tok = Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::config(
                path,
                "<json>",
                format!("cannot load as a `tokenizers` tokenizer.json: {e}"),
            )
        })?;
        let stored_pad = tok.get_padding().map(|p| (p.pad_id, p.pad_token.clone()));
        // The call decides truncation and padding, as transformers does.
        tok.with_padding(None);
        tok.with_truncation(None)
            .map_err(|e| Error::config(path, "truncation", e.to_string()))?;
        let pad_id = match stored_pad {
            Some((id, _)) => id,
            None => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let cfg = read_json_object(&dir.join(TOKENIZER_CONFIG))?;
                let pad = match &cfg {
                    Some((f, obj)) => token_field(f, obj, "pad_token")?,
                    None => None,
                }
                .unwrap_or_else(|| "<pad>".to_string());
                tok.token_to_id(&pad).ok_or_else(|| {
                    Error::config(
                        path,
                        "padding",
                        format!(
                            "no pad token: the file has no `padding` section and its vocabulary has no `{pad}` (name one as `pad_token` in a {TOKENIZER_CONFIG} beside it)"
                        ),
                    )
                })?
            }
        };
        Ok(Self {
            unk_id: model_unk_id(&tok),
            tok,
            pad_id,
            source: path.to_path_buf(),
        })
    }

    /// A SentencePiece folder: `spiece.model` plus, when present, `tokenizer_config.json` and
    /// `special_tokens_map.json` (the latter wins where both name a token, as in transformers).
    pub fn from_spiece_dir(dir: &Path) -> Result<Self> {
        let spiece_path = dir.join(SPIECE_MODEL);
        let sp = SentencePieceModel::from_file(&spiece_path)?;
        let cfg = read_json_object(&dir.join(TOKENIZER_CONFIG))?;
        let map = read_json_object(&dir.join(SPECIAL_TOKENS_MAP))?;
        let spec = T5Specials::resolve(cfg.as_ref(), map.as_ref())?;
        let tok = build_t5_tokenizer(&sp, &spiece_path, &spec)?;
        let pad_id = tok.token_to_id(&spec.pad.token).ok_or_else(|| {
            Error::config(
                &spiece_path,
                "pad_token",
                format!("`{}` is not in the vocabulary", spec.pad.token),
            )
        })?;
        Ok(Self {
            // The unigram model was built with this unk token (no need to serialise 32k pieces).
            unk_id: tok.token_to_id(&spec.unk.token),
            tok,
            pad_id,
            source: spiece_path,
        })
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The number of ids, added tokens included (T5 v1.1: 32100).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` tokenizer (no truncation or padding configured).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    /// The words of `prompt` the vocabulary lacks (each read by the model as the unknown
    /// token), in order. A word-level tokenizer such as the default model's knows only its
    /// world's words.
    pub fn unknown_words(&self, prompt: &str) -> Result<Vec<String>> {
        let enc = self.tok.encode(prompt, false).map_err(|e| {
            Error::Msg(format!(
                "{}: cannot tokenize {prompt:?}: {e}",
                self.source.display()
            ))
        })?;
        Ok(self.unknown_in(prompt, &enc))
    }

    fn unknown_in(&self, prompt: &str, enc: &tokenizers::Encoding) -> Vec<String> {
        let Some(unk) = self.unk_id else {
            return Vec::new();
        };
        enc.get_ids()
            .iter()
            .zip(enc.get_offsets())
            .filter(|(id, _)| **id == unk)
            .map(|(_, &(a, b))| prompt.get(a..b).unwrap_or("?").to_string())
            .collect()
    }

    /// Ids of each prompt, exactly `max_len` long: the prompt's tokens (cut from the right to
    /// leave room for the special tokens the post-processor adds, with a warning saying how much
    /// was cut), then the special tokens (`</s>` for T5), then the pad id.
    pub fn encode_padded(&self, prompts: &[&str], max_len: usize) -> Result<Vec<Vec<u32>>> {
        let n_special = self
            .tok
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0);
        if max_len == 0 || max_len < n_special {
            return Err(Error::invalid(
                "max_len",
                format!(
                    "{max_len} leaves no room for the {n_special} special token(s) of {}",
                    self.source.display()
                ),
            ));
        }
        let budget = max_len - n_special;
        let mut out = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let tok_err = |e: tokenizers::Error| {
                Error::Msg(format!(
                    "{}: cannot tokenize prompt {i}: {e}",
                    self.source.display()
                ))
            };
            // Without special tokens: the post-processor runs once, after truncation, as in
            // `tokenizers`' own `encode` with truncation set.
            let mut enc = self.tok.encode(*prompt, false).map_err(tok_err)?;
            let unknown = self.unknown_in(prompt, &enc);
            if !unknown.is_empty() {
                tracing::warn!(
                    prompt = i,
                    unknown = %unknown.join(" "),
                    tokenizer = %self.source.display(),
                    "prompt words not in the tokenizer's vocabulary: the model reads each as the unknown token"
                );
            }
            let full = enc.len();
            if full > budget {
                let removed = self
                    .tok
                    .decode(&enc.get_ids()[budget..], false)
                    .unwrap_or_default();
                tracing::warn!(
                    prompt = i,
                    tokens = full + n_special,
                    max_len,
                    removed_tokens = full - budget,
                    removed_text = %removed,
                    "prompt truncated to max_len tokens; the end of it is ignored"
                );
                enc.truncate(budget, 0, TruncationDirection::Right);
                enc.take_overflowing();
            }
            let enc = self.tok.post_process(enc, None, true).map_err(tok_err)?;
            let mut ids = enc.get_ids().to_vec();
            if ids.len() > max_len {
                return Err(Error::Msg(format!(
                    "{}: the post-processor produced {} ids for prompt {i}, more than max_len {max_len}",
                    self.source.display(),
                    ids.len()
                )));
            }
            ids.resize(max_len, self.pad_id); // pad on the right, as T5's tokenizer does
            out.push(ids);
        }
        Ok(out)
    }
}

/// A special token and the config file that named it (`None`: the T5 default).
#[derive(Debug, Clone)]
struct Named {
    token: String,
    from: Option<PathBuf>,
}

/// The special tokens of a T5 tokenizer folder.
#[derive(Debug, Clone)]
struct T5Specials {
    eos: Named,
    unk: Named,
    pad: Named,
    extra_ids: usize,
    /// Additional special tokens other than the generated `<extra_id_N>`.
    additional: Vec<String>,
}

impl T5Specials {
    /// transformers' `T5Tokenizer.__init__` rules: `extra_ids` sentinels are generated unless
    /// `additional_special_tokens` already lists `<extra_id_…>` tokens, in which case the counts
    /// must agree.
    fn resolve(
        cfg: Option<&(PathBuf, serde_json::Map<String, serde_json::Value>)>,
        map: Option<&(PathBuf, serde_json::Map<String, serde_json::Value>)>,
    ) -> Result<Self> {
        let lookup = |key: &str, default: &str| -> Result<Named> {
            for src in [map, cfg].into_iter().flatten() {
                if let Some(token) = token_field(&src.0, &src.1, key)? {
                    return Ok(Named {
                        token,
                        from: Some(src.0.clone()),
                    });
                }
            }
            Ok(Named {
                token: default.into(),
                from: None,
            })
        };
        let eos = lookup("eos_token", "</s>")?;
        let unk = lookup("unk_token", "<unk>")?;
        let pad = lookup("pad_token", "<pad>")?;
        let extra_ids_from = cfg
            .map(|(f, _)| f.display().to_string())
            .unwrap_or_else(|| "the default".into());
        let extra_ids = match cfg.and_then(|(f, o)| o.get("extra_ids").map(|v| (f, v))) {
            None => DEFAULT_EXTRA_IDS,
            Some((f, v)) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::config(f, "extra_ids", format!("expected a count, found {v}"))
                })?,
        };
        let mut listed = None;
        for (f, o) in [map, cfg].into_iter().flatten() {
            if let Some(v) = o.get("additional_special_tokens") {
                let arr = v.as_array().ok_or_else(|| {
                    Error::config(
                        f,
                        "additional_special_tokens",
                        format!("expected a list, found {v}"),
                    )
                })?;
                let mut toks = Vec::with_capacity(arr.len());
                for (k, t) in arr.iter().enumerate() {
                    toks.push(token_value(t).ok_or_else(|| {
                        Error::config(
                            f,
                            format!("additional_special_tokens[{k}]"),
                            format!("expected a string or {{\"content\": …}}, found {t}"),
                        )
                    })?);
                }
                listed = Some((f.clone(), toks));
                break;
            }
        }
        let additional = match listed {
            None => Vec::new(),
            Some((f, toks)) => {
                let n_sentinels = toks.iter().filter(|t| t.contains("<extra_id_")).count();
                if n_sentinels > 0 && extra_ids > 0 && n_sentinels != extra_ids {
                    return Err(Error::config(
                        &f,
                        "additional_special_tokens",
                        format!(
                            "lists {n_sentinels} <extra_id_N> tokens but extra_ids ({extra_ids_from}) is {extra_ids}; transformers rejects this too"
                        ),
                    ));
                }
                toks.into_iter()
                    .filter(|t| !is_sentinel(t, extra_ids))
                    .collect()
            }
        };
        Ok(Self {
            eos,
            unk,
            pad,
            extra_ids,
            additional,
        })
    }
}

fn is_sentinel(t: &str, extra_ids: usize) -> bool {
    t.strip_prefix("<extra_id_")
        .and_then(|r| r.strip_suffix('>'))
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < extra_ids)
}

/// transformers' T5 conversion of a SentencePiece model into a `tokenizers` pipeline.
fn build_t5_tokenizer(
    sp: &SentencePieceModel,
    path: &Path,
    spec: &T5Specials,
) -> Result<Tokenizer> {
    let bad = |key: &str, msg: String| Error::config(path, key, msg);
    if sp.trainer_spec.model_type != ModelType::Unigram {
        return Err(bad(
            "trainer_spec.model_type",
            format!(
                "{:?}: only SentencePiece unigram models (T5's) are supported",
                sp.trainer_spec.model_type
            ),
        ));
    }
    if sp.trainer_spec.byte_fallback {
        tracing::warn!(file = %path.display(), "byte_fallback is ignored, as transformers' T5Tokenizer ignores it");
    }
    let ns = &sp.normalizer_spec;
    if !ns.add_dummy_prefix || !ns.remove_extra_whitespaces || !ns.escape_whitespaces {
        tracing::warn!(
            file = %path.display(),
            add_dummy_prefix = ns.add_dummy_prefix,
            remove_extra_whitespaces = ns.remove_extra_whitespaces,
            "normalizer_spec flags are ignored, as transformers' T5Tokenizer ignores them (it always splits on whitespace and prefixes ▁)"
        );
    }
    // Vocabulary: the pieces, then the sentinels <extra_id_{n-1}> … <extra_id_0> with score 0.
    let mut vocab: Vec<(String, f64)> = sp
        .pieces
        .iter()
        .map(|p| (p.piece.clone(), f64::from(p.score)))
        .collect();
    vocab.extend(
        (0..spec.extra_ids)
            .rev()
            .map(|i| (format!("<extra_id_{i}>"), 0.0)),
    );
    let find = |t: &Named, key: &str| {
        vocab
            .iter()
            .position(|(p, _)| *p == t.token)
            .ok_or_else(|| {
                let msg = format!(
                    "`{}` is neither a piece of {} nor a sentinel",
                    t.token,
                    path.display()
                );
                match &t.from {
                    Some(f) => Error::config(f, key, msg),
                    None => bad(key, format!("the default {msg}")),
                }
            })
    };
    let unk_id = find(&spec.unk, "unk_token")?;
    let eos_id = find(&spec.eos, "eos_token")?;
    find(&spec.pad, "pad_token")?;
    let model = Unigram::from(vocab, Some(unk_id), false)
        .map_err(|e| bad("pieces", format!("cannot build a unigram model: {e}")))?;
    let mut tok = Tokenizer::new(model);
    if !ns.precompiled_charsmap.is_empty() {
        let norm = Precompiled::from(&ns.precompiled_charsmap).map_err(|e| {
            bad(
                "normalizer_spec.precompiled_charsmap",
                format!("cannot read the compiled normalisation rules: {e}"),
            )
        })?;
        tok.with_normalizer(Some(norm))
            .map_err(|e| bad("normalizer_spec", e.to_string()))?;
    }
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tok.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    let eos_id = u32::try_from(eos_id).map_err(|_| bad("eos_token", "id too large".into()))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("$A {}", spec.eos.token))
        .and_then(|b| b.try_pair(format!("$A {} $B {}", spec.eos.token, spec.eos.token)))
        .map_err(|e| bad("eos_token", format!("cannot build the post-processor: {e}")))?
        .special_tokens(vec![(spec.eos.token.clone(), eos_id)])
        .build()
        .map_err(|e| bad("eos_token", format!("cannot build the post-processor: {e}")))?;
    tok.with_post_processor(Some(post));
    // Tokens matched whole before normalisation: control pieces and the special tokens are
    // special; user-defined pieces are not.
    let mut specials: Vec<AddedToken> = Vec::new();
    let mut push = |t: &str| {
        if !specials.iter().any(|a| a.content == t) {
            specials.push(AddedToken::from(t, true).normalized(false));
        }
    };
    for p in sp.pieces.iter().filter(|p| p.kind == PieceType::Control) {
        push(&p.piece);
    }
    for t in [&spec.eos, &spec.unk, &spec.pad] {
        push(&t.token);
    }
    for i in 0..spec.extra_ids {
        push(&format!("<extra_id_{i}>"));
    }
    for t in &spec.additional {
        push(t);
    }
    tok.add_special_tokens(specials)
        .map_err(|e| bad("additional_special_tokens", e.to_string()))?;
    let user: Vec<AddedToken> = sp
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::UserDefined)
        .map(|p| AddedToken::from(p.piece.clone(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(user)
            .map_err(|e| bad("pieces", e.to_string()))?;
    }
    Ok(tok)
}

/// A JSON file as an object, or `None` when the file does not exist.
fn read_json_object(
    path: &Path,
) -> Result<Option<(PathBuf, serde_json::Map<String, serde_json::Value>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, "<json>", format!("not valid JSON: {e}")))?;
    match v {
        serde_json::Value::Object(o) => Ok(Some((path.to_path_buf(), o))),
        other => Err(Error::config(
            path,
            "<root>",
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A token given as `"text"` or as `{"content": "text", …}` (transformers' `AddedToken`).
fn token_value(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The token under `key`: `None` when absent or null, an error naming the key when malformed.
fn token_field(
    file: &Path,
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => token_value(v).map(Some).ok_or_else(|| {
            Error::config(
                file,
                key,
                format!("expected a string or {{\"content\": …}}, found {v}"),
            )
        }),
    }
}
