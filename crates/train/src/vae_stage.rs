//! The VAE stage (`stage = "vae"`): trains an `AutoencoderKLCogVideoX` ([`TrainVae`]) on
//! Shapes World clips by reconstruction + KL, and exports a diffusers `vae/` folder.
//!
//! `[model]` of the run's config:
//!
//! ```toml
//! [model]
//! kl_weight = 1e-6       # weight of the KL term (LDM's scale, see below)
//! l1_weight = 0.0        # weight of an extra mean |x̂ - x| term
//! scaling_clips = 32     # 64x64x17 training clips the exported scaling_factor is measured on
//! init_logvar = -6.0     # initial bias of the encoder's log-variance outputs
//! zero_init_residual = true # resnet blocks start as their shortcut (conv2 weights 0)
//! decoder_of = "runs/vae/export" # optional: fine-tune this VAE's decoder, its encoder frozen
//! [model.vae]            # AutoencoderKLCogVideoX's config.json fields, diffusers' names
//! block_out_channels = [32, 64, 64]
//! down_block_types = ["CogVideoXDownBlock3D", "CogVideoXDownBlock3D", "CogVideoXDownBlock3D"]
//! up_block_types = ["CogVideoXUpBlock3D", "CogVideoXUpBlock3D", "CogVideoXUpBlock3D"]
//! latent_channels = 16
//! layers_per_block = 1
//! norm_num_groups = 8
//! sample_height = 256    # tiles are half of this: no tiling up to 128 px
//! sample_width = 256
//! ```
//!
//! Loss of a batch x `[B, 3, F, H, W]` in [-1, 1]: (mean, logvar) = encode(x), z = mean +
//! exp(logvar/2)·ε (ε from the step's rng), x̂ = decode(z), and
//! `mean((x̂ − x)²) + l1_weight·mean|x̂ − x| + kl_weight·ΣKL / #pixels`: LDM's per-sample sums
//! (squared error summed over pixels, plus kl_weight times the KL summed over the latent)
//! divided by the pixel count, so `kl_weight` has LDM's scale. Metrics: `mse` (of x̂, [-1, 1]
//! scale), `psnr` (of the batch after 8-bit quantisation, as a video file would store it) and
//! `kl` (mean KL per latent element, nats).
//!
//! With `decoder_of` (a diffusers `vae/` folder) the run starts from that VAE, its architecture
//! and weights (no `[model.vae]` then), and trains only the decoder (`decoder.*`,
//! `post_quant_conv.*`): the encoder, and so the latent space a transformer was trained on,
//! stays bit for bit the folder's, and so does the exported `scaling_factor`.
//!
//! Export: `config.json` (`_class_name` `AutoencoderKLCogVideoX`, every config field) and
//! `diffusion_pytorch_model.safetensors`, with `scaling_factor` = 1/std of posterior samples of
//! `scaling_clips` fixed training clips (indices 0.., 64x64x17, the run's data settings), so
//! that scaled latents have unit variance.

use crate::config::TrainConfig;
use crate::data::{render_clips, Batch, Bucket};
use crate::init::SeededVarMap;
use crate::objective::{kl_diag_gaussian, posterior_sample, randn};
use crate::trainable::{save_weights, LossOutput, Trainable};
use crate::vae_train::{decoded_frames, latent_frames, TrainVae};
use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use vdit_core::{Error, Result};
use vdit_models::autoencoders::cogvideox_vae::{
    AutoencoderKLCogVideoX, AutoencoderKLCogVideoXConfig, TileOptions,
};

/// The diffusers version written into the exported `config.json`.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// `[model]` of a VAE run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeStageConfig {
    /// The architecture, as `config.json` fields (diffusers' names and defaults). Its
    /// `scaling_factor` is replaced by the measured one at export.
    pub vae: AutoencoderKLCogVideoXConfig,
    /// Weight of the KL term (LDM's scale: per-sample KL sum against the per-sample squared
    /// error sum). Default 1e-6.
    pub kl_weight: f64,
    /// Weight of an extra L1 term, mean |x̂ − x|. Default 0.
    pub l1_weight: f64,
    /// Clips (64x64, 17 frames) the exported `scaling_factor` is measured on. Default 32.
    pub scaling_clips: usize,
    /// Initial bias of the encoder's log-variance outputs (the second half of
    /// `encoder.conv_out.conv.bias`): a small initial posterior std (e^(-6/2) ≈ 0.05) lets the
    /// decoder see the latent means from the first steps instead of unit noise. Default -6.
    pub init_logvar: f64,
    /// Zero-initialise the second conv of every resnet block (`...resnets.N.conv2.conv.weight`),
    /// so each block starts as its shortcut and the deep encoder/decoder trains like a shallow
    /// one at first (SkipInit/Fixup). Default true.
    pub zero_init_residual: bool,
    /// A diffusers `vae/` folder whose decoder is fine-tuned, its encoder frozen (the
    /// architecture is the folder's: `model.vae` must not be given). Default none.
    pub decoder_of: Option<std::path::PathBuf>,
}

