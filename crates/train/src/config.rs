//! The training config: one struct, every field with its default and what it does (nanoGPT
//! style). A config file (JSON, or TOML when the name ends in `.toml`) gives only the fields it
//! changes; unknown keys are errors naming the key, so a typo never trains the wrong thing.
//!
//! ```toml
//! stage = "toy"            # what to train: "toy" | "vae" | "transformer"
//! out_dir = "runs/toy"     # loss.jsonl, loss.png, checkpoints/, export/
//! seed = 0                 # initial weights, batches and noise all derive from it
//! steps = 200              # optimiser steps
//! batch_size = 4           # clips per micro-batch (a bucket may override it)
//! grad_accum = 1           # micro-batches per optimiser step
//! checkpoint_every = 100   # also at the end and when stopped
//! keep_checkpoints = 2     # newest N kept
//! plot_every = 50          # redraw loss.png every N steps (and at the end)
//! allow_unused_vars = false # a var without a gradient is an error (candle's fast ops drop them)
//! init_from = "runs/t2v/checkpoints/step-00007800"  # fine-tune: start from these weights
//!                          # (a checkpoint, or a diffusers folder: "models/vdit-shapes")
//!
//! [data]
//! split = "train"          # Shapes World split the clips come from
//! # world_seed = 0         # seed of the world's clips (default: `seed`)
//! # num_clips = 1000       # draw clip indices from 0..num_clips (default: unlimited)
//! fps = 8.0
//! antialias = true
//! buckets = [              # one bucket per batch, drawn with probability ∝ weight
//!   { width = 64, height = 64, frames = 1, weight = 0.3, batch_size = 8 },
//!   { width = 64, height = 64, frames = 17, weight = 0.7 },
//! ]
//!
//! [optim]                  # AdamW (decoupled weight decay, as torch.optim.AdamW)
//! lr = 1e-3                # peak learning rate, reached after warmup
//! min_lr = 1e-4            # floor of the cosine decay
//! warmup_steps = 100       # linear warmup from lr/warmup_steps
//! decay_steps = 0          # cosine decay ends here (0: at `steps`)
//! beta1 = 0.9
//! beta2 = 0.999
//! eps = 1e-8
//! weight_decay = 0.01
//! no_decay_1d = true       # no decay on vars of rank <= 1 (biases, norm scales)
//! no_decay = []            # and none on vars whose name contains one of these
//! lr_scale = {}            # per name prefix, a factor on lr: { "text_encoder." = 0.2 }
//! grad_clip = 1.0          # global-norm clipping threshold (0: off)
//!
//! [ema]
//! decay = 0.999            # 0: no EMA
//! warmup = true            # effective decay min(decay, (1+n)/(10+n)) after n updates
//!
//! [diffusion]
//! weighting = "cogvideox"  # "cogvideox": 1/(1-ᾱ_t)-weighted x̂₀ MSE; "none": plain MSE on the target
//! object_weight = 0.0      # transformer stage: latent cells near an object weigh 1 + this
//! object_dilate = 1        # ... cells within this many of an object's footprint count
//! object_max_t = 999       # ... only for samples noised at a timestep <= this
//! contrast_weight = 0.0    # transformer stage: weight of the caption-contrast term
//! contrast_margin = 0.2    # ... its margin on ln(err with another caption / err with its own)
//! contrast_partners = "batch" # ... the other caption: "batch" (another clip's) or "edit" (one word changed)
//! contrast_min_t = 0       # ... only for samples noised at a timestep >= this (both terms)
//! word_contrast_weight = 0.0 # transformer stage: weight of a second contrast, with one word changed
//! word_contrast_margin = 0.2 # ... its margin
//! word_contrast_words = ["colour", "shape", "size", "direction", "speed"] # ... the words it changes
//! timestep_bias = { begin = 0, end = 300, multiplier = 2.0 } # transformer stage: timesteps in begin..end drawn 2x as often (default: uniform)
//! shape_choice_weight = 0.0 # transformer stage: weight of the shape-choice term (x̂₀ nearer its own shape's latents than the others')
//! shape_choice_temperature = 0.25 # ... the softmax temperature (a perfect x̂₀ leads by 1/this)
//! shape_choice_max_t = 999  # ... only for samples noised at a timestep <= this
//! shape_choice_min_t = 0    # ... and >= this (e.g. only where the noise hides the shapes)
//! [diffusion.scheduler]    # CogVideoXDDIMScheduler config (diffusers names); default CogVideoX-2b's
//!
//! [model]                  # stage-specific, read by the stage's builder (the toy: channels, pool)
//! ```

use crate::data::Bucket;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vdit_core::{Error, Result};
use vdit_schedulers::CogVideoXSchedulerConfig;
use vdit_world::Split;

