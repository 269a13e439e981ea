//! Text-to-video with CogVideoX, step for step as diffusers' `CogVideoXPipeline.__call__`
//! (diffusers 0.42.1, `pipelines/cogvideo/pipeline_cogvideox.py`).
//!
//! Layouts: latents are `[B, F, C, h, w]` (as the diffusers pipeline holds them); the VAE sees
//! `[B, C, F, h, w]`; frames come out as `[B, F, 3, H, W]` in `[0, 1]`.
//!
//! The steps: encode the prompt (T5, 226 tokens, no mask) or take embeddings; set the scheduler's
//! timesteps; draw or take the initial latents; build the RoPE tables when the transformer uses
//! them; then per timestep: duplicate the latents for CFG (`[negative; positive]`), run the
//! transformer, apply (dynamic) guidance in f32, and let the scheduler step. Finally drop
//! CogVideoX 1.5's padding frames, divide by the VAE's scaling factor and decode.
//!
//! This module holds the pipeline type, its loading, the prompt encoding (`encode_text`,
//! `prepare_text`) and `generate`; the steps themselves (`begin`, `initial_latents`, `denoise`,
//! `finish`, `encode_frames`, ...) are shared with image-to-video, video-to-video and extension
//! and live in the crate's `common` module.

use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use vdit_core::folder::PipelineFolder;
use vdit_core::{Error, Result};
use vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoX;
use vdit_models::text::t5::T5Encoder;
use vdit_models::text::tokenizer::TextTokenizer;
use vdit_models::transformers::cogvideox::CogVideoXTransformer3D;
use vdit_schedulers::{load_scheduler, NoiseSource, Scheduler};

use crate::common::TextConditioning;

/// A prompt as text, or as precomputed embeddings `[B, L, text_embed_dim]` (parity and debugging).
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Embeds(Tensor),
}

/// What [`CogVideoXPipeline::generate`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputKind {
    /// Decoded frames (and the final latents).
    #[default]
    Frames,
    /// Only the final latents; the VAE is not run.
    Latent,
}

/// Whether the text encoder stays in memory between calls. T5-XXL is ~9.5 GB in bf16, so a
/// one-shot CLI run loads it, encodes, and frees it before the transformer works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextEncoderPolicy {
    #[default]
    DropAfterUse,
    Keep,
}

/// One generation. Names follow diffusers' call parameters; `None` takes the model's default.
pub struct GenerateRequest {
    pub prompt: PromptInput,
    /// Defaults to the empty prompt when guidance is on, as diffusers.
    pub negative_prompt: Option<PromptInput>,
    /// Pixel frames, 4k+1; default: the transformer's `sample_frames`.
    pub num_frames: Option<usize>,
    /// Pixels, multiples of 16; default: `sample_height * 8`.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub use_dynamic_cfg: bool,
    /// Guidance only at timesteps ≤ this; the steps above it (the noisiest, where the layout is
    /// drawn) take the conditional prediction alone and skip the unconditional forward
    /// (guidance in a limited interval, Kynkäänniemi et al. 2024). `None`: every step.
    pub guidance_max_timestep: Option<usize>,
    /// φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2024),
    /// diffusers' `guidance_rescale`: each guided prediction is rescaled to the per-sample
    /// standard deviation of the conditional one, and mixed φ : 1 − φ with the plain guided
    /// prediction. It counters the over-saturation of strong guidance on zero-terminal-SNR
    /// schedules. 0 (off) to 1.
    pub guidance_rescale: f64,
    pub seed: u64,
    /// Initial noise `[B, F, C, h, w]`; drawn from `seed` when absent.
    pub latents: Option<Tensor>,
    /// Noise for stochastic schedulers; a generator seeded from `seed + 1` when absent.
    pub scheduler_noise: Option<Box<dyn NoiseSource>>,
    pub output: OutputKind,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: PromptInput::Text(String::new()),
            negative_prompt: None,
            num_frames: None,
            height: None,
            width: None,
            num_inference_steps: 50,
            guidance_scale: 6.0,
            use_dynamic_cfg: false,
            guidance_max_timestep: None,
            guidance_rescale: 0.0,
            seed: 42,
            latents: None,
            scheduler_noise: None,
            output: OutputKind::Frames,
        }
    }
}

/// What the observer hears. Returning `ControlFlow::Break(())` cancels the run.
#[derive(Debug)]
pub enum Event<'a> {
    /// The resolved settings, before any heavy work.
    Started {
        num_frames: usize,
        height: usize,
        width: usize,
        steps: usize,
    },
    TextEncoded,
    /// After step `index` (0-based) of `total`.
    Step {
        index: usize,
        total: usize,
        timestep: usize,
        guidance_scale: f64,
        /// The transformer's raw output for this step (`[2B, ...]` with guidance).
        model_output: &'a Tensor,
        /// The latents after the scheduler step.
        latents: &'a Tensor,
    },
    Decoding,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Final latents `[B, F, C, h, w]` (including 1.5's padding frames, as diffusers' latent output).
    pub latents: Tensor,
    /// Frames `[B, F, 3, H, W]` in `[0, 1]`, when decoded.
    pub frames: Option<Tensor>,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
}

