//! Parity of `CogVideoXTransformer3D` with diffusers' `CogVideoXTransformer3DModel` on the tiny
//! fixtures (`tests/fixtures/parity/transformer_*`, made by `make_fixtures.py`), the RoPE tables
//! of `cogvideox_rotary_pos_embed` against the fixtures' `rope_cos`/`rope_sin` inputs, and the
//! loader's errors on broken model folders.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vdit_core::testing::{assert_close, fixture_dir, load_meta, load_tensors, max_abs_diff};
use vdit_models::transformers::cogvideox::{
    cogvideox_rotary_pos_embed, CogVideoXTransformer3D, CogVideoXTransformerConfig,
};

const TOL: f64 = 1e-4;

/// Loads a fixture's transformer through `CogVideoXTransformer3D::load`, from a copy of its
/// `config.json` and weights (the fixture folder also holds the input/output safetensors, which
/// a model folder must not).
fn load(case: &str, dtype: DType) -> CogVideoXTransformer3D {
    let s = Scratch::new(case, &format!("load_{dtype:?}"));
    std::fs::copy(
        fixture_dir(case).join("diffusion_pytorch_model.safetensors"),
        s.weights_path(),
    )
    .unwrap();
    CogVideoXTransformer3D::load(&s.0, dtype, &Device::Cpu).unwrap()
}

/// Runs a fixture case with the model in `dtype`: f32 takes the CPU kernels; f64 takes the
/// plain candle forms of every layer (the differentiable path training will use).
fn run_case_in(case: &str, dtype: DType) {
    let dir = fixture_dir(case);
    let model = load(case, dtype);
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let outputs = load_tensors(&dir.join("outputs.safetensors")).unwrap();
    let rope = match (inputs.get("rope_cos"), inputs.get("rope_sin")) {
        (Some(c), Some(s)) => Some((c, s)),
        _ => None,
    };
    let y = model
        .forward(
            &inputs["hidden_states"].to_dtype(dtype).unwrap(),
            &inputs["encoder_hidden_states"].to_dtype(dtype).unwrap(),
            &inputs["timestep"],
            rope,
            None,
        )
        .unwrap();
    assert_eq!(y.dtype(), dtype);
    assert_close(
        &format!("{case} ({dtype:?})"),
        &y,
        &outputs["sample"].to_dtype(dtype).unwrap(),
        TOL,
    );
}

fn run_case(case: &str) {
    run_case_in(case, DType::F32);
}

#[test]
fn candle_forms_match_too() {
    for case in [
        "transformer_sincos",
        "transformer_rope",
        "transformer_v15_rope",
    ] {
        run_case_in(case, DType::F64);
    }
}

#[test]
fn transformer_sincos() {
    run_case("transformer_sincos");
}

#[test]
fn transformer_sincos_resized() {
    run_case("transformer_sincos_resized");
}

#[test]
fn transformer_rope() {
    run_case("transformer_rope");
}

#[test]
fn transformer_v15_rope() {
    run_case("transformer_v15_rope");
}

