//! The text-to-video stage (`stage = "transformer"`): a T5 encoder and a CogVideoX transformer
//! trained together on the latents of a frozen, already trained VAE, with the diffusion
//! objective of [`crate::objective`] (CogVideoX's v-prediction schedule by default).
//!
//! Per micro-batch: captions are replaced by the empty prompt with probability
//! `caption_dropout` (so the model also learns the unconditional prediction that
//! classifier-free guidance needs), tokenized as the pipeline tokenizes them (words, `</s>`,
//! `<pad>` up to `max_text_seq_length`) and encoded by T5; the clips are encoded by the VAE
//! (inference kernels, no graph), a posterior sample is drawn and scaled by the VAE's
//! `scaling_factor`, permuted to the transformer's `[B, F, C, h, w]`, noised, and the
//! transformer's prediction is scored — with `diffusion.object_weight` > 0 as a weighted mean
//! that weighs the latent cells at the clips' objects more (see
//! [`crate::data::latent_object_weights`]); with `diffusion.contrast_weight` > 0 each sample is
//! also predicted with a wrong caption — a partner's (same background, see
//! [`contrast_partners`]) or its own with one object word changed ([`edit_caption`]) — and
//! [`caption_contrast`] asks the wrong caption to do worse at the objects; with
//! `diffusion.word_contrast_weight` > 0 a second such term takes the sample's own caption with
//! one word of `diffusion.word_contrast_words` changed ([`edit_caption_of`]), in the same forward.
//!
//! Frozen-VAE cache: when `data.num_clips` is finite the clips repeat, so the posterior
//! `(mean, logvar)` of each (bucket, clip) is kept after its first encoding (the sample is
//! still drawn afresh from the step's stream, so results are identical with or without the
//! cache). The cache holds at most `latent_cache_mb` MiB (default 1024): once full, new clips
//! are encoded and not kept (with uniform clip sampling, any eviction rule gives the same hit
//! rate as keeping the first ones).
//!
//! Initialisation (transformer; T5 keeps transformers' `_init_weights`): DiT's — linear and
//! patch weights Xavier-uniform, timestep MLP N(0, 0.02²), and adaLN-Zero: the modulation
//! linears of every block (`norm1.linear`, `norm2.linear`), of `norm_out` and the output
//! projection `proj_out` start at zero, so every block starts as the identity and the model
//! predicts 0.
//!
//! `export` writes the complete diffusers `CogVideoXPipeline` folder: `model_index.json`,
//! `scheduler/`, `transformer/`, `text_encoder/`, `tokenizer/` and `vae/` (copied from
//! `vae_dir`, its `temporal_compression_ratio` written as an integer as diffusers needs), plus
//! vdit's `generation_config.json` (25 steps, guidance 6, the training clips' fps).
//!
//! ```toml
//! [model]
//! vae_dir = "runs/vae/export"   # a diffusers AutoencoderKLCogVideoX folder (frozen)
//! caption_dropout = 0.1         # probability of training on the empty prompt
//! max_text_seq_length = 32      # tokens per prompt; must equal transformer.max_text_seq_length
//! latent_cache_mb = 1024        # bound of the posterior cache (only with data.num_clips)
//! freeze_text_encoder = false   # true: keep init_from's text encoder, train the transformer
//! [model.transformer]           # CogVideoXTransformer3DModel config.json fields
//! [model.text_encoder]          # T5Config fields (transformers' names)
//! ```

use crate::cogvideox_train::TrainCogVideoX;
use crate::config::{CaptionWord, ContrastPartners, LossWeighting, TrainConfig};
use crate::data::{
    clip_object_count, latent_object_mask, object_weights_from_mask, render_shape_alternatives,
    Batch,
};
use crate::init::{default_rule, SeededVarMap};
use crate::objective::{
    diffusion_loss, posterior_sample, predicted_x0, sample_noised_biased, Noised,
};
use crate::t5_train::{write_text_encoder_folder, T5Config, TrainT5};
use crate::trainable::{component, save_weights, LossOutput, Trainable};
use crate::word_tokenizer::{build_tokenizer, world_vocabulary, write_tokenizer_folder, PAD_ID};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Init;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::{Tokenizer, TruncationDirection};
use vdit_core::{Error, Result};
use vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoX;
use vdit_models::transformers::cogvideox::{
    cogvideox_rotary_pos_embed, CogVideoXTransformerConfig,
};
use vdit_schedulers::CogVideoXDDIMScheduler;

/// The diffusers version written into the exported configs.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// `[model]` of a transformer-stage config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextToVideoConfig {
    /// A diffusers `AutoencoderKLCogVideoX` folder (the VAE stage's `export/`), frozen here.
    pub vae_dir: PathBuf,
    /// The transformer's `config.json` fields. Default: diffusers' defaults (CogVideoX-2b).
    #[serde(default)]
    pub transformer: CogVideoXTransformerConfig,
    /// The T5 encoder's fields. Default: [`T5Config::default`].
    #[serde(default)]
    pub text_encoder: T5Config,
    /// Probability of replacing a caption by "" (classifier-free guidance). Default 0.1.
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// Tokens per prompt; must equal `transformer.max_text_seq_length` (default: that value).
    #[serde(default)]
    pub max_text_seq_length: Option<usize>,
    /// Upper bound of the posterior cache in MiB. Default 1024.
    #[serde(default = "default_cache_mb")]
    pub latent_cache_mb: usize,
    /// Keep the text encoder as the run's `init_from` checkpoint holds it (required): only the
    /// transformer trains, and the exported `text_encoder/` is that one. Default false.
    #[serde(default)]
    pub freeze_text_encoder: bool,
}

fn default_caption_dropout() -> f64 {
    0.1
}

fn default_cache_mb() -> usize {
    1024
}