/// What a run trains. Each stage has a builder in [`crate::stages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A small conv net on pooled Shapes World frames, trained with the diffusion objective:
    /// proves the loop, logging, checkpoints and resume without the model crate.
    Toy,
    /// AutoencoderKLCogVideoX by reconstruction + KL (not plugged in yet).
    Vae,
    /// T5 text encoder + CogVideoX transformer on frozen VAE latents (not plugged in yet).
    Transformer,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Toy => "toy",
            Stage::Vae => "vae",
            Stage::Transformer => "transformer",
        }
    }
}

/// Everything a run needs. See the module docs for the file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What to train. Default `toy`.
    pub stage: Stage,
    /// Output folder (relative paths are relative to the working directory). Default
    /// `runs/<stage>`.
    pub out_dir: PathBuf,
    /// Seed of the initial weights, the batches and the noise. Default 0.
    pub seed: u64,
    /// Optimiser steps. Default 200.
    pub steps: u64,
    /// Clips per micro-batch, unless the bucket says otherwise. Default 4.
    pub batch_size: usize,
    /// Micro-batches (each its own bucket) per optimiser step. Default 1.
    pub grad_accum: usize,
    /// Checkpoint every N steps (also at the end and on a stop). Default 100.
    pub checkpoint_every: u64,
    /// Checkpoints kept, newest first. Default 2.
    pub keep_checkpoints: usize,
    /// Redraw `loss.png` every N steps (and at the end). Default 50.
    pub plot_every: u64,
    /// Accept trainable vars that get no gradient. Default false: that is candle's
    /// gradient-dropping trap (STACK.md), so it is an error naming the vars.
    pub allow_unused_vars: bool,
    /// Fine-tuning: the starting weights of a fresh run; the optimiser, EMA, step count and
    /// schedule start anew. A checkpoint folder (`<out_dir>/checkpoints/step-N` of an earlier
    /// run of the same model), a diffusers pipeline folder (an export such as
    /// `models/vdit-shapes`: the components the stage trains) or one component folder (e.g.
    /// `<model>/vae` for the VAE stage); see [`crate::checkpoint::load_model_weights`]. Every
    /// var must be there with its shape. Relative to the working directory, as `out_dir`. Ignored when resuming (the run's
    /// own checkpoint wins). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub ema: EmaConfig,
    pub diffusion: DiffusionConfig,
    /// Stage-specific model settings, read by the stage's builder.
    pub model: serde_json::Value,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Toy,
            out_dir: PathBuf::from("runs/toy"),
            seed: 0,
            steps: 200,
            batch_size: 4,
            grad_accum: 1,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            plot_every: 50,
            allow_unused_vars: false,
            init_from: None,
            data: DataConfig::default(),
            optim: OptimConfig::default(),
            ema: EmaConfig::default(),
            diffusion: DiffusionConfig::default(),
            model: serde_json::Value::Object(Default::default()),
        }
    }
}

/// Where batches come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Shapes World split. Default `train`.
    pub split: Split,
    /// Seed of the world's clips. Default: the run's `seed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world_seed: Option<u64>,
    /// Draw clip indices from `0..num_clips`. Default: unlimited (a fresh clip almost always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_clips: Option<u64>,
    /// Frame rate the clips are rendered at. Default 8.
    pub fps: f32,
    /// 4x4 supersampled renders. Default true.
    pub antialias: bool,
    /// The buckets; each batch is one of them. Default: 64x64, 96x64, 64x96, 112x64 at 1, 9 and
    /// 17 frames, sizes weighted 0.4/0.2/0.2/0.2 and lengths 0.3/0.3/0.4.
    pub buckets: Vec<Bucket>,
}

impl Default for DataConfig {
    fn default() -> Self {
        let sizes = [(64, 64, 0.4), (96, 64, 0.2), (64, 96, 0.2), (112, 64, 0.2)];
        let lengths = [(1, 0.3), (9, 0.3), (17, 0.4)];
        let mut buckets = Vec::new();
        for &(width, height, ws) in &sizes {
            for &(frames, wl) in &lengths {
                buckets.push(Bucket {
                    width,
                    height,
                    frames,
                    weight: ws * wl,
                    batch_size: None,
                    from_step: None,
                });
            }
        }
        Self {
            split: Split::Train,
            world_seed: None,
            num_clips: None,
            fps: 8.0,
            antialias: true,
            buckets,
        }
    }
}