/// A loaded CogVideoX pipeline: transformer, VAE, scheduler, and (lazily) the text encoder.
pub struct CogVideoXPipeline {
    pub folder: PipelineFolder,
    pub transformer: CogVideoXTransformer3D,
    pub vae: AutoencoderKLCogVideoX,
    pub scheduler: Box<dyn Scheduler>,
    /// The folder's recommended settings (`generation_config.json`, else diffusers').
    pub defaults: crate::GenerationDefaults,
    text_encoder: Option<T5Encoder>,
    tokenizer: Option<TextTokenizer>,
    text_encoder_dir: Option<PathBuf>,
    pub text_encoder_policy: TextEncoderPolicy,
    dtype: DType,
    device: Device,
}

impl CogVideoXPipeline {
    /// Loads a diffusers-format folder (`model_index.json`, `transformer/`, `vae/`,
    /// `scheduler/`, and optionally `text_encoder/` + `tokenizer/`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let folder = PipelineFolder::open(dir)?;
        let _span = tracing::info_span!("load", model = %dir.display()).entered();
        let transformer =
            CogVideoXTransformer3D::load(&folder.component("transformer")?, dtype, device)?;
        // The VAE runs in f32 unless asked otherwise: it is small and f16 on CPU is no faster.
        let vae = AutoencoderKLCogVideoX::load(&folder.component("vae")?, dtype, device)?;
        let scheduler = load_scheduler(&folder.component("scheduler")?)?;
        let tokenizer = match folder.optional_component("tokenizer") {
            Some(d) => Some(TextTokenizer::load(&d)?),
            None => None,
        };
        let text_encoder_dir = folder.optional_component("text_encoder");
        let defaults = crate::GenerationDefaults::load(&folder.root)?;
        let t = transformer.config();
        let v = vae.config();
        if v.latent_channels != t.in_channels && v.latent_channels * 2 != t.in_channels {
            return Err(Error::config(
                folder.root.join("transformer/config.json"),
                "in_channels",
                format!(
                    "{} does not fit the VAE's latent_channels {} (expected equal, or twice for image-to-video)",
                    t.in_channels, v.latent_channels
                ),
            ));
        }
        Ok(Self {
            folder,
            transformer,
            vae,
            scheduler,
            defaults,
            text_encoder: None,
            tokenizer,
            text_encoder_dir,
            text_encoder_policy: TextEncoderPolicy::default(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// (frames, height, width) the model was trained at: the defaults of a request.
    pub fn default_size(&self) -> (usize, usize, usize) {
        let t = self.transformer.config();
        let s = self.vae_scale_spatial();
        (t.sample_frames, t.sample_height * s, t.sample_width * s)
    }

    /// Checks a request's sizes and returns (num_frames, height, width), resolved.
    pub fn resolve_size(&self, req: &GenerateRequest) -> Result<(usize, usize, usize)> {
        let (df, dh, dw) = self.default_size();
        let (f, h, w) = (
            req.num_frames.unwrap_or(df),
            req.height.unwrap_or(dh),
            req.width.unwrap_or(dw),
        );
        let tc = (self.vae.config().temporal_compression_ratio as usize).max(1);
        if f == 0 || (f - 1) % tc != 0 {
            return Err(Error::invalid(
                "num_frames",
                format!(
                    "must be {tc}k+1 (e.g. {}, {}), got {f}",
                    tc * ((f.max(1) - 1) / tc) + 1,
                    tc * ((f.max(1) - 1) / tc + 1) + 1
                ),
            ));
        }
        let m = self.vae_scale_spatial() * self.transformer.config().patch_size;
        for (name, v) in [("height", h), ("width", w)] {
            if v == 0 || v % m != 0 {
                return Err(Error::invalid(
                    name,
                    format!("must be a positive multiple of {m}, got {v}"),
                ));
            }
        }
        if req.num_inference_steps == 0
            || req.num_inference_steps > self.scheduler.num_train_timesteps()
        {
            return Err(Error::invalid(
                "num_inference_steps",
                format!(
                    "must be between 1 and {}, got {}",
                    self.scheduler.num_train_timesteps(),
                    req.num_inference_steps
                ),
            ));
        }
        if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
            return Err(Error::invalid(
                "guidance_scale",
                format!("must be a finite number >= 0, got {}", req.guidance_scale),
            ));
        }
        if !(0.0..=1.0).contains(&req.guidance_rescale) {
            return Err(Error::invalid(
                "guidance_rescale",
                format!("must be in [0, 1], got {}", req.guidance_rescale),
            ));
        }
        Ok((f, h, w))
    }

    /// T5 embeddings `[B, max_text_seq_length, D]` for prompts, as diffusers' `_get_t5_prompt_embeds`.
    pub fn encode_text(&mut self, prompts: &[&str]) -> Result<Tensor> {
        let max_len = self.transformer.config().max_text_seq_length;
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| self.no_component("tokenizer"))?;
        let ids = tok.encode_padded(prompts, max_len)?;
        if self.text_encoder.is_none() {
            let dir = self
                .text_encoder_dir
                .as_ref()
                .ok_or_else(|| self.no_component("text_encoder"))?;
            let _span = tracing::info_span!("load_text_encoder").entered();
            self.text_encoder = Some(T5Encoder::load(dir, self.dtype, &self.device)?);
        }
        let enc = self.text_encoder.as_ref().expect("loaded above");
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (prompts.len(), max_len), &self.device)?;
        let embeds = enc.forward(&ids)?;
        Ok(embeds)
    }

