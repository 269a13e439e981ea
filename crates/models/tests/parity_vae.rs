//! Parity of `AutoencoderKLCogVideoX` with diffusers 0.42.1 (fixtures from
//! `shared/parity/make_fixtures.py`, tiny random VAE, float32), plus load-error tests.

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use vdit_core::testing::{assert_close, fixture_dir, load_meta, load_tensors};
use vdit_models::autoencoders::{AutoencoderKLCogVideoX, TileOptions};

const TOL: f64 = 1e-4;

/// Loads a fixture's VAE through `AutoencoderKLCogVideoX::load`, from a copy of its
/// `config.json` and weights (the fixture folder also holds the input/output safetensors).
fn load(case: &str) -> AutoencoderKLCogVideoX {
    let tmp = TempCopy::new(case, "load");
    AutoencoderKLCogVideoX::load(&tmp.0, DType::F32, &Device::Cpu).expect("load VAE fixture")
}

#[test]
fn vae_encode_decode() {
    let dir = fixture_dir("vae_encode_decode");
    let vae = load("vae_encode_decode");
    let inputs = load_tensors(&dir.join("inputs.safetensors")).expect("inputs");
    let outputs = load_tensors(&dir.join("outputs.safetensors")).expect("outputs");
    let video = &inputs["video"]; // [1, 3, 17, 16, 24]: encoder batches [0:9], [9:17]
    let post = vae.encode(video).expect("encode");
    assert_close("latent_mean", &post.mean, &outputs["latent_mean"], TOL);
    assert_close(
        "latent_logvar",
        &post.logvar,
        &outputs["latent_logvar"],
        TOL,
    );
    assert_close("mode", &post.mode(), &outputs["latent_mean"], TOL);
    // decoder batches [0:3], [3:5] of the 5 latent frames -> 9 + 8 = 17 frames
    let decoded = vae.decode(&post.mode()).expect("decode");
    assert_eq!(decoded.dims(), &[1, 3, 17, 16, 24]);
    assert_close("decoded", &decoded, &outputs["decoded"], TOL);
    // The decoder alone, from the reference latent (isolates decoder error from encoder error).
    let decoded_ref = vae.decode(&outputs["latent_mean"]).expect("decode");
    assert_close("decoded(ref mean)", &decoded_ref, &outputs["decoded"], TOL);
}

#[test]
fn vae_decode_tiled() {
    let dir = fixture_dir("vae_decode_tiled");
    let mut vae = load("vae_decode_tiled");
    let inputs = load_tensors(&dir.join("inputs.safetensors")).expect("inputs");
    let outputs = load_tensors(&dir.join("outputs.safetensors")).expect("outputs");
    let meta = load_meta(&dir).expect("meta");
    let z = &inputs["z"]; // [1, 4, 7, 6, 8]: 3 decoder batches

    // Tiling is on by default and this latent (6x8) exceeds the default 4x6 latent tile:
    // the plain reference was made with tiling off.
    vae.set_tiling(false);
    let plain = vae.decode(z).expect("plain decode");
    assert_close("decoded (plain)", &plain, &outputs["decoded"], TOL);
    assert_close(
        "decode_plain",
        &vae.decode_plain(z).expect("decode_plain"),
        &outputs["decoded"],
        TOL,
    );

    let t = &meta["tiling"];
    let get = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("meta.tiling.{k}"));
    vae.set_tile_options(TileOptions {
        enabled: true,
        tile_sample_min_height: get("tile_sample_min_height") as usize,
        tile_sample_min_width: get("tile_sample_min_width") as usize,
        tile_overlap_factor_height: get("tile_overlap_factor_height"),
        tile_overlap_factor_width: get("tile_overlap_factor_width"),
    })
    .expect("tile options");
    assert_eq!(
        vae.tile_options().latent_min(8),
        (
            get("tile_latent_min_height") as usize,
            get("tile_latent_min_width") as usize
        )
    );
    let tiled = vae.decode(z).expect("tiled decode");
    assert_close("decoded_tiled", &tiled, &outputs["decoded_tiled"], TOL);
    // The tiled result really differs from the plain one (so the tiled path was taken).
    let d = vdit_core::testing::max_abs_diff(&tiled, &plain).expect("diff");
    assert!(d > 0.1, "tiled decode equals plain decode (max diff {d})");
}