/// AdamW and its learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Floor the cosine decays to. Default 1e-4.
    pub min_lr: f64,
    /// Linear warmup steps: step k (0-based) uses lr·(k+1)/warmup_steps. Default 100.
    pub warmup_steps: u64,
    /// The cosine reaches `min_lr` at this step and stays there; 0 means `steps`. Default 0.
    pub decay_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay. Default 0.01.
    pub weight_decay: f64,
    /// No weight decay on vars of rank <= 1 (biases, norm scales). Default true.
    pub no_decay_1d: bool,
    /// No weight decay on vars whose name contains one of these. Default none.
    pub no_decay: Vec<String>,
    /// Clip the global gradient norm to this (0: off). Default 1.0.
    pub grad_clip: f64,
    /// Per-part learning rates: a var whose name starts with a key here steps at lr × the
    /// value (its weight decay too), as a torch param group with its own lr; the longest
    /// matching key wins, 0 keeps the part still. E.g. `{ "text_encoder." = 0.2 }` lets a joint
    /// stage's text encoder move slower than its transformer. Each key must match a var.
    /// Default none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lr_scale: BTreeMap<String, f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            no_decay_1d: true,
            no_decay: Vec::new(),
            grad_clip: 1.0,
            lr_scale: BTreeMap::new(),
        }
    }
}

/// Exponential moving average of the weights (the exported weights when on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay per step; 0 turns EMA off. Default 0.999.
    pub decay: f64,
    /// Use min(decay, (1+n)/(10+n)) after n updates, so early weights fade fast. Default true.
    pub warmup: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.999,
            warmup: true,
        }
    }
}

/// How the diffusion loss weights timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    /// Plain MSE between the prediction and the scheduler's target (v, ε or x₀).
    None,
    /// CogVideoX's fine-tuning loss: x̂₀ from the v-prediction, MSE against x₀ weighted by
    /// 1/(1−ᾱ_t). For v-prediction this equals the plain v MSE in exact arithmetic.
    Cogvideox,
}

/// Whose caption a sample is contrasted with (`diffusion.contrast_partners`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastPartners {
    /// Another clip's caption: the next clip in the batch on the same background
    /// ([`crate::t2v_stage::contrast_partners`]).
    Batch,
    /// The sample's own caption with one object word changed (a colour, shape, size, direction
    /// or speed: [`crate::t2v_stage::edit_caption`]): a minimal pair, so the term rewards reading
    /// each attribute word rather than telling whole captions apart.
    Edit,
}

/// An attribute word of a caption that an edit may change (`diffusion.word_contrast_words`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionWord {
    Colour,
    Shape,
    Size,
    /// left, right, up or down
    Direction,
    /// slowly or quickly
    Speed,
}

impl CaptionWord {
    pub const ALL: [CaptionWord; 5] = [
        CaptionWord::Colour,
        CaptionWord::Shape,
        CaptionWord::Size,
        CaptionWord::Direction,
        CaptionWord::Speed,
    ];
}