    /// The error for a text prompt when the folder lacks the text component `name`.
    fn no_component(&self, name: &str) -> Error {
        Error::invalid(
            "prompt",
            format!(
                "{} has no {name}/ component; pass prompt embeddings instead",
                self.folder.root.display()
            ),
        )
    }

    /// Frees the text encoder (it is reloaded on the next text prompt).
    pub fn release_text_encoder(&mut self) {
        self.text_encoder = None;
    }

    fn prompt_embeds(&mut self, p: &PromptInput, what: &str) -> Result<Tensor> {
        let e = match p {
            PromptInput::Text(s) => self.encode_text(&[s.as_str()])?,
            PromptInput::Embeds(e) => e.clone(),
        };
        let t = self.transformer.config();
        let dims = e.dims();
        if dims.len() != 3 || dims[2] != t.text_embed_dim {
            return Err(Error::invalid(
                what,
                format!(
                    "expected shape [B, L, {}], found {dims:?}",
                    t.text_embed_dim
                ),
            ));
        }
        if !t.use_rotary_positional_embeddings && dims[1] != t.max_text_seq_length {
            return Err(Error::invalid(
                what,
                format!(
                    "this model adds sin-cos positions to the joint sequence, so the text length must be {} (max_text_seq_length), found {}",
                    t.max_text_seq_length, dims[1]
                ),
            ));
        }
        Ok(e.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
    /// Prompt embeddings for a request, with the negative ones stacked first when guidance is on.
    /// Frees the text encoder afterwards under [`TextEncoderPolicy::DropAfterUse`].
    pub(crate) fn prepare_text(&mut self, req: &mut GenerateRequest) -> Result<TextConditioning> {
        let do_cfg = req.guidance_scale > 1.0;
        let prompt_embeds = self.prompt_embeds(&req.prompt, "prompt_embeds")?;
        let batch = prompt_embeds.dim(0)?;
        let text = if do_cfg {
            let neg = req
                .negative_prompt
                .take()
                .unwrap_or_else(|| PromptInput::Text(String::new()));
            let neg = self.prompt_embeds(&neg, "negative_prompt_embeds")?;
            if neg.dims() != prompt_embeds.dims() {
                return Err(Error::invalid(
                    "negative_prompt_embeds",
                    format!(
                        "shape {:?} differs from prompt_embeds {:?}",
                        neg.dims(),
                        prompt_embeds.dims()
                    ),
                ));
            }
            Tensor::cat(&[&neg, &prompt_embeds], 0)?
        } else {
            prompt_embeds
        };
        if self.text_encoder_policy == TextEncoderPolicy::DropAfterUse {
            self.release_text_encoder();
        }
        Ok(TextConditioning { text, batch })
    }

    /// Runs a generation, reporting to `observer`; `Break` from the observer cancels with
    /// [`Error::Cancelled`].
    pub fn generate(
        &mut self,
        req: GenerateRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let size = self.resolve_size(&req)?;
        self.check_text_to_video("the prompt")?;
        let steps = req.num_inference_steps;
        // 1. Prompt embeddings: [B, L, D]; with guidance [negative; positive] -> [2B, L, D].
        let mut run = self.begin(req, size, steps, |_| Ok(()), observer)?;
        // 2. Timesteps.
        let timesteps = self.schedule(steps)?;
        // 3. Latents [B, F_lat, C, h, w]; CogVideoX 1.5 pads F_lat to a multiple of patch_size_t.
        let latents = self.initial_latents(&mut run)?;
        // 4. Denoising loop (with the RoPE tables of the 5B/1.5 models), then the decode: drop
        // padding frames, [B, F, C, h, w] -> [B, C, F, h, w] / scaling_factor.
        self.finish(run, latents, &timesteps, observer)
    }
}
