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
//! The pieces below `generate` (`prepare_text`, `latent_frames`, `rope_tables`, `denoise`,
//! `encode_frames`) are shared with image-to-video, video-to-video and extension.

use candle_core::{DType, Device, Tensor};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use vdit_core::folder::PipelineFolder;
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};
use vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoX;
use vdit_models::text::t5::T5Encoder;
use vdit_models::text::tokenizer::TextTokenizer;
use vdit_models::transformers::cogvideox::{cogvideox_rotary_pos_embed, CogVideoXTransformer3D};
use vdit_schedulers::{load_scheduler, NoiseSource, Scheduler};

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

/// Prompt embeddings ready for the transformer: `[B, L, D]`, or `[2B, L, D]` as
/// `[negative; positive]` when guidance is on.
pub(crate) struct TextConditioning {
    pub text: Tensor,
    /// B: videos per call.
    pub batch: usize,
}

/// The settings of one denoising loop ([`CogVideoXPipeline::denoise`]).
pub(crate) struct Denoise<'a> {
    pub text: &'a Tensor,
    pub batch: usize,
    pub guidance_scale: f64,
    pub use_dynamic_cfg: bool,
    /// N in CogVideoX's dynamic guidance formula: the steps of the schedule (video-to-video: the
    /// steps left after the strength cut, as diffusers).
    pub dynamic_cfg_steps: usize,
    pub timesteps: &'a [usize],
    pub rope: Option<&'a (Tensor, Tensor)>,
    /// Image latents `[B, F, C, h, w]`, appended to the latents on channels (image-to-video).
    pub image_latents: Option<&'a Tensor>,
    /// CogVideoX 1.5 I2V's `ofs` input (`[1]`, 2.0).
    pub ofs: Option<&'a Tensor>,
    pub noise: &'a mut dyn NoiseSource,
    /// Reported step indices start here and run to `step_total` (several loops, one progress).
    pub step_offset: usize,
    pub step_total: usize,
}