/// A temp copy of a fixture folder, cleaned up on drop.
struct TempCopy(PathBuf);

impl TempCopy {
    fn new(case: &str, tag: &str) -> Self {
        let src = fixture_dir(case);
        let dst = std::env::temp_dir().join(format!(
            "vdit_parity_vae_{case}_{tag}_{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(&dst).expect("temp dir");
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(src.join(f), dst.join(f)).expect("copy fixture");
        }
        Self(dst)
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_err(dir: &Path) -> String {
    match AutoencoderKLCogVideoX::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn misshaped_tensor_is_named() {
    let tmp = TempCopy::new("vae_encode_decode", "shape");
    let file = tmp.0.join("diffusion_pytorch_model.safetensors");
    let mut tensors = load_tensors(&file).expect("weights");
    let key = "decoder.up_blocks.1.resnets.0.conv1.conv.weight";
    // [16, 16, 3, 3, 3] -> [16, 16, 3, 3, 2]
    let bad = tensors[key]
        .narrow(4, 0, 2)
        .and_then(|t| t.contiguous())
        .expect("narrow");
    tensors.insert(key.to_string(), bad);
    candle_core::safetensors::save(&tensors, &file).expect("save");
    let msg = load_err(&tmp.0);
    assert!(msg.contains(key), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(
        msg.contains("[16, 16, 3, 3, 2]") && msg.contains("[16, 16, 3, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn extra_tensor_is_rejected() {
    let tmp = TempCopy::new("vae_encode_decode", "extra");
    let file = tmp.0.join("diffusion_pytorch_model.safetensors");
    let mut tensors = load_tensors(&file).expect("weights");
    tensors.insert(
        "decoder.quant_conv.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"),
    );
    candle_core::safetensors::save(&tensors, &file).expect("save");
    let msg = load_err(&tmp.0);
    assert!(msg.contains("decoder.quant_conv.weight"), "{msg}");
}

#[test]
fn invalid_config_value_is_named() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        (
            "norm_num_groups",
            serde_json::json!(3),
            "block_out_channels",
        ),
        (
            "temporal_compression_ratio",
            serde_json::json!(3),
            "temporal_compression_ratio",
        ),
        (
            "latent_channels",
            serde_json::json!("four"),
            "latent_channels",
        ),
        ("use_quant_conv", serde_json::json!(true), "use_quant_conv"),
        (
            "down_block_types",
            serde_json::json!([
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "DownEncoderBlock2D"
            ]),
            "down_block_types",
        ),
    ];
    for (i, (key, value, named)) in cases.iter().enumerate() {
        let tmp = TempCopy::new("vae_encode_decode", &format!("cfg{i}"));
        let cfg_file = tmp.0.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_file).expect("read")).expect("json");
        cfg[*key] = value.clone();
        std::fs::write(&cfg_file, serde_json::to_string_pretty(&cfg).expect("json"))
            .expect("write");
        let msg = load_err(&tmp.0);
        assert!(
            msg.contains("config.json") && msg.contains(named),
            "{key}={value}: {msg}"
        );
    }
}

#[test]
fn wrong_input_shapes_are_errors() {
    let vae = load("vae_encode_decode");
    let z = Tensor::zeros((1, 3, 2, 2, 3), DType::F32, &Device::Cpu).expect("zeros");
    let e = vae.decode(&z).expect_err("3 latent channels").to_string();
    assert!(e.contains("expected 4 channels"), "{e}");
    let x = Tensor::zeros((3, 5, 16, 24), DType::F32, &Device::Cpu).expect("zeros");
    let e = vae.encode(&x).expect_err("4-d video").to_string();
    assert!(e.contains("[B, 3, F, H, W]"), "{e}");
}
