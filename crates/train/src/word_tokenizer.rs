//! The word-level tokenizer of vdit's default model: one id per Shapes World word.
//!
//! Shapes World captions (SPEC.md, "Captions") use a closed vocabulary of a few dozen lower-case
//! words, so a SentencePiece model is not needed: a `tokenizers` WordLevel model over
//! [`world_vocabulary`] with T5's special-token layout does, and it keeps the T5 embedding tiny.
//!
//! - ids: `<pad>` = 0, `</s>` = 1, `<unk>` = 2 (T5's), then the words in sorted order;
//! - normaliser: lower case (the world's caption parser ignores case too);
//! - pre-tokeniser: `Whitespace` (splits on spaces and between word and punctuation, so
//!   `background,` is `background` `,`);
//! - post-processor: `$A </s>` (pairs `$A </s> $B </s>`), as T5's.
//!
//! The folder written by [`write_tokenizer_folder`] loads in vdit (`TextTokenizer::load`, which
//! reads `tokenizer.json`) and in transformers (`PreTrainedTokenizerFast.from_pretrained` /
//! `AutoTokenizer`), and both give the same ids for
//! `tokenizer(prompts, padding="max_length", max_length=L, truncation=True,
//! add_special_tokens=True)`, the call of diffusers' `CogVideoXPipeline._get_t5_prompt_embeds`:
//! the words, `</s>`, then `<pad>` up to `L` (the fixture test under
//! `tests/fixtures/tokenizer/` checks this against transformers' own ids).

use std::collections::BTreeSet;
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};
use vdit_core::{Error, Result};
use vdit_world::{Background, Colour, Motion, Shape, Size, Split};

pub const PAD_ID: u32 = 0;
pub const EOS_ID: u32 = 1;
pub const UNK_ID: u32 = 2;
pub const PAD_TOKEN: &str = "<pad>";
pub const EOS_TOKEN: &str = "</s>";
pub const UNK_TOKEN: &str = "<unk>";

/// Every word the Shapes World caption sampler can produce (all splits, both templates), plus
/// `,`, sorted, deduplicated.
pub fn world_vocabulary() -> Vec<String> {
    let mut words: BTreeSet<String> = vdit_world::caption::GRAMMAR_WORDS
        .iter()
        .map(|w| w.to_string())
        .collect();
    words.extend(Colour::ALL.iter().map(|c| c.name().to_string()));
    words.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    words.extend(Size::ALL.iter().map(|s| s.name().to_string()));
    words.extend(Background::ALL.iter().map(|b| b.name().to_string()));
    // Directions; the still motion is said with the still phrases above.
    words.extend(
        Motion::ALL
            .iter()
            .filter(|m| **m != Motion::Still)
            .map(|m| m.name().to_string()),
    );
    words.into_iter().collect()
}