/// The diffusion objective (used by the toy and transformer stages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionConfig {
    /// The noise schedule, as a `CogVideoXDDIMScheduler` config. Default: CogVideoX-2b's
    /// (v-prediction, SNR shift 3, zero terminal SNR, 1000 steps).
    pub scheduler: CogVideoXSchedulerConfig,
    /// Default `cogvideox`.
    pub weighting: LossWeighting,
    /// Transformer stage: the loss is a weighted mean whose latent cells at an object (a pixel
    /// of another colour than the clip's background in the cell's footprint, see
    /// [`crate::data::latent_object_weights`]) weigh `1 + object_weight`, the rest 1. Shapes
    /// World's objects cover a few percent of the frame, so with a plain mean the text that
    /// names them barely moves the loss. Default 0 (a plain mean).
    pub object_weight: f64,
    /// Latent cells within this many cells of an object's footprint count as the object's
    /// (the VAE spreads an edge into its neighbours). Default 1.
    pub object_dilate: usize,
    /// Object weighting applies to the samples noised at a timestep ≤ this; the others keep a
    /// plain mean. Where the noise hides where the objects are, weighting the cells where they
    /// are pulls the prediction towards objects everywhere (the weights depend on x₀); below
    /// this timestep x_t shows them. Default 999 (every sample).
    pub object_max_t: usize,
    /// Transformer stage: weight λ of a caption-contrast term. Each sample is also predicted
    /// with another sample's caption (the next in the batch with the same background, see
    /// [`crate::t2v_stage::contrast_partners`]; the same noise and timestep), and at its object
    /// cells (the mask of `object_weight`, dilated by `object_dilate`) the term asks the squared
    /// error with the wrong caption to exceed the error with its own by a factor e^margin:
    /// λ · mean over pairs of max(0, margin − ln(err_wrong / err_own)). It doubles the
    /// transformer's batch. The plain loss leaves the words that name the objects nearly
    /// worthless (an object's colour shows in x_t about when its place does); this term rewards
    /// reading them. Default 0 (off).
    pub contrast_weight: f64,
    /// The margin of `contrast_weight`'s term, on the log ratio of the errors. Default 0.2.
    pub contrast_margin: f64,
    /// The wrong captions of `contrast_weight`'s term: `batch` (another clip's) or `edit` (its
    /// own with one object word changed). Default `batch`.
    pub contrast_partners: ContrastPartners,
    /// The caption contrast applies to the samples noised at a timestep ≥ this; only those are
    /// predicted a second time. Below some timestep x_t shows the objects and the caption adds
    /// little to what the video gives; above it the caption decides what is drawn. Default 0
    /// (every sample).
    pub contrast_min_t: usize,
    /// Transformer stage: weight of a second caption-contrast term, beside `contrast_weight`'s
    /// (either may be on alone): each sample is also predicted with its own caption with one
    /// of `word_contrast_words` changed ([`crate::t2v_stage::edit_caption_of`]; the same
    /// noise and timestep, one forward with the others), with `word_contrast_margin` as the
    /// margin. With batch partners the margin can be met by the words the model already reads
    /// (a colour, a place); limited to one attribute, the term is met only by reading that
    /// word. Default 0 (off).
    pub word_contrast_weight: f64,
    /// The margin of `word_contrast_weight`'s term. Default 0.2.
    pub word_contrast_margin: f64,
    /// The attribute words `word_contrast_weight`'s term changes, one per sample, drawn among
    /// those the caption states. Default all five.
    pub word_contrast_words: Vec<CaptionWord>,
    /// Transformer stage: draw timesteps in `begin..end` `multiplier` times as often as the
    /// others (diffusers' `timestep_bias_strategy = "range"`), e.g. to train the low noise
    /// levels, where detail is drawn, more. Default none (uniform).
    pub timestep_bias: Option<TimestepBias>,
    /// Transformer stage: weight λ of the shape-choice term. For each sample (not on the empty
    /// prompt, noised at a timestep ≤ `shape_choice_max_t`) one object is drawn, the clip is
    /// rendered again with that object's shape replaced by each of the three others and
    /// encoded by the frozen VAE (posterior means μ_s; μ_own is the clip's own), and the
    /// model's x̂₀ is asked to be nearest its own: λ · the cross-entropy of the softmax over the
    /// four shapes of −‖x̂₀ − μ_s‖² / temperature, at the own shape. The squared error barely
    /// depends on an object's corners (a shape differs from the others in a few latent cells),
    /// so the plain loss leaves the shape word nearly worthless; this term is met only by
    /// drawing the named shape (not by a worse prediction under another caption). Each
    /// (bucket, clip, object) is encoded once while the latent cache has room. Default 0 (off).
    pub shape_choice_weight: f64,
    /// The temperature of `shape_choice_weight`'s softmax: the logit of each other shape is
    /// −(‖x̂₀ − μ_s‖² − ‖x̂₀ − μ_own‖²) / (‖μ_s − μ_own‖² · temperature), so a perfect x̂₀
    /// leads each other shape by 1/temperature and one halfway between ties. Default 0.25.
    pub shape_choice_temperature: f64,
    /// The shape-choice term applies to the samples noised at a timestep ≤ this. Default 999.
    pub shape_choice_max_t: usize,
    /// ... and ≥ this: e.g. only the noise levels where x_t no longer shows the shapes, so
    /// that the model has to commit to the named one where sampling decides it. Default 0.
    pub shape_choice_min_t: usize,
}

/// `diffusion.timestep_bias`: `{ begin = 0, end = 300, multiplier = 2.0 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestepBias {
    /// First timestep of the range.
    pub begin: usize,
    /// One past its last.
    pub end: usize,
    /// How much likelier each timestep in the range is, > 0.
    pub multiplier: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            scheduler: CogVideoXSchedulerConfig::cogvideox_2b(),
            weighting: LossWeighting::Cogvideox,
            object_weight: 0.0,
            object_dilate: 1,
            object_max_t: 999,
            contrast_weight: 0.0,
            contrast_margin: 0.2,
            contrast_partners: ContrastPartners::Batch,
            contrast_min_t: 0,
            word_contrast_weight: 0.0,
            word_contrast_margin: 0.2,
            word_contrast_words: CaptionWord::ALL.to_vec(),
            timestep_bias: None,
            shape_choice_weight: 0.0,
            shape_choice_temperature: 0.25,
            shape_choice_max_t: 999,
            shape_choice_min_t: 0,
        }
    }
}

/// The keys that may change between a run and its resumption (they do not change the
/// trajectory of the steps already taken... except `steps` when `optim.decay_steps` is 0, which
/// reshapes the cosine; resuming with another `steps` is allowed and logged).
pub const RESUMABLE_KEYS: [&str; 5] = [
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "plot_every",
    "out_dir",
];

