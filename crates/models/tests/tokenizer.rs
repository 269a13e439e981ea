//! The prompt tokenizer against reference ids made by tests/fixtures/make_tokenizer_fixtures.py:
//! transformers 5.23's `T5Tokenizer` (= `T5TokenizerFast`) and the sentencepiece library on a tiny
//! SentencePiece model trained with T5's settings, and the `tokenizers` library on a word-level
//! `tokenizer.json`, all called as `CogVideoXPipeline` calls its tokenizer.

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vdit_models::text::spiece::{ModelType, PieceType, SentencePieceModel};
use vdit_models::text::tokenizer::TextTokenizer;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer")
        .join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vdit_tok_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn id_rows(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Checks every case of an expected-ids file; `key` selects the reference (`ids` or
/// `sentencepiece_ids`) and `only` the prompts to compare.
fn check_cases(tok: &TextTokenizer, exp: &Value, key: &str, only: &dyn Fn(usize) -> bool) -> usize {
    let prompts = strings(&exp["prompts"]);
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut checked = 0;
    for case in exp["cases"].as_array().unwrap() {
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let want = id_rows(&case[key]);
        let got = tok.encode_padded(&refs, max_len).unwrap();
        assert_eq!(got.len(), prompts.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if !only(i) {
                continue;
            }
            assert_eq!(g.len(), max_len);
            assert_eq!(
                g, w,
                "{key}, max_len {max_len}, prompt {i} {:?}",
                prompts[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn spiece_matches_transformers_t5_tokenizer() {
    let exp = expected("t5_expected.json");
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    assert!(tok.source().ends_with("spiece.model"));
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    assert_eq!(u64::from(tok.pad_id()), exp["pad_id"].as_u64().unwrap());
    let n = check_cases(&tok, &exp, "ids", &|_| true);
    assert_eq!(n, 2 * strings(&exp["prompts"]).len());
}

#[test]
fn spiece_matches_sentencepiece_where_transformers_does() {
    // sentencepiece itself does not match special tokens written in the text; transformers does.
    // On every other prompt the two references agree, and so must we.
    let exp = expected("t5_expected.json");
    let agree: Vec<bool> = serde_json::from_value(exp["sentencepiece_agrees"].clone()).unwrap();
    assert!(agree.iter().filter(|a| **a).count() >= agree.len() - 1);
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    let n = check_cases(&tok, &exp, "sentencepiece_ids", &|i| agree[i]);
    assert!(n >= 2 * (agree.len() - 1));
}

#[test]
fn untruncated_lengths_and_eos_position() {
    let exp = expected("t5_expected.json");
    let prompts = strings(&exp["prompts"]);
    let lens: Vec<usize> = serde_json::from_value(exp["untruncated_len"].clone()).unwrap();
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    let eos = exp["eos_id"].as_u64().unwrap() as u32;
    for (p, n) in prompts.iter().zip(lens) {
        let ids = &tok.encode_padded(&[p.as_str()], 600).unwrap()[0];
        assert_eq!(ids[n - 1], eos, "{p:?}");
        assert!(ids[n..].iter().all(|&i| i == tok.pad_id()), "{p:?}");
        // Over-long at the pipeline's 226: cut, and the last id is still </s>.
        let cut = &tok.encode_padded(&[p.as_str()], 226).unwrap()[0];
        if n > 226 {
            assert_eq!(cut[225], eos);
            assert_eq!(cut[..225], ids[..225]);
        }
    }
}

/// Captures `warn!` events (their message and fields) while a closure runs.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        if *e.metadata().level() == tracing::Level::WARN {
            let mut m = HashMap::new();
            e.record(&mut Fields(&mut m));
            self.0.lock().unwrap().push(m);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn truncation_warns_with_the_amount_cut() {
    let exp = expected("t5_expected.json");
    let prompts = strings(&exp["prompts"]);
    let lens: Vec<usize> = serde_json::from_value(exp["untruncated_len"].clone()).unwrap();
    let long = lens.iter().position(|&n| n > 226).unwrap();
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    // A process-wide subscriber: callsite interest is cached globally, so a thread-scoped one
    // misses events when another test thread registered the callsite first.
    static CAP: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
    let cap = CAP.get_or_init(|| {
        let c = Capture::default();
        tracing::subscriber::set_global_default(c.clone()).expect("no other global subscriber");
        c
    });
    tok.encode_padded(&[prompts[0].as_str(), prompts[long].as_str()], 226)
        .unwrap();
    // Other tests in this binary may warn too: keep only truncation warnings of these two prompts.
    let events: Vec<_> = cap
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            e.contains_key("removed_tokens")
                && (e["tokens"] == lens[long].to_string() || e["tokens"] == lens[0].to_string())
        })
        .cloned()
        .collect();
    assert!(!events.is_empty(), "a warning for the long prompt");
    assert!(
        events.iter().all(|e| e["tokens"] == lens[long].to_string()),
        "no warning for the short prompt: {events:?}"
    );
    let e = events
        .iter()
        .find(|e| e["prompt"] == "1")
        .expect("a warning naming prompt 1");
    assert_eq!(e["prompt"], "1");
    assert_eq!(e["tokens"], lens[long].to_string());
    // Everything beyond 225 prompt tokens (the 226th id is </s>) is cut.
    assert_eq!(e["removed_tokens"], (lens[long] - 226).to_string());
    assert!(e["message"].contains("truncated"), "{e:?}");
    assert!(e["removed_text"].contains("river"), "{e:?}");
}

#[test]
fn spiece_proto_fields() {
    let exp = &expected("t5_expected.json")["proto"];
    let sp = SentencePieceModel::from_file(&fixture("t5_spiece/spiece.model")).unwrap();
    assert_eq!(sp.pieces.len() as u64, exp["n_pieces"].as_u64().unwrap());
    assert_eq!(sp.trainer_spec.model_type, ModelType::Unigram);
    let t = &sp.trainer_spec;
    assert_eq!(
        (t.unk_id, t.eos_id, t.pad_id, t.bos_id),
        (
            exp["unk_id"].as_i64().unwrap() as i32,
            exp["eos_id"].as_i64().unwrap() as i32,
            exp["pad_id"].as_i64().unwrap() as i32,
            exp["bos_id"].as_i64().unwrap() as i32, // -1: a negative int32 on the wire
        )
    );
    assert_eq!(t.byte_fallback, exp["byte_fallback"].as_bool().unwrap());
    let n = &sp.normalizer_spec;
    assert_eq!(n.name, exp["normalizer_name"].as_str().unwrap());
    assert_eq!(
        n.precompiled_charsmap.len() as u64,
        exp["charsmap_len"].as_u64().unwrap()
    );
    assert_eq!(
        n.add_dummy_prefix,
        exp["add_dummy_prefix"].as_bool().unwrap()
    );
    for (p, e) in sp.pieces.iter().zip(exp["pieces"].as_array().unwrap()) {
        assert_eq!(p.piece, e[0].as_str().unwrap());
        assert_eq!(p.score, e[1].as_f64().unwrap() as f32);
        let kind = match e[2].as_u64().unwrap() {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            _ => PieceType::Byte,
        };
        assert_eq!(p.kind, kind, "{}", p.piece);
    }
}

#[test]
fn t5_tokenizer_survives_a_tokenizer_json_round_trip() {
    // The pipeline built from spiece.model, saved as tokenizer.json and loaded through the
    // tokenizer.json path, gives the same ids.
    let exp = expected("t5_expected.json");
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    let d = scratch("t5json");
    tok.inner().save(d.join("tokenizer.json"), false).unwrap();
    let back = TextTokenizer::load(&d).unwrap();
    assert!(back.source().ends_with("tokenizer.json"));
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.pad_id(), tok.pad_id());
    check_cases(&back, &exp, "ids", &|_| true);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn wordlevel_tokenizer_json_matches_tokenizers() {
    let exp = expected("wordlevel_expected.json");
    let tok = TextTokenizer::load(&fixture("wordlevel")).unwrap();
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    assert_eq!(u64::from(tok.pad_id()), exp["pad_id"].as_u64().unwrap());
    let n = check_cases(&tok, &exp, "ids", &|_| true);
    assert_eq!(n, 2 * strings(&exp["prompts"]).len());
}

#[test]
fn wordlevel_round_trip_and_pad_resolution() {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::Tokenizer;
    let words = ["[PAD]", "[UNK]", "a", "red", "cat", "walks", "."];
    let vocab: HashMap<String, u32> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut t = Tokenizer::new(model);
    t.with_pre_tokenizer(Some(Whitespace {}));
    let d = scratch("wordlevel");
    t.save(d.join("tokenizer.json"), false).unwrap();

    // No padding section and no `<pad>` token: a clear error.
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("pad"),
        "{err}"
    );

    // tokenizer_config.json names the pad token.
    std::fs::write(d.join("tokenizer_config.json"), r#"{"pad_token": "[PAD]"}"#).unwrap();
    let tok = TextTokenizer::load(&d).unwrap();
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.vocab_size(), words.len());
    let ids = tok
        .encode_padded(&["a red cat walks .", "a dog"], 8)
        .unwrap();
    assert_eq!(
        ids,
        vec![vec![2, 3, 4, 5, 6, 0, 0, 0], vec![2, 1, 0, 0, 0, 0, 0, 0]]
    );
    assert_eq!(
        tok.inner().decode(&ids[0][..5], false).unwrap(),
        "a red cat walks ."
    );
    // No post-processor: truncation keeps exactly max_len words.
    let ids = tok.encode_padded(&["a red cat walks ."], 3).unwrap();
    assert_eq!(ids, vec![vec![2, 3, 4]]);

    // A padding section in the file wins.
    let mut t = Tokenizer::from_file(d.join("tokenizer.json")).unwrap();
    t.with_padding(Some(tokenizers::PaddingParams {
        pad_id: 6,
        pad_token: ".".into(),
        ..Default::default()
    }));
    t.save(d.join("tokenizer.json"), false).unwrap();
    let tok = TextTokenizer::load(&d).unwrap();
    assert_eq!(tok.pad_id(), 6);
    assert_eq!(tok.encode_padded(&["cat"], 3).unwrap(), vec![vec![4, 6, 6]]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn max_len_edge_cases() {
    let tok = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    let err = tok.encode_padded(&["a cat"], 0).unwrap_err().to_string();
    assert!(err.contains("max_len"), "{err}");
    // Room for </s> only.
    assert_eq!(
        tok.encode_padded(&["a cat", ""], 1).unwrap(),
        vec![vec![1], vec![1]]
    );
    assert!(tok.encode_padded(&[], 226).unwrap().is_empty());
}

fn copy_dir(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn corrupt_files_are_errors_naming_the_file() {
    let good = std::fs::read(fixture("t5_spiece/spiece.model")).unwrap();
    let d = scratch("corrupt");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"this is not a protobuf file at all \xff\xff\xff".to_vec(),
        ),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("text", b"{\"model\": 1}".to_vec()),
    ];
    for (what, bytes) in cases {
        std::fs::write(d.join("spiece.model"), &bytes).unwrap();
        let err = TextTokenizer::load(&d).unwrap_err().to_string();
        assert!(err.contains("spiece.model"), "{what}: {err}");
    }

    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    copy_dir(&fixture("t5_spiece"), &d);
    std::fs::write(d.join("tokenizer_config.json"), r#"{"extra_ids": "many"}"#).unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("extra_ids"),
        "{err}"
    );
    std::fs::write(d.join("tokenizer_config.json"), r#"{"extra_ids": 3}"#).unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(
        err.contains("additional_special_tokens") && err.contains("extra_ids"),
        "{err}"
    );
    std::fs::write(d.join("tokenizer_config.json"), "[1, 2]").unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
    std::fs::remove_file(d.join("special_tokens_map.json")).unwrap();
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": "<eos>"}"#).unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json: eos_token") && err.contains("<eos>"),
        "{err}"
    );
    // Without any config the T5 defaults apply (100 sentinels, </s>, <pad>, <unk>).
    std::fs::remove_file(d.join("tokenizer_config.json")).unwrap();
    let tok = TextTokenizer::load(&d).unwrap();
    assert_eq!(tok.vocab_size(), 300);

    std::fs::write(
        d.join("tokenizer.json"),
        "{\"model\": {\"type\": \"Nope\"}}",
    )
    .unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(d.join("tokenizer.json"), [0xffu8, 0xfe, 0x00]).unwrap();
    let err = TextTokenizer::load(&d).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    let empty = scratch("empty");
    let err = TextTokenizer::load(&empty).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("spiece.model"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn unknown_words_are_named() {
    // The default model's word-level tokenizer knows Shapes World's words only.
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vdit-shapes/tokenizer");
    let tok = TextTokenizer::load(&shapes).unwrap();
    let known = "a large red circle moving slowly right on a black background";
    assert!(tok.unknown_words(known).unwrap().is_empty());
    assert_eq!(
        tok.unknown_words("a large red circle spinning on a pink background")
            .unwrap(),
        ["spinning", "pink"]
    );
    // The unknown words do become the unknown token's id.
    let ids = tok
        .encode_padded(&["a pink circle", "a red circle"], 8)
        .unwrap();
    assert_ne!(ids[0][1], ids[1][1]);
    assert_eq!(ids[0][1], tok.inner().token_to_id("<unk>").unwrap());
    // A SentencePiece T5 tokenizer covers ordinary text.
    let t5 = TextTokenizer::load(&fixture("t5_spiece")).unwrap();
    assert!(t5
        .unknown_words("a large red circle moving slowly right")
        .unwrap()
        .is_empty());
}