/// Observer results to `Result`: `Break` cancels.
pub(crate) fn notify(flow: ControlFlow<()>) -> Result<()> {
    match flow {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}

/// The scheduler's noise when the request gives none: a generator seeded from `seed + 1`.
pub(crate) fn default_scheduler_noise(seed: u64) -> Box<dyn NoiseSource> {
    Box::new(NoiseRng::new(seed.wrapping_add(1)))
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

/// diffusers' `vae_scale_factor_spatial` for the VAE: 2^(number of blocks - 1).
fn vae_scale_spatial(vae: &AutoencoderKLCogVideoX) -> usize {
    1 << (vae.config().block_out_channels.len().saturating_sub(1))
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
        let s = vae_scale_spatial(&self.vae);
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
        let m = vae_scale_spatial(&self.vae) * self.transformer.config().patch_size;
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
        Ok((f, h, w))
    }

    /// T5 embeddings `[B, max_text_seq_length, D]` for prompts, as diffusers' `_get_t5_prompt_embeds`.
    pub fn encode_text(&mut self, prompts: &[&str]) -> Result<Tensor> {
        let max_len = self.transformer.config().max_text_seq_length;
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::invalid(
                "prompt",
                format!(
                    "{} has no tokenizer/ component; pass prompt embeddings instead",
                    self.folder.root.display()
                ),
            )
        })?;
        let ids = tok.encode_padded(prompts, max_len)?;
        if self.text_encoder.is_none() {
            let dir = self.text_encoder_dir.as_ref().ok_or_else(|| {
                Error::invalid(
                    "prompt",
                    format!(
                        "{} has no text_encoder/ component; pass prompt embeddings instead",
                        self.folder.root.display()
                    ),
                )
            })?;
            let _span = tracing::info_span!("load_text_encoder").entered();
            self.text_encoder = Some(T5Encoder::load(dir, self.dtype, &self.device)?);
        }
        let enc = self.text_encoder.as_ref().expect("loaded above");
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (prompts.len(), max_len), &self.device)?;
        let embeds = enc.forward(&ids)?;
        Ok(embeds)
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

    /// Runs a generation, reporting to `observer`; `Break` from the observer cancels with
    /// [`Error::Cancelled`].
    pub fn generate(
        &mut self,
        mut req: GenerateRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let (num_frames, height, width) = self.resolve_size(&req)?;
        self.check_text_to_video("the prompt")?;
        let steps = req.num_inference_steps;
        notify(observer(Event::Started {
            num_frames,
            height,
            width,
            steps,
        }))?;

        // 1. Prompt embeddings: [B, L, D]; with guidance [negative; positive] -> [2B, L, D].
        let cond = self.prepare_text(&mut req)?;
        notify(observer(Event::TextEncoded))?;

        // 2. Timesteps.
        self.scheduler.set_timesteps(steps)?;
        let timesteps = self.scheduler.timesteps().to_vec();

        // 3. Latents [B, F_lat, C, h, w]; CogVideoX 1.5 pads F_lat to a multiple of patch_size_t.
        let (latent_frames, additional_frames) = self.latent_frames(num_frames);
        let s = self.vae_scale_spatial();
        let shape = [
            cond.batch,
            latent_frames,
            self.transformer.config().in_channels,
            height / s,
            width / s,
        ];
        let latents = match req.latents.take() {
            Some(l) => self.check_latents(
                l,
                shape,
                &format!("{num_frames} frames at {height}x{width}"),
            )?,
            None => NoiseRng::new(req.seed).randn(shape.to_vec(), &self.device)?,
        };
        let latents = (latents * self.scheduler.init_noise_sigma())?;
        let mut noise = req
            .scheduler_noise
            .take()
            .unwrap_or_else(|| default_scheduler_noise(req.seed));

        // 4. RoPE tables for the 5B/1.5 models.
        let rope = self.rope_tables(height, width, latent_frames)?;

        // 5. Denoising loop.
        let latents = self.denoise(
            latents,
            Denoise {
                text: &cond.text,
                batch: cond.batch,
                guidance_scale: req.guidance_scale,
                use_dynamic_cfg: req.use_dynamic_cfg,
                dynamic_cfg_steps: steps,
                timesteps: &timesteps,
                rope: rope.as_ref(),
                image_latents: None,
                ofs: None,
                noise: noise.as_mut(),
                step_offset: 0,
                step_total: timesteps.len(),
            },
            &mut |_, _, x| Ok(x),
            observer,
        )?;

        // 6. Decode: drop padding frames, [B, F, C, h, w] -> [B, C, F, h, w] / scaling_factor.
        let frames = match req.output {
            OutputKind::Latent => None,
            OutputKind::Frames => {
                notify(observer(Event::Decoding))?;
                Some(self.decode_latents(&latents.narrow(
                    1,
                    additional_frames,
                    latent_frames - additional_frames,
                )?)?)
            }
        };
        Ok(GenerateOutput {
            latents,
            frames,
            num_frames,
            height,
            width,
        })
    }

    // ----------------------------------------------------------------------------------------
    // Pieces shared by text-to-video, image-to-video, video-to-video and extension.

    /// diffusers' `vae_scale_factor_spatial`: 2^(number of VAE blocks - 1).
    pub fn vae_scale_spatial(&self) -> usize {
        vae_scale_spatial(&self.vae)
    }

    /// diffusers' `vae_scale_factor_temporal`: the VAE's `temporal_compression_ratio`.
    pub fn vae_scale_temporal(&self) -> usize {
        (self.vae.config().temporal_compression_ratio as usize).max(1)
    }

    /// Whether the transformer takes image latents on its channels (`in_channels` = 2 x the VAE's
    /// `latent_channels`, as CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V).
    pub fn is_image_to_video(&self) -> bool {
        self.transformer.config().in_channels == 2 * self.vae.config().latent_channels
    }

    /// An error unless the model denoises plain latents (a text-to-video model).
    pub(crate) fn check_text_to_video(&self, what: &str) -> Result<()> {
        if self.is_image_to_video() {
            return Err(Error::invalid(
                "image",
                format!(
                    "{} is an image-to-video model (transformer in_channels {} = 2 x the VAE's latent_channels {}): it needs a conditioning image, which {what} does not give",
                    self.folder.root.display(),
                    self.transformer.config().in_channels,
                    self.vae.config().latent_channels
                ),
            ));
        }
        Ok(())
    }

    /// Latent frames for `num_frames` pixel frames, padded for CogVideoX 1.5 to a multiple of
    /// `patch_size_t`: returns (padded latent frames, padding frames added at the front).
    pub fn latent_frames(&self, num_frames: usize) -> (usize, usize) {
        let mut latent_frames = (num_frames - 1) / self.vae_scale_temporal() + 1;
        let mut additional = 0;
        if let Some(pt) = self.transformer.config().patch_size_t.filter(|&p| p > 1) {
            if !latent_frames.is_multiple_of(pt) {
                additional = pt - latent_frames % pt;
                latent_frames += additional;
            }
        }
        (latent_frames, additional)
    }

    /// Checks caller-supplied latents (or noise) against the shape the request needs and moves
    /// them to the pipeline's device as f32.
    pub(crate) fn check_latents(&self, l: Tensor, want: [usize; 5], what: &str) -> Result<Tensor> {
        let s = self.vae_scale_spatial();
        if l.dims() != want {
            return Err(Error::invalid(
                "latents",
                format!(
                    "expected shape {want:?} [B, F, C, H/{s}, W/{s}] for {what}, found {:?}",
                    l.dims()
                ),
            ));
        }
        Ok(l.to_device(&self.device)?.to_dtype(DType::F32)?)
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

    /// RoPE tables `(cos, sin)`, each `[F'·h/p·w/p, head_dim]`, when the transformer uses them.
    pub(crate) fn rope_tables(
        &self,
        height: usize,
        width: usize,
        latent_frames: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let tcfg = self.transformer.config();
        if !tcfg.use_rotary_positional_embeddings {
            return Ok(None);
        }
        Ok(Some(cogvideox_rotary_pos_embed(
            tcfg,
            height,
            width,
            latent_frames,
            self.vae_scale_spatial(),
            &self.device,
        )?))
    }

    /// The denoising loop of every CogVideoX pipeline. Per timestep: `prepare` may rewrite the
    /// latents (extension's latent replacement; identity otherwise), the latents are duplicated
    /// for CFG (`[negative; positive]`), image latents are appended on channels (image-to-video),
    /// the transformer runs, (dynamic) guidance is applied in f32 and the scheduler steps.
    pub(crate) fn denoise(
        &mut self,
        mut latents: Tensor,
        d: Denoise<'_>,
        prepare: &mut dyn FnMut(usize, usize, Tensor) -> Result<Tensor>,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let do_cfg = d.guidance_scale > 1.0;
        let batch = d.batch;
        let image_in = match d.image_latents {
            Some(img) if do_cfg => Some(Tensor::cat(&[img, img], 0)?),
            Some(img) => Some(img.clone()),
            None => None,
        };
        let rope_ref = d.rope.map(|(c, s)| (c, s));
        for (i, &t) in d.timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("step", i, t).entered();
            latents = prepare(i, t, latents)?;
            let model_in = if do_cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = self.scheduler.scale_model_input(&model_in, t)?;
            // [2B, F, C, h, w] ++ [2B, F, C, h, w] on channels -> [2B, F, 2C, h, w]
            let model_in = match &image_in {
                Some(img) => Tensor::cat(&[&model_in, img], 2)?,
                None => model_in,
            };
            let tt = Tensor::full(t as f32, model_in.dim(0)?, &self.device)?;
            let ofs = d.ofs.map(|o| o.to_dtype(self.dtype)).transpose()?;
            let model_output = self
                .transformer
                .forward(
                    &model_in.to_dtype(self.dtype)?,
                    d.text,
                    &tt,
                    rope_ref,
                    ofs.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let mut g = d.guidance_scale;
            if d.use_dynamic_cfg {
                // diffusers drives this by the timestep value, not the step index.
                let n = d.dynamic_cfg_steps as f64;
                let x = ((n - t as f64) / n).powf(5.0);
                g = 1.0 + d.guidance_scale * ((1.0 - (std::f64::consts::PI * x).cos()) / 2.0);
            }
            let noise_pred = if do_cfg {
                let uncond = model_output.narrow(0, 0, batch)?;
                let cond = model_output.narrow(0, batch, batch)?;
                // uncond + g·(cond − uncond), with g rounded to f32 as torch does
                (&uncond + ((&cond - &uncond)? * (g as f32) as f64)?)?
            } else {
                model_output.clone()
            };
            latents = self.scheduler.step(&noise_pred, t, &latents, d.noise)?;
            notify(observer(Event::Step {
                index: d.step_offset + i,
                total: d.step_total,
                timestep: t,
                guidance_scale: g,
                model_output: &model_output,
                latents: &latents,
            }))?;
        }
        Ok(latents)
    }

    /// Encodes frames `[B, F, 3, H, W]` in `[0, 1]` with the VAE: the posterior over
    /// `[B, C, F', h, w]` (frames mapped to `[-1, 1]` as diffusers' `VaeImageProcessor`).
    pub(crate) fn encode_frames(
        &self,
        frames: &Tensor,
    ) -> Result<vdit_models::autoencoders::cogvideox_vae::DiagonalGaussian> {
        let _span = tracing::info_span!("vae_encode").entered();
        // [B, F, 3, H, W] in [0, 1] -> [B, 3, F, H, W] in [-1, 1]
        let x = frames
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .affine(2.0, -1.0)?
            .permute((0, 2, 1, 3, 4))?
            .to_dtype(self.dtype)?;
        let post = self.vae.encode(&x)?;
        let (_, _, _, h, w) = frames.dims5()?;
        let s = self.vae_scale_spatial();
        let (_, _, _, lh, lw) = post.mean.dims5()?;
        if (lh, lw) != (h / s, w / s) {
            let t = self.vae.tile_options();
            return Err(Error::Msg(format!(
                "the VAE encoded {w}x{h} frames to {lw}x{lh} latents, expected {}x{}: its tiled encode (used above {}x{} px, half the VAE's sample size) does not tile this size evenly; use a VAE whose sample_width/sample_height are at least twice the frame size",
                w / s,
                h / s,
                t.tile_sample_min_width,
                t.tile_sample_min_height
            )));
        }
        Ok(vdit_models::autoencoders::cogvideox_vae::DiagonalGaussian {
            mean: post.mean.to_dtype(DType::F32)?,
            logvar: post.logvar.to_dtype(DType::F32)?,
        })
    }

    /// Latents `[B, F, C, h, w]` to frames `[B, F', 3, H, W]` in `[0, 1]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_decode").entered();
        let sf = self.vae.config().scaling_factor;
        // [B, F, C, h, w] -> [B, C, F, h, w]
        let z = (latents.permute((0, 2, 1, 3, 4))?.to_dtype(self.dtype)? / sf)?;
        let video = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        // [B, 3, F, H, W] -> [B, F, 3, H, W], (x/2 + 0.5).clamp(0, 1)
        let video = (video.permute((0, 2, 1, 3, 4))? / 2.0)?;
        Ok((video + 0.5)?.clamp(0f32, 1f32)?)
    }
}