impl TrainConfig {
    /// Reads a config file: TOML when the name ends in `.toml`, JSON otherwise. Errors name the
    /// file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let cfg = if is_toml {
            Self::from_toml(path, &text)?
        } else {
            Self::from_json(path, &text)?
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses JSON text (`file` names it in errors). Does not validate.
    pub fn from_json(file: &Path, text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "<json>", format!("not valid JSON: {e}")))?;
        Self::from_value(file, value)
    }

    /// Parses TOML text (`file` names it in errors). Does not validate.
    pub fn from_toml(file: &Path, text: &str) -> Result<Self> {
        let value: toml::Value = toml::from_str(text)
            .map_err(|e| Error::config(file, "<toml>", format!("not valid TOML: {e}")))?;
        let value = serde_json::to_value(value)
            .map_err(|e| Error::config(file, "<toml>", format!("cannot represent as JSON: {e}")))?;
        Self::from_value(file, value)
    }

    fn from_value(file: &Path, value: serde_json::Value) -> Result<Self> {
        let has_out_dir = value.get("out_dir").is_some();
        let mut cfg: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "<root>".to_string()
            } else {
                key
            };
            Error::config(file, key, e.inner().to_string())
        })?;
        if !has_out_dir {
            cfg.out_dir = PathBuf::from("runs").join(cfg.stage.name());
        }
        Ok(cfg)
    }

    /// Checks values that parse but cannot train. `file` names the config in errors.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(file, key, msg));
        if self.steps == 0 {
            return bad("steps", "expected at least 1, found 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "expected at least 1, found 0".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "expected at least 1, found 0".into());
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "expected at least 1, found 0".into());
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints", "expected at least 1, found 0".into());
        }
        if self.plot_every == 0 {
            return bad("plot_every", "expected at least 1, found 0".into());
        }
        if !(self.data.fps.is_finite() && self.data.fps > 0.0) {
            return bad(
                "data.fps",
                format!("expected a positive number, found {}", self.data.fps),
            );
        }
        if self.data.num_clips == Some(0) {
            return bad("data.num_clips", "expected at least 1, found 0".into());
        }
        if self.data.buckets.is_empty() {
            return bad(
                "data.buckets",
                "expected at least one bucket, found none".into(),
            );
        }
        for (i, b) in self.data.buckets.iter().enumerate() {
            b.validate()
                .map_err(|msg| Error::config(file, format!("data.buckets[{i}]"), msg))?;
        }
        if self.data.buckets.iter().all(|b| b.weight == 0.0) {
            return bad("data.buckets", "every bucket has weight 0".into());
        }
        if self.data.buckets.iter().all(|b| b.weight_at(0) == 0.0) {
            return bad(
                "data.buckets",
                "no bucket with weight > 0 starts at step 0 (from_step)".into(),
            );
        }
        let ow = self.diffusion.object_weight;
        if !(ow.is_finite() && ow >= 0.0) {
            return bad(
                "diffusion.object_weight",
                format!("expected a number >= 0 (0: a plain mean), found {ow}"),
            );
        }
        if ow > 0.0 && self.stage != Stage::Transformer {
            return bad(
                "diffusion.object_weight",
                format!(
                    "only the transformer stage weighs objects; this is a {:?} run (set 0)",
                    self.stage
                ),
            );
        }
        for (key, v) in [
            ("diffusion.contrast_weight", self.diffusion.contrast_weight),
            ("diffusion.contrast_margin", self.diffusion.contrast_margin),
            (
                "diffusion.word_contrast_weight",
                self.diffusion.word_contrast_weight,
            ),
            (
                "diffusion.word_contrast_margin",
                self.diffusion.word_contrast_margin,
            ),
            (
                "diffusion.shape_choice_weight",
                self.diffusion.shape_choice_weight,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("expected a number >= 0, found {v}"));
            }
        }
        if self.diffusion.contrast_partners != ContrastPartners::Batch
            && self.diffusion.contrast_weight == 0.0
        {
            return bad(
                "diffusion.contrast_partners",
                "\"edit\" takes effect only with the caption-contrast term, which is off \
                 (set diffusion.contrast_weight > 0, or drop this key)"
                    .to_string(),
            );
        }
        for (key, w) in [
            ("diffusion.contrast_weight", self.diffusion.contrast_weight),
            (
                "diffusion.word_contrast_weight",
                self.diffusion.word_contrast_weight,
            ),
            (
                "diffusion.shape_choice_weight",
                self.diffusion.shape_choice_weight,
            ),
        ] {
            if w > 0.0 && self.stage != Stage::Transformer {
                return bad(
                    key,
                    format!(
                        "only the transformer stage trains on captions; this is a {:?} run (set 0)",
                        self.stage
                    ),
                );
            }
        }
        if let Some(tb) = &self.diffusion.timestep_bias {
            let n = self.diffusion.scheduler.num_train_timesteps;
            if !(tb.begin < tb.end && tb.end <= n) {
                return bad(
                    "diffusion.timestep_bias",
                    format!(
                        "expected begin < end <= {n} (the schedule's timesteps), found begin {} end {}",
                        tb.begin, tb.end
                    ),
                );
            }
            if !(tb.multiplier.is_finite() && tb.multiplier > 0.0) {
                return bad(
                    "diffusion.timestep_bias.multiplier",
                    format!("expected a number > 0, found {}", tb.multiplier),
                );
            }
            if self.stage != Stage::Transformer {
                return bad(
                    "diffusion.timestep_bias",
                    format!(
                        "only the transformer stage reads it; this is a {:?} run",
                        self.stage
                    ),
                );
            }
        }
        let (lo, hi) = (
            self.diffusion.shape_choice_min_t,
            self.diffusion.shape_choice_max_t,
        );
        if lo > hi {
            return bad(
                "diffusion.shape_choice_min_t",
                format!(
                    "expected at most diffusion.shape_choice_max_t ({hi}): no timestep would be \
                     in the shape-choice term, found {lo}"
                ),
            );
        }
        let tau = self.diffusion.shape_choice_temperature;
        if !(tau.is_finite() && tau > 0.0) {
            return bad(
                "diffusion.shape_choice_temperature",
                format!("expected a number > 0, found {tau}"),
            );
        }
        if self.diffusion.word_contrast_weight > 0.0
            && self.diffusion.word_contrast_words.is_empty()
        {
            return bad(
                "diffusion.word_contrast_words",
                "expected at least one of \"colour\", \"shape\", \"size\", \"direction\", \"speed\" \
                 for the word-contrast term (word_contrast_weight > 0)"
                    .to_string(),
            );
        }
        let o = &self.optim;
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        if !finite_pos(o.lr) {
            return bad(
                "optim.lr",
                format!("expected a positive number, found {}", o.lr),
            );
        }
        if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad(
                "optim.min_lr",
                format!("expected 0 <= min_lr <= lr ({}), found {}", o.lr, o.min_lr),
            );
        }
        for (key, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("expected a value in [0, 1), found {v}"));
            }
        }
        if !finite_pos(o.eps) {
            return bad(
                "optim.eps",
                format!("expected a positive number, found {}", o.eps),
            );
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(
                "optim.weight_decay",
                format!("expected a number >= 0, found {}", o.weight_decay),
            );
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return bad(
                "optim.grad_clip",
                format!("expected a number >= 0 (0: off), found {}", o.grad_clip),
            );
        }
        if let Some((k, v)) = o
            .lr_scale
            .iter()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return bad(
                &format!("optim.lr_scale.\"{k}\""),
                format!("expected a factor >= 0, found {v}"),
            );
        }
        if o.decay_steps != 0 && o.decay_steps < o.warmup_steps {
            return bad(
                "optim.decay_steps",
                format!(
                    "{} is before the end of warmup ({})",
                    o.decay_steps, o.warmup_steps
                ),
            );
        }
        if !(0.0..1.0).contains(&self.ema.decay) {
            return bad(
                "ema.decay",
                format!(
                    "expected a value in [0, 1) (0: off), found {}",
                    self.ema.decay
                ),
            );
        }
        if !self.model.is_object() {
            return bad(
                "model",
                format!(
                    "expected a table/object of model settings, found {}",
                    self.model
                ),
            );
        }
        self.diffusion
            .scheduler
            .validate(file, "CogVideoXDDIMScheduler")
            .map_err(|e| match e {
                Error::Config { file, key, msg } => Error::Config {
                    file,
                    key: format!("diffusion.scheduler.{key}"),
                    msg,
                },
                other => other,
            })?;
        Ok(())
    }

    /// The seed of the world's clips.
    pub fn world_seed(&self) -> u64 {
        self.data.world_seed.unwrap_or(self.seed)
    }

    /// The keys (dotted paths) where `self` and `other` differ, ignoring [`RESUMABLE_KEYS`].
    pub fn incompatible_keys(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let mut out = Vec::new();
        diff_values("", &a, &b, &mut out);
        out.retain(|k| !RESUMABLE_KEYS.contains(&k.as_str()));
        out
    }
}