impl Default for VaeStageConfig {
    fn default() -> Self {
        Self {
            vae: AutoencoderKLCogVideoXConfig::default(),
            kl_weight: 1e-6,
            l1_weight: 0.0,
            scaling_clips: 32,
            init_logvar: -6.0,
            zero_init_residual: true,
            decoder_of: None,
        }
    }
}

impl VaeStageConfig {
    /// Reads `[model]`; unknown keys (also inside `vae`) and bad values are errors naming
    /// `model.<key>`.
    pub fn from_value(file: &Path, model: &serde_json::Value) -> Result<Self> {
        // AutoencoderKLCogVideoXConfig accepts unknown keys (config.json files carry
        // `_class_name` and such); in a training config a typo must be an error.
        if let Some(vae) = model.get("vae").and_then(|v| v.as_object()) {
            let known = serde_json::to_value(AutoencoderKLCogVideoXConfig::default())
                .map_err(|e| Error::Msg(e.to_string()))?;
            let known = known.as_object().expect("a struct serialises to an object");
            if let Some(k) = vae.keys().find(|k| !known.contains_key(*k)) {
                let mut names: Vec<&String> = known.keys().collect();
                names.sort();
                return Err(Error::config(
                    file,
                    format!("model.vae.{k}"),
                    format!(
                        "unknown field, expected one of {}",
                        names
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let mut cfg: Self = serde_path_to_error::deserialize(model.clone()).map_err(|e| {
            Error::config(file, format!("model.{}", e.path()), e.inner().to_string())
        })?;
        if let Some(dir) = &cfg.decoder_of {
            // The architecture and every initial weight are the folder's.
            for key in ["vae", "init_logvar", "zero_init_residual"] {
                if model.get(key).is_some() {
                    return Err(Error::config(
                        file,
                        format!("model.{key}"),
                        format!(
                            "not used with model.decoder_of: the VAE is {}'s (config.json and weights)",
                            dir.display()
                        ),
                    ));
                }
            }
            let src = dir.join("config.json");
            cfg.vae = vdit_core::config::load_config(&src)?;
            cfg.vae.validate(&src)?;
        }
        cfg.vae.validate(file).map_err(|e| match e {
            Error::Config { file, key, msg } => Error::Config {
                file,
                key: format!("model.vae.{key}"),
                msg,
            },
            other => other,
        })?;
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if !nonneg(cfg.kl_weight) {
            return Err(Error::config(
                file,
                "model.kl_weight",
                format!("expected a number >= 0, found {}", cfg.kl_weight),
            ));
        }
        if !nonneg(cfg.l1_weight) {
            return Err(Error::config(
                file,
                "model.l1_weight",
                format!("expected a number >= 0, found {}", cfg.l1_weight),
            ));
        }
        if !(cfg.init_logvar.is_finite() && (-30.0..=20.0).contains(&cfg.init_logvar)) {
            return Err(Error::config(
                file,
                "model.init_logvar",
                format!("expected a number in [-30, 20], found {}", cfg.init_logvar),
            ));
        }
        if cfg.scaling_clips == 0 {
            return Err(Error::config(
                file,
                "model.scaling_clips",
                "expected at least 1, found 0",
            ));
        }
        Ok(cfg)
    }

    /// Checks that the VAE reproduces the bucket's shape and that inference would not tile it.
    fn check_bucket(&self, b: &Bucket) -> std::result::Result<(), String> {
        let v = &self.vae;
        let s = v.spatial_compression();
        if !b.width.is_multiple_of(s) || !b.height.is_multiple_of(s) {
            return Err(format!(
                "{}x{} is not divisible by the VAE's spatial compression {s}",
                b.width, b.height
            ));
        }
        let back = decoded_frames(v, latent_frames(v, b.frames));
        if back != b.frames {
            return Err(format!(
                "{} frames encode to {} latent frames, which decode to {back} (diffusers' frame \
                 batching): choose a frame count that comes back (1 or 8k+1 at 4x)",
                b.frames,
                latent_frames(v, b.frames)
            ));
        }
        let t = TileOptions::for_config(v);
        if b.width > t.tile_sample_min_width || b.height > t.tile_sample_min_height {
            return Err(format!(
                "{}x{} would be tiled by the inference VAE (tiles of {}x{} px): raise \
                 model.vae.sample_width/sample_height to at least twice the bucket size",
                b.width, b.height, t.tile_sample_min_width, t.tile_sample_min_height
            ));
        }
        Ok(())
    }
}

/// The VAE stage: the model, its vars and the loss settings.
pub struct VaeStage {
    cfg: VaeStageConfig,
    run: TrainConfig,
    vars: SeededVarMap,
    model: TrainVae,
    dev: Device,
}

impl VaeStage {
    /// Builds the VAE of `cfg.model` with seeded fresh weights (`cfg.seed`).
    pub fn new(cfg: &TrainConfig, dev: &Device) -> Result<Self> {
        let file = Path::new("<config>");
        let sc = VaeStageConfig::from_value(file, &cfg.model)?;
        for (i, b) in cfg.data.buckets.iter().enumerate() {
            sc.check_bucket(b)
                .map_err(|msg| Error::config(file, format!("data.buckets[{i}]"), msg))?;
        }
        let zero_residual = sc.zero_init_residual;
        let rule = move |name: &str, shape: &[usize], hint: candle_nn::Init| {
            if zero_residual && name.contains(".resnets.") && name.ends_with(".conv2.conv.weight") {
                candle_nn::Init::Const(0.0)
            } else {
                crate::init::default_rule(name, shape, hint)
            }
        };
        let vars = SeededVarMap::with_rule(cfg.seed, std::sync::Arc::new(rule));
        let model = TrainVae::new(&sc.vae, vars.var_builder(DType::F32, dev))
            .map_err(vdit_core::weights::build_error)?;
        // Initial posterior: [mean biases 0 | log-variance biases init_logvar].
        let lc = sc.vae.latent_channels;
        let name = "encoder.conv_out.conv.bias";
        let bias = vars
            .vars()
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Msg(format!("the VAE has no var {name}")))?
            .1;
        let init: Vec<f32> = (0..2 * lc)
            .map(|i| if i < lc { 0.0 } else { sc.init_logvar as f32 })
            .collect();
        bias.set(&Tensor::from_vec(init, 2 * lc, dev)?)?;
        if let Some(dir) = &sc.decoder_of {
            // Every var from the folder (the frozen encoder too); a resumed run then sets the
            // decoder from its checkpoint.
            let mut tensors = std::collections::HashMap::new();
            for f in vdit_core::weights::find_safetensors(dir)? {
                let t = candle_core::safetensors::load(&f, dev)
                    .map_err(|e| Error::Weights(format!("{}: {e}", f.display())))?;
                tensors.extend(t);
            }
            crate::trainer::set_vars(&vars.vars(), &tensors, dir)?;
        }
        Ok(Self {
            cfg: sc,
            run: cfg.clone(),
            vars,
            model,
            dev: dev.clone(),
        })
    }

    pub fn model(&self) -> &TrainVae {
        &self.model
    }

    pub fn stage_config(&self) -> &VaeStageConfig {
        &self.cfg
    }

    /// 1/std of posterior samples of the scaling clips under `vae`.
    pub fn measure_scaling_factor(&self, vae: &AutoencoderKLCogVideoX) -> Result<f64> {
        let bucket = Bucket {
            width: 64,
            height: 64,
            frames: 17,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        };
        let mut rng = crate::data::step_rng(self.run.seed, "vae-scaling", 0);
        let (mut sum, mut sum2, mut n) = (0f64, 0f64, 0usize);
        let indices: Vec<u64> = (0..self.cfg.scaling_clips as u64).collect();
        for chunk in indices.chunks(8) {
            let px = render_clips(
                &self.run.data,
                self.run.world_seed(),
                &bucket,
                chunk,
                &self.dev,
            )?
            .pixels;
            let post = vae.encode_plain(&px)?;
            let eps = randn(post.mean.dims(), &mut rng, &self.dev)?;
            let z = post.sample(&eps)?.to_dtype(DType::F64)?.flatten_all()?;
            sum += z.sum_all()?.to_scalar::<f64>()?;
            sum2 += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
            n += z.elem_count();
        }
        let mean = sum / n as f64;
        let std = (sum2 / n as f64 - mean * mean).max(0.0).sqrt();
        if !(std.is_finite() && std > 0.0) {
            return Err(Error::Msg(format!(
                "the VAE's latents have standard deviation {std}: cannot set scaling_factor"
            )));
        }
        Ok(1.0 / std)
    }
}

/// Writes an integral `temporal_compression_ratio` of a VAE `config.json` as an integer (`4`, as
/// in the upstream checkpoints): diffusers' `CogVideoXPipeline` computes the latent frame count
/// as `(num_frames - 1) // ratio + 1`, and a float there (`4.0`) makes its `torch.randn` fail on
/// a float size.
pub(crate) fn integral_temporal_ratio(config: &mut serde_json::Value) {
    if let Some(r) = config.get_mut("temporal_compression_ratio") {
        if let Some(f) = r.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0) {
            *r = serde_json::Value::from(f as u64);
        }
    }
}

/// A var of the decoder side (trained with `decoder_of`): `decoder.*` and `post_quant_conv.*`.
fn is_decoder_var(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// PSNR in dB of `pred` against `target` (both in [-1, 1]) after 8-bit quantisation (capped
/// at 99 dB for identical frames).
pub fn psnr_8bit(pred: &Tensor, target: &Tensor) -> Result<f64> {
    let q = |x: &Tensor| -> Result<Tensor> {
        Ok(((x.detach().to_dtype(DType::F64)? + 1.0)? * 127.5)?
            .clamp(0.0, 255.0)?
            .round()?)
    };
    let mse = (q(pred)? - q(target)?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(if mse <= 0.0 {
        99.0
    } else {
        (10.0 * (255.0f64 * 255.0 / mse).log10()).min(99.0)
    })
}

impl Trainable for VaeStage {
    fn vars(&self) -> Vec<(String, Var)> {
        let all = self.vars.vars();
        if self.cfg.decoder_of.is_some() {
            all.into_iter().filter(|(n, _)| is_decoder_var(n)).collect()
        } else {
            all
        }
    }

    fn loss(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<LossOutput> {
        let x = &batch.pixels; // [B, 3, F, H, W]
        let (mean, logvar) = self.model.encode(x)?;
        let (mean, logvar) = if self.cfg.decoder_of.is_some() {
            (mean.detach(), logvar.detach()) // the encoder is frozen: no backward through it
        } else {
            (mean, logvar)
        };
        let z = posterior_sample(&mean, &logvar, rng)?;
        let rec = self.model.decode(&z)?; // [B, 3, F, H, W]
        let diff = (&rec - x)?;
        let mse = diff.sqr()?.mean_all()?;
        let kl = kl_diag_gaussian(&mean, &logvar)?.sum_all()?; // summed over the batch
        let mut loss = (&mse + (kl.clone() * (self.cfg.kl_weight / x.elem_count() as f64))?)?;
        let mut metrics = Vec::new();
        if self.cfg.l1_weight > 0.0 {
            let l1 = diff.abs()?.mean_all()?;
            metrics.push(("l1".to_string(), l1.to_scalar::<f32>()? as f64));
            loss = (loss + (l1 * self.cfg.l1_weight)?)?;
        }
        metrics.push(("mse".to_string(), mse.to_scalar::<f32>()? as f64));
        metrics.push(("psnr".to_string(), psnr_8bit(&rec, x)?));
        metrics.push((
            "kl".to_string(),
            kl.to_scalar::<f32>()? as f64 / mean.elem_count() as f64,
        ));
        Ok(LossOutput { loss, metrics })
    }

    fn export(&self, dir: &Path, weights: &[(String, Tensor)]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut weights = weights.to_vec();
        if self.cfg.decoder_of.is_some() {
            // The frozen encoder, as loaded.
            weights.extend(
                self.vars
                    .vars()
                    .into_iter()
                    .filter(|(n, _)| !is_decoder_var(n))
                    .map(|(n, v)| (n, v.as_tensor().detach())),
            );
            weights.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let weights = &weights[..];
        let map: std::collections::HashMap<String, Tensor> = weights.iter().cloned().collect();
        let mut vcfg = self.cfg.vae.clone();
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &self.dev);
        let mut vae = AutoencoderKLCogVideoX::new(vcfg.clone(), vb)
            .map_err(vdit_core::weights::build_error)?;
        vae.set_tiling(false);
        if self.cfg.decoder_of.is_none() {
            // (with a frozen encoder the folder's scaling_factor holds: the latents are its)
            vcfg.scaling_factor = self.measure_scaling_factor(&vae)?;
        }
        tracing::info!(scaling_factor = vcfg.scaling_factor, "VAE export");
        let mut json = serde_json::to_value(&vcfg).map_err(|e| Error::Msg(e.to_string()))?;
        let obj = json
            .as_object_mut()
            .expect("a struct serialises to an object");
        obj.insert("_class_name".into(), "AutoencoderKLCogVideoX".into());
        obj.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
        integral_temporal_ratio(&mut json);
        let mut bytes = serde_json::to_vec_pretty(&json).map_err(|e| Error::Msg(e.to_string()))?;
        bytes.push(b'\n');
        save_weights(&dir.join("diffusion_pytorch_model.safetensors"), weights)?;
        crate::checkpoint::write_atomic(&dir.join("config.json"), &bytes)?;
        // The folder must load as the inference engine will load it.
        AutoencoderKLCogVideoX::load(dir, DType::F32, &Device::Cpu)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::assert_all_vars_get_grads;
    use vdit_world::Split;

    fn tiny_model() -> serde_json::Value {
        serde_json::json!({
            "kl_weight": 1e-4,
            "scaling_clips": 4,
            "vae": {
                "block_out_channels": [8, 16, 16],
                "down_block_types": ["CogVideoXDownBlock3D", "CogVideoXDownBlock3D", "CogVideoXDownBlock3D"],
                "up_block_types": ["CogVideoXUpBlock3D", "CogVideoXUpBlock3D", "CogVideoXUpBlock3D"],
                "latent_channels": 4,
                "layers_per_block": 1,
                "norm_num_groups": 4,
                "sample_height": 64,
                "sample_width": 64
            }
        })
    }

    fn tiny_run(out: &Path) -> TrainConfig {
        let mut cfg = TrainConfig {
            stage: crate::Stage::Vae,
            out_dir: out.to_path_buf(),
            steps: 12,
            batch_size: 2,
            checkpoint_every: 100,
            plot_every: 100,
            model: tiny_model(),
            ..Default::default()
        };
        cfg.data.split = Split::Train;
        cfg.data.num_clips = Some(2);
        cfg.data.antialias = false;
        cfg.data.buckets = vec![Bucket {
            width: 32,
            height: 32,
            frames: 9,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        }];
        cfg.optim.lr = 3e-3;
        cfg.optim.warmup_steps = 1;
        cfg.ema.decay = 0.0;
        cfg
    }

    #[test]
    fn every_var_gets_a_gradient() {
        let mut cfg = tiny_run(Path::new("unused"));
        let dev = Device::Cpu;
        // The default zero-initialised residual convs start with exactly zero weights (their
        // upstream vars get zero gradients at step 0, so the graph check below turns it off).
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        for (name, v) in stage.vars().into_iter().filter(|(_, v)| v.rank() > 1) {
            let amax = v.as_tensor().abs().unwrap().max_all().unwrap();
            let zero = amax.to_scalar::<f32>().unwrap() == 0.0;
            assert_eq!(zero, name.ends_with("conv2.conv.weight"), "{name}");
        }
        let lv = stage
            .vars()
            .into_iter()
            .find(|(n, _)| n == "encoder.conv_out.conv.bias")
            .unwrap();
        assert_eq!(
            lv.1.as_tensor().to_vec1::<f32>().unwrap(),
            [0., 0., 0., 0., -6., -6., -6., -6.]
        );
        cfg.model["zero_init_residual"] = false.into();
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let vars = stage.vars();
        assert!(vars
            .iter()
            .any(|(n, _)| n == "decoder.norm_out.conv_y.conv.weight"));
        assert!(vars
            .iter()
            .any(|(n, _)| n == "encoder.down_blocks.0.resnets.0.norm1.weight"));
        let mut data = cfg.data.clone();
        data.buckets[0].frames = 17; // two encoder calls, three decoder calls
        let b = &crate::data::batches_for_step(&data, 0, 0, 2, 1, 0, &dev).unwrap()[0];
        let mut rng = crate::data::step_rng(0, "loss", 0);
        let out = stage.loss(b, &mut rng).unwrap();
        assert_eq!(out.loss.rank(), 0);
        let names: Vec<&str> = out.metrics.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(names, ["mse", "psnr", "kl"]);
        let g = out.loss.backward().unwrap();
        assert_all_vars_get_grads(&vars, &g).unwrap();
    }

    #[test]
    fn training_lowers_the_loss_and_exports_a_loadable_folder() {
        let dir = std::env::temp_dir().join(format!("vdit-vae-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = tiny_run(&dir);
        let dev = Device::Cpu;
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let summary =
            crate::trainer::train(&cfg, &stage, &dev, false, &mut |_| crate::Control::Continue)
                .unwrap();
        let losses: Vec<f64> = summary.log.iter().map(|r| r.loss).collect();
        let psnr: Vec<f64> = summary.log.iter().map(|r| r.metrics["psnr"]).collect();
        eprintln!("losses {losses:?}\npsnr {psnr:?}");
        let first = losses[..3].iter().sum::<f64>() / 3.0;
        let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(last < 0.7 * first, "loss {first} -> {last}");
        // The exported folder loads in the inference engine and computes what we trained.
        let export = summary.export.expect("exported");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(export.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["_class_name"], "AutoencoderKLCogVideoX");
        assert_eq!(json["_diffusers_version"], DIFFUSERS_VERSION);
        assert_eq!(json["block_out_channels"], serde_json::json!([8, 16, 16]));
        assert_eq!(json["temporal_compression_ratio"], serde_json::json!(4)); // an integer
        let mut vae = AutoencoderKLCogVideoX::load(&export, DType::F32, &dev).unwrap();
        vae.set_tiling(false);
        let sf = json["scaling_factor"].as_f64().unwrap();
        // (the inference model's parallel norm sums may round differently from run to run)
        let again = stage.measure_scaling_factor(&vae).unwrap();
        assert!((sf - again).abs() < 1e-5 * sf, "{sf} vs {again}");
        assert!(sf.is_finite() && sf > 0.0);
        let px = render_clips(&cfg.data, 9, &cfg.data.buckets[0], &[5], &dev)
            .unwrap()
            .pixels;
        let (mean, logvar) = stage.model().encode(&px).unwrap();
        let post = vae.encode(&px).unwrap();
        let rec = stage.model().decode(&mean).unwrap();
        let want = vae.decode(&post.mean).unwrap();
        let d = [
            vdit_core::testing::max_abs_diff(&mean, &post.mean).unwrap(),
            vdit_core::testing::max_abs_diff(&logvar, &post.logvar).unwrap(),
            vdit_core::testing::max_abs_diff(&rec, &want).unwrap(),
        ];
        eprintln!("export round trip max diffs {d:?}");
        assert!(d.iter().all(|&x| x < 1e-4), "{d:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `decoder_of`: only the decoder trains; the exported encoder and scaling_factor are the
    /// source folder's bit for bit, also across a resume (the encoder is reloaded from the
    /// folder, the decoder from the checkpoint).
    #[test]
    fn decoder_of_trains_the_decoder_and_keeps_the_encoder() {
        let dir = std::env::temp_dir().join(format!("vdit-vae-decoder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dev = Device::Cpu;
        let mut src_cfg = tiny_run(&dir.join("src"));
        src_cfg.steps = 4;
        let src_stage = VaeStage::new(&src_cfg, &dev).unwrap();
        let src = crate::trainer::train(&src_cfg, &src_stage, &dev, false, &mut |_| {
            crate::Control::Continue
        })
        .unwrap()
        .export
        .unwrap();

        let mut cfg = tiny_run(&dir.join("ft"));
        cfg.model = serde_json::json!({ "scaling_clips": 4, "decoder_of": src });
        cfg.steps = 6;
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let names: Vec<String> = stage.vars().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| n.starts_with("decoder.")), "{names:?}");
        assert!(names
            .iter()
            .any(|n| n == "decoder.norm_out.conv_y.conv.weight"));
        let stop = |p: &crate::Progress| {
            if p.step >= 3 {
                crate::Control::Stop
            } else {
                crate::Control::Continue
            }
        };
        crate::trainer::train(&cfg, &stage, &dev, false, &mut { stop }).unwrap();
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let out =
            crate::trainer::train(&cfg, &stage, &dev, true, &mut |_| crate::Control::Continue)
                .unwrap();
        assert_eq!(out.log.len(), 6);
        let read = |d: &Path| {
            let w =
                candle_core::safetensors::load(d.join("diffusion_pytorch_model.safetensors"), &dev)
                    .unwrap();
            let c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
            (w, c)
        };
        let (a, ac) = read(&src);
        let (b, bc) = read(&out.export.unwrap());
        assert_eq!(ac, bc, "config.json, scaling_factor included");
        let mut keys: Vec<&String> = a.keys().collect();
        keys.sort();
        assert_eq!(keys, {
            let mut k: Vec<&String> = b.keys().collect();
            k.sort();
            k
        });
        let mut decoder_moved = false;
        for k in keys {
            let d = vdit_core::testing::max_abs_diff(&a[k], &b[k]).unwrap();
            if is_decoder_var(k) {
                decoder_moved |= d > 0.0;
            } else {
                assert_eq!(d, 0.0, "{k} changed");
            }
        }
        assert!(decoder_moved);

        // Errors name the key or the folder.
        let mut bad = cfg.clone();
        bad.model["vae"] = tiny_model()["vae"].clone();
        let e = VaeStage::new(&bad, &dev).err().unwrap().to_string();
        assert!(e.contains("model.vae") && e.contains("decoder_of"), "{e}");
        bad.model = serde_json::json!({ "decoder_of": src, "init_logvar": -4.0 });
        let e = VaeStage::new(&bad, &dev).err().unwrap().to_string();
        assert!(
            e.contains("model.init_logvar") && e.contains("decoder_of"),
            "{e}"
        );
        bad.model = serde_json::json!({ "decoder_of": dir.join("nowhere") });
        let e = VaeStage::new(&bad, &dev).err().unwrap().to_string();
        assert!(e.contains("nowhere"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_config_builds() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vae.toml");
        let cfg = TrainConfig::load(&p).unwrap();
        assert_eq!(cfg.stage, crate::Stage::Vae);
        let stage = VaeStage::new(&cfg, &Device::Cpu).unwrap();
        let n: usize = stage.vars().iter().map(|(_, v)| v.elem_count()).sum();
        assert!(n * 4 < 20_000_000, "{n} parameters");
        assert_eq!(stage.stage_config().vae.latent_channels, 16);
    }

    /// configs/vae_decoder.toml builds on the shipped VAE (its `decoder_of`, runs/vae/export,
    /// holds the same weights once the VAE run is reproduced).
    #[test]
    fn the_decoder_config_builds_on_the_shipped_vae() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cfg = TrainConfig::load(&root.join("configs/vae_decoder.toml")).unwrap();
        assert_eq!(cfg.model["decoder_of"], "runs/vae/export");
        cfg.model["decoder_of"] = root
            .join("../../models/vdit-shapes/vae")
            .to_string_lossy()
            .into_owned()
            .into();
        let stage = VaeStage::new(&cfg, &Device::Cpu).unwrap();
        let vars = stage.vars();
        assert!(vars.iter().all(|(n, _)| n.starts_with("decoder.")));
        let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        assert!(n > 0 && n * 4 < 8_000_000, "{n} decoder parameters");
    }

    #[test]
    fn bad_model_settings_name_the_key() {
        let err = |model: serde_json::Value| {
            let cfg = TrainConfig {
                stage: crate::Stage::Vae,
                model,
                ..tiny_run(Path::new("unused"))
            };
            VaeStage::new(&cfg, &Device::Cpu).err().unwrap().to_string()
        };
        let mut m = tiny_model();
        m["kl_wieght"] = 1.0.into();
        let e = err(m);
        assert!(e.contains("kl_wieght"), "{e}");
        let mut m = tiny_model();
        m["vae"]["block_out_chanels"] = serde_json::json!([8]);
        let e = err(m);
        assert!(e.contains("model.vae.block_out_chanels"), "{e}");
        let mut m = tiny_model();
        m["vae"]["norm_num_groups"] = 3.into();
        let e = err(m);
        assert!(e.contains("model.vae.block_out_channels"), "{e}");
        let mut m = tiny_model();
        m["kl_weight"] = (-1.0).into();
        let e = err(m);
        assert!(e.contains("model.kl_weight"), "{e}");
        let mut m = tiny_model();
        m["vae"]["sample_width"] = 32.into();
        let e = err(m);
        assert!(e.contains("data.buckets[0]") && e.contains("tiled"), "{e}");
    }
}

/// Timing of the shipped config's training step (`cargo test --release -p vdit-train
/// bench_vae_step -- --ignored --nocapture`).
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn bench_vae_step() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vae.toml");
        let cfg = TrainConfig::load(&p).unwrap();
        let dev = Device::Cpu;
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let n: usize = stage.vars().iter().map(|(_, v)| v.elem_count()).sum();
        eprintln!("{n} parameters ({:.1} MB f32)", n as f64 * 4e-6);
        let reps: usize = std::env::var("VDIT_BENCH_REPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2);
        let total_w: f64 = cfg.data.buckets.iter().map(|b| b.weight).sum();
        let mut expected = 0.0;
        let only: Option<Vec<usize>> = std::env::var("VDIT_BENCH_BUCKETS")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect());
        for (i, b) in cfg.data.buckets.iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&i)) {
                continue;
            }
            let mut data = cfg.data.clone();
            data.buckets = vec![b.clone()];
            let batch =
                &crate::data::batches_for_step(&data, 0, 0, cfg.batch_size, 1, 0, &dev).unwrap()[0];
            let mut best = f64::INFINITY;
            let mut fwd = 0.0;
            for _ in 0..reps {
                let t0 = std::time::Instant::now();
                let mut rng = crate::data::step_rng(0, "loss", 0);
                let out = stage.loss(batch, &mut rng).unwrap();
                let t1 = t0.elapsed().as_secs_f64();
                let _g = out.loss.backward().unwrap();
                let t = t0.elapsed().as_secs_f64();
                if t < best {
                    best = t;
                    fwd = t1;
                }
            }
            expected += best * b.weight / total_w;
            eprintln!(
                "bucket {i} {} x{}: {best:.3} s (forward {fwd:.3} s)",
                b.label(),
                batch.pixels.dim(0).unwrap()
            );
        }
        eprintln!("expected s/step over the bucket mix: {expected:.3}");
    }
}

/// Short training trials for tuning (`VDIT_TRIAL_SECONDS=240 cargo test --release -p
/// vdit-train trial_vae -- --ignored --nocapture`; `VDIT_TRIAL_CONFIG`, `VDIT_TRIAL_MODEL`
/// (JSON merged into `[model]`), `VDIT_TRIAL_LR`, `VDIT_TRIAL_TAG`).
#[cfg(test)]
mod trial {
    use super::*;
    use vdit_world::Split;

    /// Mean PSNR (8-bit) of `n` aliased `split` clips of 64x64xF through encode (mean) + decode.
    pub(crate) fn eval_psnr(stage: &VaeStage, split: Split, frames: usize, n: u64) -> f64 {
        let mut data = stage.run.data.clone();
        data.split = split;
        data.antialias = false;
        let b = Bucket {
            width: 64,
            height: 64,
            frames,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        };
        let mut total = 0.0;
        for i in 0..n {
            let px = render_clips(&data, 12345, &b, &[i], &stage.dev)
                .unwrap()
                .pixels;
            let (mean, _) = stage.model.encode(&px).unwrap();
            let rec = stage.model.decode(&mean).unwrap();
            total += psnr_8bit(&rec.detach(), &px).unwrap();
        }
        total / n as f64
    }

    #[test]
    #[ignore]
    fn trial_vae() {
        let env = |k: &str| std::env::var(k).ok();
        let p = env("VDIT_TRIAL_CONFIG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vae.toml"));
        let mut cfg = TrainConfig::load(&p).unwrap();
        let tag = env("VDIT_TRIAL_TAG").unwrap_or_else(|| "trial".into());
        cfg.out_dir = std::env::temp_dir().join(format!("vdit-vae-{tag}"));
        let _ = std::fs::remove_dir_all(&cfg.out_dir);
        if let Some(m) = env("VDIT_TRIAL_MODEL") {
            let extra: serde_json::Value = serde_json::from_str(&m).unwrap();
            fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
                match (a, b) {
                    (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                        for (k, v) in b {
                            merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                        }
                    }
                    (a, b) => *a = b.clone(),
                }
            }
            merge(&mut cfg.model, &extra);
        }
        if let Some(n) = env("VDIT_TRIAL_STEPS") {
            cfg.steps = n.parse().unwrap();
        }
        if let Some(lr) = env("VDIT_TRIAL_LR") {
            cfg.optim.lr = lr.parse().unwrap();
        }
        let limit: f64 = env("VDIT_TRIAL_SECONDS")
            .and_then(|s| s.parse().ok())
            .unwrap_or(240.0);
        let dev = Device::Cpu;
        let stage = VaeStage::new(&cfg, &dev).unwrap();
        let n: usize = stage.vars().iter().map(|(_, v)| v.elem_count()).sum();
        eprintln!("trial {tag}: {n} params, model {}", cfg.model);
        let summary = crate::trainer::train(&cfg, &stage, &dev, false, &mut |p| {
            let r = p.record;
            if p.step % 10 == 0 {
                eprintln!(
                    "step {:4} {:6.1}s loss {:.5} psnr {:5.2} kl {:.3} lr {:.2e} [{}]",
                    p.step,
                    p.session.as_secs_f64(),
                    r.loss,
                    r.metrics["psnr"],
                    r.metrics["kl"],
                    r.lr,
                    r.bucket
                );
            }
            if p.session.as_secs_f64() > limit {
                crate::Control::Stop
            } else {
                crate::Control::Continue
            }
        })
        .unwrap();
        let t = summary.seconds / (summary.steps as f64);
        eprintln!("{} steps, {t:.2} s/step", summary.steps);
        for f in [1, 17] {
            eprintln!(
                "val-iid 64x64x{f} PSNR (current weights): {:.2} dB",
                eval_psnr(&stage, Split::ValIid, f, 6)
            );
        }
    }
}

/// Compares an exported folder's numbers with diffusers' (`VDIT_DIFFUSERS_CHECK=<dir with
/// config.json + weights>` and `VDIT_DIFFUSERS_TENSORS=<safetensors with x, z = mode, y =
/// decode(z)>` written by `AutoencoderKLCogVideoX.from_pretrained`).
#[cfg(test)]
mod diffusers_check {
    use super::*;

    #[test]
    #[ignore]
    fn exported_folder_matches_diffusers() {
        let dir = std::path::PathBuf::from(std::env::var("VDIT_DIFFUSERS_CHECK").unwrap());
        let t = vdit_core::testing::load_tensors(Path::new(
            &std::env::var("VDIT_DIFFUSERS_TENSORS").unwrap(),
        ))
        .unwrap();
        let cfg: AutoencoderKLCogVideoXConfig =
            vdit_core::config::load_config(&dir.join("config.json")).unwrap();
        let w = vdit_core::testing::load_tensors(&dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let model = TrainVae::new(&cfg, vb).unwrap();
        let (mean, _) = model.encode(&t["x"]).unwrap();
        let y = model.decode(&t["z"]).unwrap();
        let dz = vdit_core::testing::max_abs_diff(&mean, &t["z"]).unwrap();
        let dy = vdit_core::testing::max_abs_diff(&y, &t["y"]).unwrap();
        eprintln!("training model vs diffusers: latent mean {dz:.2e}, decode {dy:.2e}");
        assert!(dz < 1e-4 && dy < 1e-4);
    }
}