/// The transformer's initialisation (see the module docs); other vars follow
/// [`default_rule`] (which keeps the hints T5 gives).
pub fn init_rule(name: &str, shape: &[usize], hint: Init) -> Init {
    let Some(key) = name.strip_prefix("transformer.") else {
        return default_rule(name, shape, hint);
    };
    let zero = key.starts_with("proj_out.")
        || key.starts_with("norm_out.linear.")
        || key.contains(".norm1.linear.")
        || key.contains(".norm2.linear.");
    if zero {
        return Init::Const(0.0);
    }
    if shape.len() <= 1 {
        return default_rule(name, shape, hint);
    }
    if key.starts_with("time_embedding.") {
        return Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
    }
    // Xavier uniform over [out, in·...] (a conv weight as its flattened linear)
    let fan_out = shape[0];
    let fan_in: usize = shape[1..].iter().product();
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Key names of a serde struct's JSON form (to reject typos in a table whose struct accepts
/// unknown keys, as the diffusers-config structs must).
fn check_keys<T: Serialize>(value: &serde_json::Value, known: &T, key: &str) -> Result<()> {
    let file = Path::new("<config>");
    let (Some(given), Ok(serde_json::Value::Object(known))) =
        (value.as_object(), serde_json::to_value(known))
    else {
        return Ok(());
    };
    for k in given.keys() {
        if !known.contains_key(k) {
            return Err(Error::config(
                file,
                format!("{key}.{k}"),
                format!(
                    "unknown field; expected one of {}",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Posterior `(mean, logvar)` per (bucket, clip), bounded in bytes.
struct LatentCache {
    map: HashMap<(usize, u64), (Tensor, Tensor)>,
    /// Posterior means `[3, C, F', h, w]` of a clip rendered with one object's shape replaced
    /// by each other shape, per (bucket, clip, object), for `diffusion.shape_choice_weight`.
    alternatives: HashMap<(usize, u64, usize), Tensor>,
    bytes: usize,
    limit: usize,
    hits: u64,
    misses: u64,
}

/// The T5 encoder + CogVideoX transformer stage; see the module docs.
pub struct TextToVideoStage {
    cfg: TextToVideoConfig,
    vars: SeededVarMap,
    t5: TrainT5,
    transformer: TrainCogVideoX,
    tokenizer: Tokenizer,
    vae: AutoencoderKLCogVideoX,
    sched: CogVideoXDDIMScheduler,
    train_cfg: TrainConfig,
    cache: Option<Mutex<LatentCache>>,
    device: Device,
}

impl TextToVideoStage {
    /// Builds the stage from a run's config: reads `[model]`, loads the VAE, checks that the
    /// parts fit together and creates the vars (seeded by `cfg.seed`).
    pub fn new(cfg: &TrainConfig, dev: &Device) -> Result<Self> {
        let file = Path::new("<config>");
        let mc: TextToVideoConfig =
            serde_path_to_error::deserialize(cfg.model.clone()).map_err(|e| {
                Error::config(file, format!("model.{}", e.path()), e.inner().to_string())
            })?;
        if let Some(t) = cfg.model.get("transformer") {
            check_keys(
                t,
                &CogVideoXTransformerConfig::default(),
                "model.transformer",
            )?;
        }
        let tc = &mc.transformer;
        let bad = |key: &str, msg: String| Err(Error::config(file, key, msg));
        if let Some(l) = mc.max_text_seq_length {
            if l != tc.max_text_seq_length {
                return bad(
                    "model.max_text_seq_length",
                    format!(
                        "{l} differs from model.transformer.max_text_seq_length {}; they must be equal",
                        tc.max_text_seq_length
                    ),
                );
            }
        }
        if !(0.0..=1.0).contains(&mc.caption_dropout) {
            return bad(
                "model.caption_dropout",
                format!(
                    "expected a probability in [0, 1], found {}",
                    mc.caption_dropout
                ),
            );
        }
        tc.validate(Path::new("<config> model.transformer"))?;
        mc.text_encoder.validate().map_err(|e| match e {
            Error::Config { key, msg, .. } => {
                Error::config(file, format!("model.text_encoder.{key}"), msg)
            }
            other => other,
        })?;
        if tc.text_embed_dim != mc.text_encoder.d_model {
            return bad(
                "model.transformer.text_embed_dim",
                format!(
                    "{} differs from model.text_encoder.d_model {} (the T5 output feeds the transformer)",
                    tc.text_embed_dim, mc.text_encoder.d_model
                ),
            );
        }
        let tokenizer = build_tokenizer(&world_vocabulary())?;
        let vocab = tokenizer.get_vocab_size(true);
        if mc.text_encoder.vocab_size < vocab {
            return bad(
                "model.text_encoder.vocab_size",
                format!(
                    "{} is smaller than the tokenizer's {vocab} tokens",
                    mc.text_encoder.vocab_size
                ),
            );
        }
        if tc.max_text_seq_length < 2 {
            return bad(
                "model.transformer.max_text_seq_length",
                format!(
                    "expected at least 2 (a word and </s>), found {}",
                    tc.max_text_seq_length
                ),
            );
        }
        let vae = AutoencoderKLCogVideoX::load(&mc.vae_dir, DType::F32, dev).map_err(|e| {
            Error::Msg(format!(
                "model.vae_dir = {:?}: cannot load the VAE (train the \"vae\" stage first): {e}",
                mc.vae_dir.display().to_string()
            ))
        })?;
        let vc = vae.config();
        if vc.latent_channels != tc.in_channels || vc.latent_channels != tc.out_channels {
            return bad(
                "model.transformer.in_channels",
                format!(
                    "in_channels {} / out_channels {} must equal the VAE's latent_channels {}",
                    tc.in_channels, tc.out_channels, vc.latent_channels
                ),
            );
        }
        let tcr = vc.temporal_compression_ratio as usize;
        if tcr != tc.temporal_compression_ratio {
            return bad(
                "model.transformer.temporal_compression_ratio",
                format!(
                    "{} differs from the VAE's {tcr}",
                    tc.temporal_compression_ratio
                ),
            );
        }
        let cell = vc.spatial_compression() * tc.patch_size;
        for (i, b) in cfg.data.buckets.iter().enumerate() {
            if !b.width.is_multiple_of(cell) || !b.height.is_multiple_of(cell) {
                return bad(
                    &format!("data.buckets[{i}]"),
                    format!(
                        "{}x{} is not a multiple of {cell} (VAE compression {} x patch_size {})",
                        b.width,
                        b.height,
                        vc.spatial_compression(),
                        tc.patch_size
                    ),
                );
            }
        }
        let sched = CogVideoXDDIMScheduler::with_file(
            cfg.diffusion.scheduler.clone(),
            "<config> diffusion.scheduler".into(),
        )?;
        if cfg.diffusion.weighting == LossWeighting::Cogvideox
            && cfg.diffusion.scheduler.prediction_type
                != vdit_schedulers::PredictionType::VPrediction
        {
            return bad(
                "diffusion.weighting",
                "\"cogvideox\" needs prediction_type = \"v_prediction\"; use \"none\"".into(),
            );
        }
        let vars = SeededVarMap::with_rule(cfg.seed, Arc::new(init_rule));
        let vb = vars.var_builder(DType::F32, dev);
        let t5 = TrainT5::new(&mc.text_encoder, vb.pp("text_encoder"))?;
        let transformer = TrainCogVideoX::new(tc, vb.pp("transformer"))?;
        if mc.freeze_text_encoder {
            let Some(src) = &cfg.init_from else {
                return bad(
                    "model.freeze_text_encoder",
                    "needs init_from (the checkpoint whose text encoder is kept); none is set"
                        .into(),
                );
            };
            let weights =
                crate::checkpoint::load_model_weights(src, dev, &|c| c == "text_encoder")?;
            let t5_vars: Vec<(String, Var)> = vars
                .vars()
                .into_iter()
                .filter(|(n, _)| is_text_encoder_var(n))
                .collect();
            let t5_weights = weights
                .into_iter()
                .filter(|(n, _)| is_text_encoder_var(n))
                .collect();
            crate::trainer::set_vars(&t5_vars, &t5_weights, src)?;
        }
        let cache = cfg.data.num_clips.map(|_| {
            Mutex::new(LatentCache {
                map: HashMap::new(),
                alternatives: HashMap::new(),
                bytes: 0,
                limit: mc.latent_cache_mb << 20,
                hits: 0,
                misses: 0,
            })
        });
        Ok(Self {
            cfg: mc,
            vars,
            t5,
            transformer,
            tokenizer,
            vae,
            sched,
            train_cfg: cfg.clone(),
            cache,
            device: dev.clone(),
        })
    }

    pub fn transformer(&self) -> &TrainCogVideoX {
        &self.transformer
    }

    pub fn text_encoder(&self) -> &TrainT5 {
        &self.t5
    }

    /// Token ids `[B, L]` for `prompts`, as the pipeline's tokenizer gives them
    /// (`TextTokenizer::encode_padded`): words truncated to `L − 1`, `</s>`, `<pad>` up to `L`.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        let l = self.cfg.transformer.max_text_seq_length;
        let n_special = self
            .tokenizer
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        let budget = l.saturating_sub(n_special);
        let mut ids = Vec::with_capacity(prompts.len() * l);
        for (i, p) in prompts.iter().enumerate() {
            let err = |e: tokenizers::Error| {
                Error::Msg(format!("cannot tokenize caption {i} ({p:?}): {e}"))
            };
            let mut enc = self.tokenizer.encode(*p, false).map_err(err)?;
            if enc.len() > budget {
                enc.truncate(budget, 0, TruncationDirection::Right);
                enc.take_overflowing();
            }
            let enc = self.tokenizer.post_process(enc, None, true).map_err(err)?;
            let mut row = enc.get_ids().to_vec();
            row.resize(l, PAD_ID);
            ids.extend(row);
        }
        Ok(Tensor::from_vec(ids, (prompts.len(), l), &self.device)?)
    }

    /// The VAE posterior `(mean, logvar)` `[B, C, F', h, w]` of the batch's clips, from the
    /// cache where possible.
    fn posterior(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let encode = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let p = self.vae.encode_plain(x)?;
            Ok((p.mean, p.logvar))
        };
        let Some(cache) = &self.cache else {
            return encode(&batch.pixels);
        };
        let n = batch.clip_indices.len();
        let mut parts: Vec<Option<(Tensor, Tensor)>> = {
            let c = cache.lock().unwrap_or_else(|e| e.into_inner());
            batch
                .clip_indices
                .iter()
                .map(|&i| c.map.get(&(batch.bucket, i)).cloned())
                .collect()
        };
        let missing: Vec<usize> = (0..n).filter(|&i| parts[i].is_none()).collect();
        if !missing.is_empty() {
            let idx = Tensor::new(
                missing.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &self.device,
            )?;
            let (mean, logvar) = encode(&batch.pixels.index_select(&idx, 0)?)?;
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            for (k, &i) in missing.iter().enumerate() {
                let (m, l) = (mean.get(k)?.contiguous()?, logvar.get(k)?.contiguous()?);
                let size = 2 * m.elem_count() * 4;
                let key = (batch.bucket, batch.clip_indices[i]);
                if c.bytes + size <= c.limit && !c.map.contains_key(&key) {
                    c.map.insert(key, (m.clone(), l.clone()));
                    c.bytes += size;
                }
                parts[i] = Some((m, l));
            }
            c.misses += missing.len() as u64;
            c.hits += (n - missing.len()) as u64;
        } else {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            c.hits += n as u64;
        }
        let (means, logvars): (Vec<Tensor>, Vec<Tensor>) =
            parts.into_iter().map(|p| p.expect("filled above")).unzip();
        Ok((Tensor::stack(&means, 0)?, Tensor::stack(&logvars, 0)?))
    }

    /// (entries, MiB, hits, misses) of the posterior cache, if there is one.
    pub fn cache_stats(&self) -> Option<(usize, f64, u64, u64)> {
        self.cache.as_ref().map(|c| {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            (
                c.map.len(),
                c.bytes as f64 / (1 << 20) as f64,
                c.hits,
                c.misses,
            )
        })
    }

    /// Clean latents `[B, F', C, h, w]` (scaled) for a batch, with the posterior noise from `rng`.
    pub fn latents(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        Ok(self.latents_and_means(batch, rng)?.0)
    }

    /// [`Self::latents`] and the posterior means, both `[B, F', C, h, w]` and scaled.
    fn latents_and_means(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor)> {
        let (mean, logvar) = self.posterior(batch)?;
        let z = posterior_sample(&mean, &logvar, rng)?;
        let scaled = |x: Tensor| -> Result<Tensor> {
            // [B, C, F', h, w] -> [B, F', C, h, w]
            Ok((x * self.vae.config().scaling_factor)?
                .permute((0, 2, 1, 3, 4))?
                .contiguous()?
                .detach())
        };
        Ok((scaled(z)?, scaled(mean)?))
    }

    /// The scaled posterior means `[N, 3, F', C, h, w]` of each `(clip, object)` of the batch's
    /// bucket rendered with that object's shape replaced by each other shape
    /// ([`render_shape_alternatives`]), from the cache where possible.
    fn shape_alternatives(&self, batch: &Batch, picks: &[(u64, usize)]) -> Result<Tensor> {
        let data = &self.train_cfg.data;
        let bucket = &data.buckets[batch.bucket];
        let seed = batch.world_seed;
        let key = |&(clip, object): &(u64, usize)| (batch.bucket, clip, object);
        let mut parts: Vec<Option<Tensor>> = match &self.cache {
            Some(cache) => {
                let c = cache.lock().unwrap_or_else(|e| e.into_inner());
                picks
                    .iter()
                    .map(|p| c.alternatives.get(&key(p)).cloned())
                    .collect()
            }
            None => vec![None; picks.len()],
        };
        // rendered only where the cache has no latents
        let missing: Vec<usize> = (0..picks.len()).filter(|&i| parts[i].is_none()).collect();
        let mut pixels = Vec::with_capacity(missing.len());
        for &i in &missing {
            let (clip, object) = picks[i];
            let (px, _) =
                render_shape_alternatives(data, seed, bucket, clip, object, &self.device)?
                    .ok_or_else(|| {
                        Error::invalid(
                            "shape choice",
                            format!("clip {clip} has no object {object}"),
                        )
                    })?;
            pixels.push(px);
        }
        if !missing.is_empty() {
            let mean = self.vae.encode_plain(&Tensor::cat(&pixels, 0)?)?.mean;
            let mut cache = self
                .cache
                .as_ref()
                .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()));
            for (k, &i) in missing.iter().enumerate() {
                let m = mean.narrow(0, 3 * k, 3)?.contiguous()?;
                if let Some(c) = cache.as_mut() {
                    let size = m.elem_count() * 4;
                    if c.bytes + size <= c.limit {
                        c.alternatives.insert(key(&picks[i]), m.clone());
                        c.bytes += size;
                    }
                }
                parts[i] = Some(m);
            }
        }
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|p| p.expect("filled above"))
            .collect();
        // [N, 3, C, F', h, w] -> [N, 3, F', C, h, w], scaled
        Ok(
            (Tensor::stack(&parts, 0)? * self.vae.config().scaling_factor)?
                .permute((0, 1, 3, 2, 4, 5))?
                .contiguous()?,
        )
    }

    /// The shape-choice term of a step (see `diffusion.shape_choice_weight`): the samples in
    /// it, one object of each drawn from `rng`, and [`shape_choice_loss`] on them; `None` when
    /// no sample is in it.
    fn shape_choice_term(
        &self,
        batch: &Batch,
        prompts: &[&str],
        pred: &Tensor,
        nb: &Noised,
        means: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<ShapeChoice>> {
        let dc = &self.train_cfg.diffusion;
        let seed = batch.world_seed;
        let mut rows = Vec::new();
        let mut picks = Vec::new();
        for (i, &clip) in batch.clip_indices.iter().enumerate() {
            let t = nb.timesteps[i];
            if prompts[i].is_empty() || t > dc.shape_choice_max_t || t < dc.shape_choice_min_t {
                continue;
            }
            let n = clip_object_count(&self.train_cfg.data, seed, clip);
            if n == 0 {
                continue;
            }
            rows.push(i as u32);
            picks.push((clip, rng.random_range(0..n)));
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let alts = self.shape_alternatives(batch, &picks)?;
        let x0_hat = predicted_x0(&self.sched, pred, nb)?;
        let n = rows.len();
        let idx = Tensor::from_vec(rows, n, &self.device)?;
        shape_choice_loss(
            &x0_hat.index_select(&idx, 0)?,
            &means.index_select(&idx, 0)?,
            &alts,
            dc.shape_choice_temperature,
        )
        .map(Some)
    }

    /// `model_index.json`.
    fn model_index() -> serde_json::Value {
        serde_json::json!({
            "_class_name": "CogVideoXPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        })
    }
}

/// The partner whose caption each sample is contrasted with (`diffusion.contrast_weight`): the
/// next sample in batch order (cyclically) with the same background and another, non-empty
/// caption; `None` for a dropped caption or when there is none. The same background keeps the
/// contrast on the objects: captions naming another background are told apart by the whole
/// frame, which the model already reads.
pub fn contrast_partners(prompts: &[&str], backgrounds: &[[u8; 3]]) -> Vec<Option<usize>> {
    let b = prompts.len();
    (0..b)
        .map(|i| {
            if prompts[i].is_empty() {
                return None;
            }
            (1..b).map(|k| (i + k) % b).find(|&j| {
                backgrounds.get(j) == backgrounds.get(i)
                    && !prompts[j].is_empty()
                    && prompts[j] != prompts[i]
            })
        })
        .collect()
}

/// A minimal-pair wrong caption (`diffusion.contrast_partners = "edit"`): `caption` with one
/// object word replaced by another value of its attribute — a colour, shape, size, direction
/// or speed adverb (backgrounds are left alone: the term is about the objects) — and an `a`/`an`
/// right before it made to agree with the new word. The attribute is drawn uniformly among those
/// the caption states, then one of its words, then the new value. `None` for a caption without
/// such a word (a dropped caption).
pub fn edit_caption(caption: &str, rng: &mut impl Rng) -> Option<String> {
    edit_caption_of(caption, &CaptionWord::ALL, rng)
}

/// [`edit_caption`] limited to `attributes` (`diffusion.word_contrast_words`): the attribute
/// is drawn among those of `attributes` the caption states. `None` when it states
/// none of them.
pub fn edit_caption_of(
    caption: &str,
    attributes: &[CaptionWord],
    rng: &mut impl Rng,
) -> Option<String> {
    // the word lists of the listed attributes, in CaptionWord::ALL's order
    let classes: Vec<Vec<&str>> = CaptionWord::ALL
        .iter()
        .filter(|a| attributes.contains(a))
        .map(|&a| attribute_words(a))
        .collect();
    let mut words: Vec<String> = caption.split_whitespace().map(str::to_string).collect();
    // (class, positions of its words in the caption) for the classes the caption states
    let present: Vec<(usize, Vec<usize>)> = classes
        .iter()
        .enumerate()
        .map(|(c, values)| {
            let at = (0..words.len())
                .filter(|&i| values.contains(&words[i].as_str()))
                .collect::<Vec<_>>();
            (c, at)
        })
        .filter(|(_, at)| !at.is_empty())
        .collect();
    if present.is_empty() {
        return None;
    }
    let (class, at) = &present[rng.random_range(0..present.len())];
    let i = at[rng.random_range(0..at.len())];
    let others: Vec<&str> = classes[*class]
        .iter()
        .copied()
        .filter(|v| *v != words[i])
        .collect();
    let new = others[rng.random_range(0..others.len())];
    words[i] = new.to_string();
    if i > 0 && (words[i - 1] == "a" || words[i - 1] == "an") {
        words[i - 1] = vdit_world::caption::article(new).to_string();
    }
    Some(words.join(" "))
}

/// The caption words that state attribute `a`, one per value (directions without "still",
/// which captions do not say).
fn attribute_words(a: CaptionWord) -> Vec<&'static str> {
    use vdit_world::{Colour, Motion, Shape, Size, Speed};
    match a {
        CaptionWord::Colour => Colour::ALL.iter().map(|c| c.name()).collect(),
        CaptionWord::Shape => Shape::ALL.iter().map(|c| c.name()).collect(),
        CaptionWord::Size => Size::ALL.iter().map(|c| c.name()).collect(),
        CaptionWord::Direction => Motion::ALL
            .iter()
            .filter(|m| **m != Motion::Still)
            .map(|c| c.name())
            .collect(),
        CaptionWord::Speed => Speed::ALL.iter().map(|s| s.adverb()).collect(),
    }
}

/// One caption-contrast term of a step: the samples in it (`idx`, those with a wrong caption
/// and noised at a timestep ≥ `contrast_min_t`), the wrong captions' encodings for the whole
/// batch, and the term's weight and margin.
struct ContrastTerm {
    name: &'static str,
    weight: f64,
    margin: f64,
    wrong_text: Tensor,
    idx: Tensor,
}

impl ContrastTerm {
    /// `None` when no sample is in the term this step.
    fn new(
        name: &'static str,
        weight: f64,
        margin: f64,
        wrong_text: Tensor,
        valid: &[bool],
        timesteps: &[usize],
        min_t: usize,
    ) -> Result<Option<Self>> {
        let idx: Vec<u32> = (0..valid.len())
            .filter(|&i| valid[i] && timesteps[i] >= min_t)
            .map(|i| i as u32)
            .collect();
        if idx.is_empty() {
            return Ok(None);
        }
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, wrong_text.device())?;
        Ok(Some(Self {
            name,
            weight,
            margin,
            wrong_text,
            idx,
        }))
    }
}

/// The caption-contrast term (see `diffusion.contrast_weight`): for each sample i with
/// `valid[i]` and at least one cell in `mask` (`[B, ...]` of 0/1, broadcastable against the
/// predictions), with e = Σ mask·(prediction − target)² over the sample,
/// max(0, margin − ln(e_wrong / e_own)); returns the mean over those samples (a scalar tensor,
/// 0 with no such sample) and the mean log ratio ln(e_wrong / e_own) over them, for the log.
/// The ratio is per sample, so any per-sample scale of the error (v against x₀) cancels.
pub fn caption_contrast(
    own: &Tensor,
    wrong: &Tensor,
    target: &Tensor,
    mask: &Tensor,
    valid: &[bool],
    margin: f64,
) -> Result<(Tensor, Option<f64>)> {
    let b = own.dim(0)?;
    if wrong.dims() != own.dims() || target.dims() != own.dims() || valid.len() != b {
        return Err(Error::invalid(
            "caption contrast",
            format!(
                "predictions {:?} / {:?}, target {:?} and {} validity flags disagree",
                own.dims(),
                wrong.dims(),
                target.dims(),
                valid.len()
            ),
        ));
    }
    let mask = mask.broadcast_as(own.dims())?.to_dtype(own.dtype())?;
    let cells: Vec<f32> = mask
        .reshape((b, ()))?
        .sum(1)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let use_: Vec<f32> = (0..b)
        .map(|i| if valid[i] && cells[i] > 0.0 { 1.0 } else { 0.0 })
        .collect();
    let n = use_.iter().sum::<f32>();
    if n == 0.0 {
        return Ok((Tensor::zeros((), own.dtype(), own.device())?, None));
    }
    let target = target.detach();
    let err = |p: &Tensor| -> Result<Tensor> {
        Ok(((p - &target)?.sqr()? * &mask)?.reshape((b, ()))?.sum(1)?)
    };
    // A floor far below any real error keeps the log finite for a perfect prediction.
    let eps = 1e-12;
    let log_ratio = ((err(wrong)? + eps)?.log()? - (err(own)? + eps)?.log()?)?; // [B]
    let use_ = Tensor::from_vec(use_, b, own.device())?.to_dtype(own.dtype())?;
    let hinge = (log_ratio.neg()? + margin)?.relu()?;
    let term = ((hinge * &use_)?.sum_all()? / n as f64)?;
    let mean_ratio = (log_ratio.detach() * &use_)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        / n as f64;
    Ok((term, Some(mean_ratio)))
}

/// The shape-choice term of a step and what it logs.
pub struct ShapeChoice {
    /// The mean cross-entropy (a scalar tensor).
    pub loss: Tensor,
    /// The fraction of samples whose x̂₀ is nearest its own shape's latents.
    pub accuracy: f64,
    /// The mean ‖μ_s − μ_own‖² over the samples and other shapes: how far apart the shapes
    /// are in the latent (set the temperature against it).
    pub gap: f64,
}

/// The shape-choice cross-entropy (see `diffusion.shape_choice_weight`) of the estimates
/// `x0_hat` `[N, ...]`, against the latents of each sample's own shape `own` `[N, ...]` and of
/// its others `alts` `[N, K, ...]`: with d_s = ‖x̂₀ − μ_s‖², the logit of shape s over the
/// own one is −(d_s − d_own) / (‖μ_s − μ_own‖² · temperature) — 1/temperature for x̂₀ = μ_own,
/// 0 halfway, −1/temperature at μ_s, whatever the object's size — and the term is the mean over
/// samples of −log softmax at the own shape (logit 0). The differences are computed as
/// d_s − d_own = Σ (μ_own − μ_s)·(2x̂₀ − μ_s − μ_own), exact where the full distances would
/// cancel (the cells away from the object agree in every μ).
pub fn shape_choice_loss(
    x0_hat: &Tensor,
    own: &Tensor,
    alts: &Tensor,
    temperature: f64,
) -> Result<ShapeChoice> {
    let n = x0_hat.dim(0)?;
    let k = alts.dim(1).unwrap_or(0);
    if own.dims() != x0_hat.dims() || alts.rank() != x0_hat.rank() + 1 || alts.dim(0)? != n {
        return Err(Error::invalid(
            "shape choice",
            format!(
                "estimates {:?}, own latents {:?} and others {:?} disagree: expected [N, ...], \
                 [N, ...] and [N, K, ...]",
                x0_hat.dims(),
                own.dims(),
                alts.dims()
            ),
        ));
    }
    let own = own.detach().unsqueeze(1)?;
    let alts = alts.detach();
    // μ_own − μ_s
    let diff = own.broadcast_sub(&alts)?;
    // 2x̂₀ − μ_s − μ_own
    let mid = (x0_hat.unsqueeze(1)? * 2.0)?
        .broadcast_sub(&alts)?
        .broadcast_sub(&own)?;
    // ‖μ_s − μ_own‖², [N, K]
    let gaps = diff.sqr()?.reshape((n, k, ()))?.sum(2)?.detach();
    // Logit of each other shape relative to the own one:
    // −(d_s − d_own) / (‖μ_s − μ_own‖² · temperature).
    let scale = (gaps.clamp(1e-6, f64::INFINITY)? * (-temperature))?;
    let rel = diff
        .broadcast_mul(&mid)?
        .reshape((n, k, ()))?
        .sum(2)?
        .broadcast_div(&scale)?; // [N, K]
    let logits = Tensor::cat(
        &[
            Tensor::zeros((n, 1), rel.dtype(), rel.device())?,
            rel.clone(),
        ],
        1,
    )?;
    // The own shape's logit is 0, so its cross-entropy is the log-sum-exp, [N, 1].
    let m = logits.detach().max_keepdim(1)?;
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    let loss = lse.mean_all()?;
    let rel_v: Vec<Vec<f32>> = rel.detach().to_dtype(DType::F32)?.to_vec2()?;
    let accuracy =
        rel_v.iter().filter(|r| r.iter().all(|&l| l < 0.0)).count() as f64 / n.max(1) as f64;
    let gap = gaps.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(ShapeChoice {
        loss,
        accuracy,
        gap,
    })
}

/// `value` (a serde struct's JSON object) with `_class_name` and `_diffusers_version` first.
fn diffusers_config<T: Serialize>(class: &str, value: &T) -> Result<String> {
    let mut m = serde_json::Map::new();
    m.insert("_class_name".into(), class.into());
    m.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    match serde_json::to_value(value).map_err(|e| Error::Msg(e.to_string()))? {
        serde_json::Value::Object(o) => m.extend(o),
        other => {
            return Err(Error::Msg(format!(
                "{class}: config is not an object: {other}"
            )))
        }
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(m))
        .map(|s| s + "\n")
        .map_err(|e| Error::Msg(e.to_string()))
}

/// The VAE's `config.json` with an integral `temporal_compression_ratio` written as an integer
/// (see [`crate::vae_stage::integral_temporal_ratio`]; VAE folders exported before it wrote
/// `4.0`).
fn vae_config_for_diffusers(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, "<json>", format!("not valid JSON: {e}")))?;
    crate::vae_stage::integral_temporal_ratio(&mut v);
    serde_json::to_string_pretty(&v)
        .map(|s| s + "\n")
        .map_err(|e| Error::Msg(e.to_string()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    crate::checkpoint::write_atomic(path, text.as_bytes())
}

impl TextToVideoStage {
    /// The encodings of `prompts` each with one of `attributes` changed ([`edit_caption_of`]),
    /// and which of them were edited (a caption stating none of them keeps its own, unused).
    fn edited_text(
        &self,
        prompts: &[&str],
        attributes: &[CaptionWord],
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor, Vec<bool>)> {
        let edited: Vec<Option<String>> = prompts
            .iter()
            .map(|p| edit_caption_of(p, attributes, rng))
            .collect();
        let wrong_prompts: Vec<&str> = edited
            .iter()
            .zip(prompts)
            .map(|(e, p)| e.as_deref().unwrap_or(p))
            .collect();
        Ok((
            self.encode_text(&wrong_prompts)?,
            edited.iter().map(Option::is_some).collect(),
        ))
    }

    /// The T5 embeddings of `prompts`; cut from the graph when the text encoder is frozen.
    fn encode_text(&self, prompts: &[&str]) -> Result<Tensor> {
        let text = self.t5.forward(&self.tokenize(prompts)?)?;
        Ok(if self.cfg.freeze_text_encoder {
            text.detach()
        } else {
            text
        })
    }
}

/// A var of the text encoder (kept frozen with `model.freeze_text_encoder`).
fn is_text_encoder_var(name: &str) -> bool {
    name.starts_with("text_encoder.")
}

impl Trainable for TextToVideoStage {
    fn vars(&self) -> Vec<(String, Var)> {
        let mut all = self.vars.vars();
        all.retain(|(n, _)| !self.frozen(n));
        all
    }

    fn frozen(&self, name: &str) -> bool {
        self.cfg.freeze_text_encoder && is_text_encoder_var(name)
    }

    fn loss(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<LossOutput> {
        let b = batch.captions.len();
        // 1. text, with caption dropout
        let mut dropped = 0usize;
        let prompts: Vec<&str> = batch
            .captions
            .iter()
            .map(|c| {
                if rng.random::<f64>() < self.cfg.caption_dropout {
                    dropped += 1;
                    ""
                } else {
                    c.as_str()
                }
            })
            .collect();
        let text = self.encode_text(&prompts)?; // [B, L, d_model]
                                                // 2. latents of the frozen VAE
        let (x0, means) = self.latents_and_means(batch, rng)?; // [B, F', C, h, w]
        let (_, f, _, _, _) = x0.dims5()?;
        // 3. the diffusion objective
        let nb = sample_noised_biased(
            &self.sched,
            &x0,
            self.train_cfg.diffusion.timestep_bias.as_ref(),
            rng,
        )?;
        let t: Vec<f32> = nb.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, &self.device)?;
        let rope = if self.cfg.transformer.use_rotary_positional_embeddings {
            Some(cogvideox_rotary_pos_embed(
                &self.cfg.transformer,
                batch.height,
                batch.width,
                f,
                self.vae.config().spatial_compression(),
                &self.device,
            )?)
        } else {
            None
        };
        let dc = &self.train_cfg.diffusion;
        let rope = rope.as_ref().map(|(c, s)| (c, s));
        // The caption-contrast terms: each sample is also predicted with a wrong caption — its
        // partner's (see `contrast_partners`) or its own with one word changed (see
        // `edit_caption`) for `contrast_weight`'s term, its own with one of
        // `word_contrast_words` changed for `word_contrast_weight`'s — in one forward with the
        // batch's own captions (B + the contrasted samples of each term).
        let mut terms: Vec<ContrastTerm> = Vec::new();
        if dc.contrast_weight > 0.0 {
            let (wrong_text, valid) = match dc.contrast_partners {
                ContrastPartners::Batch => {
                    let partners = contrast_partners(&prompts, &batch.backgrounds);
                    let idx: Vec<u32> = partners
                        .iter()
                        .enumerate()
                        .map(|(i, p)| p.unwrap_or(i) as u32)
                        .collect();
                    let idx = Tensor::from_vec(idx, b, &self.device)?;
                    let valid: Vec<bool> = partners.iter().map(Option::is_some).collect();
                    (text.index_select(&idx, 0)?, valid)
                }
                ContrastPartners::Edit => self.edited_text(&prompts, &CaptionWord::ALL, rng)?,
            };
            terms.extend(ContrastTerm::new(
                "contrast",
                dc.contrast_weight,
                dc.contrast_margin,
                wrong_text,
                &valid,
                &nb.timesteps,
                dc.contrast_min_t,
            )?);
        }
        if dc.word_contrast_weight > 0.0 {
            let (wrong_text, valid) = self.edited_text(&prompts, &dc.word_contrast_words, rng)?;
            terms.extend(ContrastTerm::new(
                "word_contrast",
                dc.word_contrast_weight,
                dc.word_contrast_margin,
                wrong_text,
                &valid,
                &nb.timesteps,
                dc.contrast_min_t,
            )?);
        }
        let (pred, preds_wrong) = if terms.is_empty() {
            (
                self.transformer.forward(&nb.noisy, &text, &t, rope)?,
                vec![],
            )
        } else {
            let (mut xs, mut texts, mut ts) =
                (vec![nb.noisy.clone()], vec![text.clone()], vec![t.clone()]);
            for term in &terms {
                xs.push(nb.noisy.index_select(&term.idx, 0)?);
                texts.push(term.wrong_text.index_select(&term.idx, 0)?);
                ts.push(t.index_select(&term.idx, 0)?);
            }
            let all = self.transformer.forward(
                &Tensor::cat(&xs, 0)?,
                &Tensor::cat(&texts, 0)?,
                &Tensor::cat(&ts, 0)?,
                rope,
            )?;
            let mut start = b;
            let mut wrong = Vec::with_capacity(terms.len());
            for term in &terms {
                let n = term.idx.dim(0)?;
                wrong.push(all.narrow(0, start, n)?);
                start += n;
            }
            (all.narrow(0, 0, b)?, wrong)
        };
        // The object cells (0/1), found once from the pixels: for the weighting and the contrast.
        let mask = if dc.object_weight > 0.0 || !terms.is_empty() {
            Some(latent_object_mask(
                &batch.pixels,
                &batch.backgrounds,
                self.vae.config().spatial_compression(),
                self.vae.config().temporal_compression_ratio as usize,
                dc.object_dilate,
            )?)
        } else {
            None
        };
        let weights = match &mask {
            Some(mask) if dc.object_weight > 0.0 => {
                // Object weighting only for the samples noised at or below object_max_t.
                let per_clip: Vec<f64> = nb
                    .timesteps
                    .iter()
                    .map(|&t| {
                        if t <= dc.object_max_t {
                            dc.object_weight
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Some(object_weights_from_mask(mask, &per_clip)?)
            }
            _ => None,
        };
        let mut loss =
            diffusion_loss(&self.sched, &pred, &nb, &x0, dc.weighting, weights.as_ref())?;
        let mut metrics = vec![("uncond".to_string(), dropped as f64 / b.max(1) as f64)];
        if let Some(mask) = &mask {
            for (term, pred_wrong) in terms.iter().zip(&preds_wrong) {
                let n = term.idx.dim(0)?;
                let (value, log_ratio) = caption_contrast(
                    &pred.index_select(&term.idx, 0)?,
                    pred_wrong,
                    &nb.target.index_select(&term.idx, 0)?,
                    &mask.index_select(&term.idx, 0)?,
                    &vec![true; n],
                    term.margin,
                )?;
                loss = (loss + (value * term.weight)?)?;
                if let Some(r) = log_ratio {
                    metrics.push((term.name.to_string(), r));
                }
            }
        }
        if dc.shape_choice_weight > 0.0 {
            if let Some(sc) = self.shape_choice_term(batch, &prompts, &pred, &nb, &means, rng)? {
                loss = (loss + (sc.loss.clone() * dc.shape_choice_weight)?)?;
                let ce = sc.loss.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
                metrics.push(("shape_choice".to_string(), ce));
                metrics.push(("shape_choice_acc".to_string(), sc.accuracy));
                metrics.push(("shape_gap".to_string(), sc.gap));
            }
        }
        let mut out = LossOutput::new(loss);
        out.metrics = metrics;
        Ok(out)
    }

    fn export(&self, dir: &Path, weights: &[(String, Tensor)]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // The frozen parts (the text encoder with freeze_text_encoder), as loaded.
        let mut weights = weights.to_vec();
        weights.extend(
            self.vars
                .vars()
                .into_iter()
                .filter(|(n, _)| self.frozen(n))
                .map(|(n, v)| (n, v.as_tensor().detach())),
        );
        let weights = &weights[..];
        let json = |v: &serde_json::Value| {
            serde_json::to_string_pretty(v)
                .map(|s| s + "\n")
                .map_err(|e| Error::Msg(e.to_string()))
        };
        write(&dir.join("model_index.json"), &json(&Self::model_index())?)?;
        // vdit's generation defaults (diffusers ignores the file): 25 steps, the clips' fps
        let generation = serde_json::json!({
            "num_inference_steps": 25,
            "guidance_scale": 6.0,
            "use_dynamic_cfg": false,
            "fps": self.train_cfg.data.fps,
        });
        write(&dir.join("generation_config.json"), &json(&generation)?)?;
        // scheduler
        let sd = dir.join("scheduler");
        std::fs::create_dir_all(&sd).map_err(|e| Error::io(&sd, e))?;
        write(
            &sd.join("scheduler_config.json"),
            &diffusers_config(
                "CogVideoXDDIMScheduler",
                &self.train_cfg.diffusion.scheduler,
            )?,
        )?;
        // transformer
        let td = dir.join("transformer");
        std::fs::create_dir_all(&td).map_err(|e| Error::io(&td, e))?;
        write(
            &td.join("config.json"),
            &diffusers_config("CogVideoXTransformer3DModel", &self.cfg.transformer)?,
        )?;
        let tw = component(weights, "transformer");
        save_weights(&td.join("diffusion_pytorch_model.safetensors"), &tw)?;
        // text encoder and tokenizer
        write_text_encoder_folder(
            &dir.join("text_encoder"),
            &self.cfg.text_encoder,
            &component(weights, "text_encoder"),
        )?;
        write_tokenizer_folder(
            &dir.join("tokenizer"),
            &self.tokenizer,
            self.cfg.transformer.max_text_seq_length,
        )?;
        // the VAE, as trained
        let vd = dir.join("vae");
        std::fs::create_dir_all(&vd).map_err(|e| Error::io(&vd, e))?;
        let src = &self.cfg.vae_dir;
        let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
        for e in entries {
            let p = e.map_err(|e| Error::io(src, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "config.json" {
                write(&vd.join(name), &vae_config_for_diffusers(&p)?)?;
            } else if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
                std::fs::copy(&p, vd.join(name)).map_err(|e| Error::io(&p, e))?;
            }
        }
        if let Some((n, mb, hits, misses)) = self.cache_stats() {
            tracing::info!(entries = n, mib = mb, hits, misses, "latent cache");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