fn diff_values(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff_values(&p, u, v, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_give_the_same_config() {
        let toml = r#"
            stage = "toy"
            steps = 10
            [optim]
            lr = 2e-3
            [data]
            buckets = [{ width = 64, height = 64, frames = 9, weight = 1.0, batch_size = 2 }]
            [model]
            channels = 8
        "#;
        let json = r#"{"stage": "toy", "steps": 10, "optim": {"lr": 0.002},
            "data": {"buckets": [{"width": 64, "height": 64, "frames": 9, "weight": 1.0, "batch_size": 2}]},
            "model": {"channels": 8}}"#;
        let a = TrainConfig::from_toml(Path::new("a.toml"), toml).unwrap();
        let b = TrainConfig::from_json(Path::new("b.json"), json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.out_dir, Path::new("runs/toy"));
        let v = TrainConfig::from_json(Path::new("v.json"), r#"{"stage": "vae"}"#).unwrap();
        assert_eq!(v.out_dir, Path::new("runs/vae"));
        assert_eq!(a.optim.lr, 2e-3);
        assert_eq!(a.optim.beta2, 0.999);
        assert_eq!(a.data.buckets[0].batch_size, Some(2));
        assert_eq!(
            a.diffusion.scheduler,
            CogVideoXSchedulerConfig::cogvideox_2b()
        );
        a.validate(Path::new("a.toml")).unwrap();
    }

    #[test]
    fn the_shipped_toy_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/toy.toml");
        let c = TrainConfig::load(&p).unwrap();
        assert_eq!(c.stage, Stage::Toy);
        assert_eq!(c.data.buckets.len(), 5);
        assert_eq!(c.data.buckets[0].batch_size, Some(16));
        assert_eq!(c.ema.decay, 0.99);
    }

    /// Every committed config parses and validates: a misspelt key or a bad value in one fails
    /// here, not at the start of a leg of a long run.
    #[test]
    fn every_committed_config_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let c = TrainConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
                c.validate(&p).unwrap_or_else(|e| panic!("{e}"));
                names.push(p.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
        for want in [
            "t2v",
            "t2v_contrast",
            "t2v_contrast2",
            "t2v_contrast3",
            "t2v_contrast4",
            "toy",
            "vae",
            "vae_decoder",
            "vae_decoder2",
            "vae_decoder3",
            "vae_decoder4",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = TrainConfig::from_json(Path::new("c.json"), r#"{"optim": {"lrr": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.json") && e.contains("optim") && e.contains("lrr"),
            "{e}"
        );
        let e = TrainConfig::from_toml(Path::new("c.toml"), "steps = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml: steps"), "{e}");
        let mut cfg = TrainConfig::default();
        cfg.data.buckets[3].frames = 4;
        let e = cfg.validate(Path::new("d.toml")).unwrap_err().to_string();
        assert!(e.contains("data.buckets[3]") && e.contains("4"), "{e}");
        cfg = TrainConfig::default();
        cfg.optim.min_lr = 1.0;
        let e = cfg.validate(Path::new("d.toml")).unwrap_err().to_string();
        assert!(e.contains("optim.min_lr"), "{e}");
        cfg = TrainConfig::default();
        cfg.diffusion.object_weight = -1.0;
        let e = cfg.validate(Path::new("d.toml")).unwrap_err().to_string();
        assert!(
            e.contains("d.toml") && e.contains("diffusion.object_weight"),
            "{e}"
        );
        cfg.diffusion.object_weight = 2.0;
        cfg.stage = Stage::Toy;
        let e = cfg.validate(Path::new("d.toml")).unwrap_err().to_string();
        assert!(
            e.contains("diffusion.object_weight") && e.contains("Toy"),
            "{e}"
        );
        let err = |c: &TrainConfig| c.validate(Path::new("d.toml")).unwrap_err().to_string();
        cfg = TrainConfig::default();
        cfg.optim.lr_scale.insert("text_encoder.".into(), -0.5);
        let e = err(&cfg);
        assert!(
            e.contains("optim.lr_scale.\"text_encoder.\"") && e.contains("-0.5"),
            "{e}"
        );
        cfg = TrainConfig::default();
        cfg.diffusion.contrast_margin = f64::NAN;
        let e = err(&cfg);
        assert!(e.contains("diffusion.contrast_margin"), "{e}");
        cfg.diffusion.contrast_margin = 0.2;
        cfg.diffusion.contrast_weight = 0.1;
        cfg.stage = Stage::Vae;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.contrast_weight") && e.contains("Vae"),
            "{e}"
        );
        cfg.stage = Stage::Transformer;
        cfg.diffusion.contrast_weight = -0.1;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.contrast_weight") && e.contains("-0.1"),
            "{e}"
        );
        cfg.diffusion.contrast_weight = 0.0;
        cfg.diffusion.contrast_partners = ContrastPartners::Edit;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.contrast_partners") && e.contains("contrast_weight"),
            "{e}"
        );
        cfg.diffusion.contrast_weight = 0.1;
        cfg.validate(Path::new("c.toml")).unwrap();
        // the word-contrast term: its weight, margin, stage and words
        cfg.diffusion.word_contrast_margin = -1.0;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.word_contrast_margin") && e.contains("-1"),
            "{e}"
        );
        cfg.diffusion.word_contrast_margin = 0.5;
        cfg.diffusion.word_contrast_weight = 0.2;
        cfg.stage = Stage::Toy;
        cfg.diffusion.contrast_weight = 0.0;
        cfg.diffusion.contrast_partners = ContrastPartners::Batch;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.word_contrast_weight") && e.contains("Toy"),
            "{e}"
        );
        cfg.stage = Stage::Transformer;
        cfg.diffusion.word_contrast_words.clear();
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.word_contrast_words") && e.contains("\"shape\""),
            "{e}"
        );
        // the timestep bias: a range within the schedule, a positive multiplier
        cfg.diffusion.word_contrast_words = vec![CaptionWord::Shape];
        cfg.validate(Path::new("c.toml")).unwrap();
        for (begin, end, m, key) in [
            (300, 300, 2.0, "diffusion.timestep_bias"),
            (0, 1001, 2.0, "diffusion.timestep_bias"),
            (0, 300, 0.0, "diffusion.timestep_bias.multiplier"),
        ] {
            cfg.diffusion.timestep_bias = Some(TimestepBias {
                begin,
                end,
                multiplier: m,
            });
            let e = err(&cfg);
            assert!(e.contains(key) && e.contains("expected"), "{e}");
        }
        cfg.diffusion.timestep_bias = Some(TimestepBias {
            begin: 0,
            end: 300,
            multiplier: 3.0,
        });
        cfg.validate(Path::new("c.toml")).unwrap();
        cfg.stage = Stage::Vae;
        cfg.diffusion.word_contrast_weight = 0.0;
        cfg.diffusion.contrast_weight = 0.0;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.timestep_bias") && e.contains("Vae"),
            "{e}"
        );
        cfg.stage = Stage::Transformer;
        // the shape-choice term: its weight, temperature and stage
        cfg.diffusion.shape_choice_weight = -0.1;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.shape_choice_weight") && e.contains("-0.1"),
            "{e}"
        );
        cfg.diffusion.shape_choice_weight = 0.2;
        for tau in [0.0, -1.0, f64::NAN] {
            cfg.diffusion.shape_choice_temperature = tau;
            let e = err(&cfg);
            assert!(
                e.contains("diffusion.shape_choice_temperature") && e.contains("> 0"),
                "{e}"
            );
        }
        cfg.diffusion.shape_choice_temperature = 0.25;
        cfg.validate(Path::new("c.toml")).unwrap();
        cfg.diffusion.shape_choice_min_t = 600;
        cfg.diffusion.shape_choice_max_t = 500;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.shape_choice_min_t") && e.contains("(500)") && e.contains("600"),
            "{e}"
        );
        cfg.diffusion.shape_choice_max_t = 999;
        cfg.validate(Path::new("c.toml")).unwrap();
        cfg.stage = Stage::Vae;
        cfg.diffusion.timestep_bias = None;
        let e = err(&cfg);
        assert!(
            e.contains("diffusion.shape_choice_weight") && e.contains("Vae"),
            "{e}"
        );
        cfg.stage = Stage::Transformer;
        cfg.diffusion.shape_choice_weight = 0.0;
        let words = TrainConfig::from_toml(
            Path::new("w.toml"),
            "stage = \"transformer\"\n[diffusion]\nword_contrast_weight = 0.2\n\
             word_contrast_words = [\"shape\", \"direction\"]\n",
        )
        .unwrap();
        assert_eq!(
            words.diffusion.word_contrast_words,
            [CaptionWord::Shape, CaptionWord::Direction]
        );
        words.validate(Path::new("w.toml")).unwrap();
        let bad_word = TrainConfig::from_toml(
            Path::new("h.toml"),
            "[diffusion]\nword_contrast_words = [\"hue\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad_word.contains("h.toml")
                && bad_word.contains("word_contrast_words")
                && bad_word.contains("hue")
                && bad_word.contains("shape"),
            "{bad_word}"
        );
    }

    #[test]
    fn default_buckets_cover_sizes_and_lengths() {
        let d = DataConfig::default();
        assert_eq!(d.buckets.len(), 12);
        let total: f64 = d.buckets.iter().map(|b| b.weight).sum();
        assert!((total - 1.0).abs() < 1e-12);
        for (w, h) in [(64, 64), (96, 64), (64, 96), (112, 64)] {
            for f in [1, 9, 17] {
                assert!(d
                    .buckets
                    .iter()
                    .any(|b| b.width == w && b.height == h && b.frames == f));
            }
        }
        TrainConfig::default().validate(Path::new("x")).unwrap();
    }

    #[test]
    fn incompatible_keys_ignore_resumable_ones() {
        let a = TrainConfig::default();
        let mut b = a.clone();
        b.steps = 999;
        b.checkpoint_every = 7;
        assert!(a.incompatible_keys(&b).is_empty());
        b.optim.lr = 5.0;
        b.data.fps = 4.0;
        assert_eq!(a.incompatible_keys(&b), vec!["data.fps", "optim.lr"]);
    }
}
