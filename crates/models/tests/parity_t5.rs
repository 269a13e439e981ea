//! T5 encoder parity with transformers 5.23 `T5EncoderModel` (no attention mask, float32, CPU),
//! plus the loader's checks: sharded and tied-embedding checkpoints load, extra tensors and bad
//! configs are clean errors naming the key.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vdit_core::config::load_config;
use vdit_core::testing::{assert_close, fixture_dir, load_tensors, max_abs_diff};
use vdit_models::text::t5::{T5Encoder, T5EncoderConfig};
use vdit_models::text::tokenizer::TextTokenizer;

const TOL: f64 = 1e-4;

fn text_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer")
        .join(name)
}

/// A fresh scratch folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vdit_t5_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// The fixture's inputs and expected output.
fn case() -> (PathBuf, Tensor, Tensor) {
    let dir = fixture_dir("t5_encoder");
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let outputs = load_tensors(&dir.join("outputs.safetensors")).unwrap();
    (
        dir,
        ids_u32(&inputs["input_ids"]),
        outputs["last_hidden_state"].clone(),
    )
}

#[test]
fn t5_encoder_matches_transformers() {
    let (dir, ids, want) = case();
    let enc = T5Encoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let got = enc.forward(&ids).unwrap();
    assert_eq!(got.dims(), &[2, 16, 32]);
    assert_close("t5_encoder last_hidden_state", &got, &want, TOL);

    // i64 ids give the same result, and each row encodes independently of the batch.
    let got64 = enc.forward(&ids.to_dtype(DType::I64).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&got, &got64).unwrap(), 0.0);
    for b in 0..2 {
        let one = enc.forward(&ids.narrow(0, b, 1).unwrap()).unwrap();
        assert_close(
            &format!("t5_encoder row {b} alone"),
            &one,
            &want.narrow(0, b, 1).unwrap(),
            TOL,
        );
    }
}

#[test]
fn fixture_config_is_the_tiny_preset() {
    let (dir, _, _) = case();
    let c: T5EncoderConfig = load_config(&dir.join("config.json")).unwrap();
    c.validate(&dir.join("config.json")).unwrap();
    let t = T5EncoderConfig::tiny();
    let key = |c: &T5EncoderConfig| {
        (
            c.vocab_size,
            c.d_model,
            c.d_kv,
            c.d_ff,
            c.num_layers,
            c.num_heads,
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
            c.layer_norm_epsilon,
            c.feed_forward_proj.clone(),
        )
    };
    assert_eq!(key(&c), key(&t));
    assert_eq!(c.dense_act_fn.as_deref(), Some("gelu_new"));
    T5EncoderConfig::t5_v1_1_xxl()
        .validate(Path::new("preset"))
        .unwrap();
}

/// End to end at the real prompt length: our tokenizer (from `spiece.model`) gives transformers'
/// ids, and a tiny encoder with T5-XXL's bucket settings (32 buckets, max distance 128, so the
/// 16/32/64/128 bucket edges all occur in 226 tokens) gives transformers' hidden states.
#[test]
fn tokenizer_and_encoder_end_to_end_at_226() {
    let dir = text_fixture("t5_text_encoder");
    let expected = load_tensors(&dir.join("expected.safetensors")).unwrap();
    let want_ids = ids_u32(&expected["input_ids"]);
    let tok = TextTokenizer::load(&text_fixture("t5_spiece")).unwrap();
    let ids = tok
        .encode_padded(&["A red cat walks over the bridge.", ""], 226)
        .unwrap();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, (2, 226), &Device::Cpu).unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        want_ids.to_vec2::<u32>().unwrap()
    );

    let cfg: T5EncoderConfig = load_config(&dir.join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance
        ),
        (32, 128)
    );
    let enc = T5Encoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let got = enc.forward(&ids).unwrap();
    assert_close(
        "t5_text_encoder last_hidden_state (226 tokens)",
        &got,
        &expected["last_hidden_state"],
        TOL,
    );
}

/// Copies the fixture's config into `dst` and writes `tensors` as the weights.
fn write_model(dst: &Path, config: &serde_json::Value, tensors: &HashMap<String, Tensor>) {
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dst.join("model.safetensors")).unwrap();
}

fn fixture_parts() -> (serde_json::Value, HashMap<String, Tensor>) {
    let (dir, _, _) = case();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    (cfg, load_tensors(&dir.join("model.safetensors")).unwrap())
}