/// A WordLevel tokenizer: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, then `words` in the order given;
/// lower-casing normaliser, whitespace pre-tokenizer; appends `</s>`.
pub fn build_tokenizer(words: &[String]) -> Result<Tokenizer> {
    let specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN];
    let mut seen = BTreeSet::new();
    for (i, w) in words.iter().enumerate() {
        let bad = |msg: &str| Error::invalid(format!("words[{i}]"), format!("{w:?} {msg}"));
        if w.is_empty() || w.chars().any(char::is_whitespace) {
            return Err(bad("is empty or contains whitespace"));
        }
        if specials.contains(&w.as_str()) {
            return Err(bad(
                "is a special token (they get ids 0, 1, 2 by themselves)",
            ));
        }
        if *w != w.to_lowercase() {
            return Err(bad(
                "is not lower case (the normaliser lower-cases the input)",
            ));
        }
        if !seen.insert(w.as_str()) {
            return Err(bad("appears twice"));
        }
    }
    let vocab = specials
        .iter()
        .map(|s| s.to_string())
        .chain(words.iter().cloned())
        .enumerate()
        .map(|(i, w)| (w, i as u32));
    let model = WordLevel::builder()
        .vocab(vocab.collect())
        .unk_token(UNK_TOKEN.to_string())
        .build()
        .map_err(|e| Error::Msg(format!("cannot build the word-level model: {e}")))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase))
        .map_err(|e| Error::Msg(format!("cannot set the normaliser: {e}")))?;
    tok.with_pre_tokenizer(Some(Whitespace));
    let post = TemplateProcessing::builder()
        .try_single(format!("$A {EOS_TOKEN}"))
        .and_then(|b| b.try_pair(format!("$A {EOS_TOKEN} $B {EOS_TOKEN}")))
        .map_err(|e| Error::Msg(format!("cannot build the post-processor: {e}")))?
        .special_tokens(vec![(EOS_TOKEN.to_string(), EOS_ID)])
        .build()
        .map_err(|e| Error::Msg(format!("cannot build the post-processor: {e}")))?;
    tok.with_post_processor(Some(post));
    // Matched whole in the raw text, skipped when decoding.
    tok.add_special_tokens(
        specials
            .iter()
            .map(|s| AddedToken::from(*s, true).normalized(false)),
    )
    .map_err(|e| Error::Msg(format!("cannot add the special tokens: {e}")))?;
    Ok(tok)
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`
/// (created if needed) so that both vdit's `TextTokenizer` and transformers load it.
pub fn write_tokenizer_folder(dir: &Path, tok: &Tokenizer, model_max_length: usize) -> Result<()> {
    if model_max_length == 0 {
        return Err(Error::invalid("model_max_length", "must be at least 1"));
    }
    for (name, id) in [
        (PAD_TOKEN, PAD_ID),
        (EOS_TOKEN, EOS_ID),
        (UNK_TOKEN, UNK_ID),
    ] {
        let found = tok.token_to_id(name);
        if found != Some(id) {
            return Err(Error::invalid(
                "tokenizer",
                format!("expected `{name}` to have id {id}, found {found:?}"),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = dir.join("tokenizer.json");
    // Padding and truncation are the caller's (transformers and vdit both set them per call).
    let mut tok = tok.clone();
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| Error::Msg(format!("cannot clear truncation: {e}")))?;
    tok.save(&json, true)
        .map_err(|e| Error::Msg(format!("{}: cannot write: {e}", json.display())))?;
    let added: serde_json::Map<String, serde_json::Value> = [
        (PAD_ID, PAD_TOKEN),
        (EOS_ID, EOS_TOKEN),
        (UNK_ID, UNK_TOKEN),
    ]
    .iter()
    .map(|(id, t)| {
        (
            id.to_string(),
            serde_json::json!({
                "content": t, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true,
            }),
        )
    })
    .collect();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": false,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
    });
    let map = serde_json::json!({
        "pad_token": PAD_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
    });
    for (name, value) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", map),
    ] {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| Error::Msg(format!("{}: {e}", p.display())))?;
        std::fs::write(&p, text + "\n").map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The longest caption, in tokens including `</s>`, over clips `0..n` (world seed 0) of every
/// split, tokenized by [`build_tokenizer`]`(&`[`world_vocabulary`]`())`. A caption with a word
/// outside the vocabulary is an error naming it (the vocabulary would be incomplete).
pub fn longest_caption_tokens(n: u64) -> Result<usize> {
    let tok = build_tokenizer(&world_vocabulary())?;
    let mut longest = 0;
    for &split in Split::ALL {
        for i in 0..n {
            let (_, text) =
                vdit_world::sample_clip(split, 0, i, vdit_world::scene::DEFAULT_DURATION);
            let ids = encode(&tok, &text)?;
            longest = longest.max(ids.len());
        }
    }
    Ok(longest)
}

/// The ids of `text` with `</s>`; a word outside the vocabulary is an error naming it.
fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| Error::Msg(format!("cannot tokenize {text:?}: {e}")))?;
    if let Some(k) = enc.get_ids().iter().position(|&id| id == UNK_ID) {
        let word = enc.get_tokens().get(k).cloned().unwrap_or_default();
        let (a, b) = enc.get_offsets()[k];
        return Err(Error::invalid(
            "caption",
            format!(
                "{text:?}: word {:?} (token {k}) is not in the world vocabulary",
                text.get(a..b).unwrap_or(&word)
            ),
        ));
    }
    Ok(enc.get_ids().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdit_models::text::tokenizer::TextTokenizer;

    fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vdit-wordtok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Many sampled captions of every split: no `<unk>`, and every vocabulary word is used
    /// (the vocabulary is exactly the sampler's words).
    #[test]
    fn vocabulary_is_exactly_the_samplers_words() {
        let vocab = world_vocabulary();
        let mut sorted = vocab.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(vocab, sorted);
        let tok = build_tokenizer(&vocab).unwrap();
        let mut used = BTreeSet::new();
        let mut longest = 0;
        for &split in Split::ALL {
            for i in 0..4000 {
                let (_, text) =
                    vdit_world::sample_clip(split, 7, i, vdit_world::scene::DEFAULT_DURATION);
                let ids = encode(&tok, &text).unwrap();
                // One id per space-separated word, then </s>.
                assert_eq!(ids.len(), text.split(' ').count() + 1, "{text}");
                assert_eq!(*ids.last().unwrap(), EOS_ID);
                for (w, id) in text.split(' ').zip(&ids) {
                    assert_eq!(tok.id_to_token(*id).as_deref(), Some(w), "{text}");
                    used.insert(w.to_string());
                }
                longest = longest.max(ids.len());
            }
        }
        let unused: Vec<_> = vocab.iter().filter(|w| !used.contains(*w)).collect();
        assert!(unused.is_empty(), "never sampled: {unused:?}");
        // 5 words of background phrase + 7 per object (article size colour shape verb speed
        // direction) + "and" + </s>.
        assert_eq!(longest, 21);
        assert_eq!(longest_caption_tokens(2000).unwrap(), 21);
    }

    #[test]
    fn ids_follow_the_t5_layout() {
        let vocab = world_vocabulary();
        let tok = build_tokenizer(&vocab).unwrap();
        assert_eq!(tok.get_vocab_size(true), 3 + vocab.len());
        assert_eq!(tok.token_to_id("<pad>"), Some(PAD_ID));
        assert_eq!(tok.token_to_id("</s>"), Some(EOS_ID));
        assert_eq!(tok.token_to_id("<unk>"), Some(UNK_ID));
        // The words in sorted order after the specials: "," sorts first.
        assert_eq!(tok.token_to_id(","), Some(3));
        assert_eq!(tok.token_to_id("a"), Some(4));
        let id = |w: &str| tok.token_to_id(w).unwrap();
        let want = vec![
            id("on"),
            id("a"),
            id("navy"),
            id("background"),
            id(","),
            id("an"),
            id("orange"),
            id("cross"),
            EOS_ID,
        ];
        let plain = "on a navy background , an orange cross";
        assert_eq!(encode(&tok, plain).unwrap(), want);
        // Case and a comma glued to a word, as the world's parser accepts them.
        let loose = "On a NAVY background, An orange cross";
        assert_eq!(tok.encode(loose, true).unwrap().get_ids(), want.as_slice());
        // Unknown words become <unk>, and `encode` names them.
        let ids = tok.encode("a red hexagon", true).unwrap();
        assert_eq!(ids.get_ids(), &[id("a"), id("red"), UNK_ID, EOS_ID]);
        let e = encode(&tok, "a red hexagon").unwrap_err().to_string();
        assert!(
            e.contains("\"hexagon\"") && e.contains("not in the world vocabulary"),
            "{e}"
        );
        // Without special tokens there is no </s>.
        let ids = tok.encode(plain, false).unwrap();
        assert_eq!(ids.get_ids(), &want[..want.len() - 1]);
    }

    #[test]
    fn bad_words_are_rejected() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (words, needle) in [
            (w(&["red", "red"]), "twice"),
            (w(&["red", "</s>"]), "special"),
            (w(&["Red"]), "lower case"),
            (w(&["red circle"]), "whitespace"),
            (w(&[""]), "empty"),
        ] {
            let e = build_tokenizer(&words).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("words["), "{words:?}: {e}");
        }
        let tok = build_tokenizer(&w(&["x"])).unwrap();
        let dir = tmp_dir("bad");
        let e = write_tokenizer_folder(&dir, &tok, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_max_length"), "{e}");
    }

    /// The folder loads in vdit's inference tokenizer and pads/truncates as the pipeline needs.
    #[test]
    fn folder_loads_in_vdit_text_tokenizer() {
        let tok = build_tokenizer(&world_vocabulary()).unwrap();
        let dir = tmp_dir("folder");
        write_tokenizer_folder(&dir, &tok, 32).unwrap();
        let tt = TextTokenizer::load(&dir).unwrap();
        assert_eq!(tt.pad_id(), PAD_ID);
        assert_eq!(tt.vocab_size(), tok.get_vocab_size(true));
        let long = ["a small red circle moving slowly left"; 6].join(" and ");
        let prompts = [
            "a blue square",
            "on a gray background , a large white triangle going quickly down",
            long.as_str(),
        ];
        let got = tt.encode_padded(&prompts, 32).unwrap();
        for (p, ids) in prompts.iter().zip(&got) {
            assert_eq!(ids.len(), 32);
            let words: Vec<u32> = p
                .split(' ')
                .take(31)
                .map(|w| tok.token_to_id(w).unwrap())
                .collect();
            let mut want = words.clone();
            want.push(EOS_ID);
            want.resize(32, PAD_ID);
            assert_eq!(ids, &want, "{p}");
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["model_max_length"], 32);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed folder is what this code writes today, and vdit's inference tokenizer
    /// gives transformers' ids on it (`tests/fixtures/tokenizer/make_fixture.py`).
    #[test]
    fn matches_transformers_on_the_committed_fixture() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
        let exp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
                .unwrap();
        let prompts: Vec<String> = serde_json::from_value(exp["prompts"].clone()).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
        let max_len = exp["max_length"].as_u64().unwrap() as usize;
        assert!(prompts.len() >= 10 && prompts.len() == want.len());
        let dir = tmp_dir("fixture");
        let tok = build_tokenizer(&world_vocabulary()).unwrap();
        write_tokenizer_folder(&dir, &tok, max_len).unwrap();
        let read = |d: &Path, f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join(f)).unwrap()).unwrap()
        };
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert_eq!(
                read(&dir, f),
                read(&fixture.join("tokenizer"), f),
                "{f} differs from the fixture: regenerate it (make_fixture.py)"
            );
        }
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let got = TextTokenizer::load(&dir)
            .unwrap()
            .encode_padded(&refs, max_len)
            .unwrap();
        for ((p, g), w) in prompts.iter().zip(&got).zip(&want) {
            assert_eq!(g, w, "{p:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