/// The fixtures' cos/sin came from the pipeline's `_prepare_rotary_positional_embeddings` for
/// latents of the input size and a VAE scale of 8 (see `rope_for` in make_fixtures.py).
fn rope_case(case: &str) {
    let dir = fixture_dir(case);
    let cfg: CogVideoXTransformerConfig =
        vdit_core::config::load_config(&dir.join("config.json")).unwrap();
    let meta = load_meta(&dir).unwrap();
    let dims: Vec<usize> = meta["inputs"]["hidden_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (f, h, w) = (dims[1], dims[3], dims[4]);
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let (cos, sin) = cogvideox_rotary_pos_embed(&cfg, h * 8, w * 8, f, 8, &Device::Cpu).unwrap();
    for (name, got, want) in [
        ("cos", &cos, &inputs["rope_cos"]),
        ("sin", &sin, &inputs["rope_sin"]),
    ] {
        let d = max_abs_diff(got, want).unwrap();
        eprintln!("{case} rope {name}: max abs diff {d:.3e}");
        assert!(d <= 1e-6, "{case} rope {name}: {d:e}");
    }
}

#[test]
fn rope_tables_linspace_crop() {
    rope_case("transformer_rope");
}

#[test]
fn rope_tables_slice() {
    rope_case("transformer_v15_rope");
}

/// A scratch copy of a fixture's config and weights, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(case: &str, tag: &str) -> Self {
        let d =
            std::env::temp_dir().join(format!("vdit_parity_{case}_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let src = fixture_dir(case);
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        Self(d)
    }

    fn weights_path(&self) -> PathBuf {
        self.0.join("diffusion_pytorch_model.safetensors")
    }

    fn write_weights(&self, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let src = fixture_dir("transformer_sincos").join("diffusion_pytorch_model.safetensors");
        let mut t = load_tensors(&src).unwrap();
        edit(&mut t);
        candle_core::safetensors::save(&t, self.weights_path()).unwrap();
    }

    fn load_err(&self) -> String {
        match CogVideoXTransformer3D::load(&self.0, DType::F32, &Device::Cpu) {
            Ok(_) => panic!("loading {} should fail", self.0.display()),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_names(err: &str, file: &Path, key: &str) {
    eprintln!("{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "no file name in: {err}"
    );
    assert!(err.contains(key), "no `{key}` in: {err}");
}

#[test]
fn misshaped_tensor_is_rejected() {
    let s = Scratch::new("transformer_sincos", "shape");
    let key = "transformer_blocks.1.attn1.to_k.weight";
    s.write_weights(|t| {
        t.insert(
            key.into(),
            Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = s.load_err();
    assert_names(&e, &s.weights_path(), key);
    assert!(e.contains("[32, 31]") && e.contains("[32, 32]"), "{e}");
}

#[test]
fn missing_tensor_is_rejected() {
    let s = Scratch::new("transformer_sincos", "missing");
    let key = "norm_out.linear.bias";
    s.write_weights(|t| {
        t.remove(key);
    });
    assert_names(&s.load_err(), &s.weights_path(), key);
}

#[test]
fn extra_tensor_is_rejected() {
    let s = Scratch::new("transformer_sincos", "extra");
    let key = "transformer_blocks.2.attn1.to_q.weight";
    s.write_weights(|t| {
        t.insert(
            key.into(),
            Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_names(&s.load_err(), &s.weights_path(), key);
}

#[test]
fn invalid_config_values_are_rejected() {
    let s = Scratch::new("transformer_sincos", "config");
    s.write_weights(|_| {});
    let file = s.0.join("config.json");
    let orig = std::fs::read_to_string(&file).unwrap();
    for (key, from, to) in [
        ("activation_fn", "\"gelu-approximate\"", "\"relu\""),
        ("patch_size", "\"patch_size\": 2", "\"patch_size\": 0"),
        ("num_layers", "\"num_layers\": 2", "\"num_layers\": \"two\""),
        (
            "use_learned_positional_embeddings",
            "\"use_learned_positional_embeddings\": false",
            "\"use_learned_positional_embeddings\": true",
        ),
    ] {
        assert!(orig.contains(from), "{from}");
        std::fs::write(&file, orig.replacen(from, to, 1)).unwrap();
        assert_names(&s.load_err(), &file, key);
    }
    // and the untouched copy loads
    std::fs::write(&file, &orig).unwrap();
    CogVideoXTransformer3D::load(&s.0, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn bad_inputs_are_errors() {
    let model = load("transformer_sincos", DType::F32);
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 2, 4, 8, 12), DType::F32, &dev).unwrap();
    let e = Tensor::zeros((1, 7, 24), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[10f32], &dev).unwrap();
    model.forward(&x, &e, &t, None, None).unwrap();
    let odd = Tensor::zeros((1, 2, 4, 9, 12), DType::F32, &dev).unwrap();
    let msg = model
        .forward(&odd, &e, &t, None, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("patch_size"), "{msg}");
    let chans = Tensor::zeros((1, 2, 3, 8, 12), DType::F32, &dev).unwrap();
    let msg = model
        .forward(&chans, &e, &t, None, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("in_channels"), "{msg}");
    let cos = Tensor::zeros((48, 16), DType::F32, &dev).unwrap();
    let msg = model
        .forward(&x, &e, &t, Some((&cos, &cos)), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rotary"), "{msg}");
}