#[test]
fn sharded_bf16_checkpoint_with_tied_embedding_copy_loads() {
    let (cfg, tensors) = fixture_parts();
    let (_, ids, want) = case();
    let d = scratch("sharded");
    std::fs::write(
        d.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    // Two bf16 shards, as real CogVideoX text_encoder folders are stored, plus the duplicated
    // (tied) embedding that some exports carry.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let mut shard = HashMap::new();
        for k in part {
            shard.insert((*k).clone(), tensors[*k].to_dtype(DType::BF16).unwrap());
            weight_map.insert((*k).clone(), file.into());
        }
        if file.starts_with("model-00002") {
            shard.insert(
                "encoder.embed_tokens.weight".to_string(),
                tensors["shared.weight"].to_dtype(DType::BF16).unwrap(),
            );
            weight_map.insert("encoder.embed_tokens.weight".into(), file.into());
        }
        candle_core::safetensors::save(&shard, d.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let enc = T5Encoder::load(&d, DType::F32, &Device::Cpu).unwrap();
    let got = enc.forward(&ids).unwrap();
    // bf16 weights: close to the f32 reference, not within the f32 tolerance.
    let diff = max_abs_diff(&got, &want).unwrap();
    eprintln!("bf16-stored weights vs f32 reference: max abs diff {diff:.3e}");
    assert!(diff < 0.1, "bf16 shards diverge: {diff}");
    // Computing in bf16 works too.
    let enc16 = T5Encoder::load(&d, DType::BF16, &Device::Cpu).unwrap();
    let got16 = enc16.forward(&ids).unwrap();
    assert_eq!(got16.dtype(), DType::BF16);
    let diff16 = max_abs_diff(&got16, &want).unwrap();
    eprintln!("bf16 compute vs f32 reference: max abs diff {diff16:.3e}");
    assert!(diff16 < 0.25, "bf16 compute diverges: {diff16}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unused_tensor_is_an_error_naming_it() {
    let (cfg, mut tensors) = fixture_parts();
    tensors.insert(
        "encoder.block.0.layer.1.DenseReluDense.wi.weight".into(),
        Tensor::zeros((37, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let d = scratch("extra");
    write_model(&d, &cfg, &tensors);
    let err = T5Encoder::load(&d, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.block.0.layer.1.DenseReluDense.wi.weight")
            && err.contains("not used"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_or_misshapen_tensor_is_an_error_naming_it() {
    let (cfg, mut tensors) = fixture_parts();
    tensors.remove("encoder.final_layer_norm.weight");
    let d = scratch("missing");
    write_model(&d, &cfg, &tensors);
    let err = T5Encoder::load(&d, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder.final_layer_norm.weight"), "{err}");

    let (cfg, mut tensors) = fixture_parts();
    tensors.insert(
        "encoder.block.1.layer.0.SelfAttention.q.weight".into(),
        Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    write_model(&d, &cfg, &tensors);
    let err = T5Encoder::load(&d, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.block.1.layer.0.SelfAttention.q.weight") && err.contains("[32, 31]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_config_values_are_errors_naming_the_key() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        (
            "feed_forward_proj",
            "gated-swish".into(),
            "feed_forward_proj",
        ),
        ("feed_forward_proj", "gelu".into(), "feed_forward_proj"),
        ("dense_act_fn", "gelu".into(), "dense_act_fn"),
        (
            "relative_attention_num_buckets",
            7.into(),
            "relative_attention_num_buckets",
        ),
        (
            "relative_attention_max_distance",
            2.into(),
            "relative_attention_max_distance",
        ),
        ("layer_norm_epsilon", 0.0.into(), "layer_norm_epsilon"),
        ("is_decoder", true.into(), "is_decoder"),
        ("d_model", "32".into(), "d_model"),
    ];
    let (cfg, tensors) = fixture_parts();
    let d = scratch("badcfg");
    for (key, value, named) in cases {
        let mut c = cfg.clone();
        c[*key] = value.clone();
        write_model(&d, &c, &tensors);
        let err = T5Encoder::load(&d, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(named),
            "{key}={value}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_ids_are_errors() {
    let (dir, ids, _) = case();
    let enc = T5Encoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let too_big = Tensor::new(&[[1u32, 1103]], &Device::Cpu).unwrap();
    let err = enc.forward(&too_big).unwrap_err().to_string();
    assert!(err.contains("1103") && err.contains("vocab_size"), "{err}");
    let max = Tensor::new(&[[u32::MAX]], &Device::Cpu).unwrap();
    assert!(enc.forward(&max).is_err());
    let err = enc
        .forward(&ids.flatten_all().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[batch, length]"), "{err}");
    let err = enc
        .forward(&ids.to_dtype(DType::F32).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("u32 or i64"), "{err}");
}
