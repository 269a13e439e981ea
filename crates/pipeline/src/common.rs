//! The steps every CogVideoX mode shares, so that text-to-video, image-to-video, video-to-video
//! and extension keep only what is their own.
//!
//! A run (`generate`, `image_to_video`, `video_to_video`) goes: check the inputs (the mode's);
//! [`CogVideoXPipeline::begin`]: report `Started`, encode the prompts (with the negative ones for
//! CFG) and report `TextEncoded`; set the timesteps ([`CogVideoXPipeline::schedule`], cut by
//! strength for video-to-video); [`CogVideoXPipeline::initial_latents`]: the request's latents or
//! fresh ones (noise; the noised video for video-to-video), times `init_noise_sigma`; the image
//! latents (image-to-video); [`CogVideoXPipeline::finish`]: the denoising loop
//! ([`CogVideoXPipeline::denoise`]) and the decode of the real frames. Extension runs its own
//! windows on the same pieces ([`CogVideoXPipeline::encode_prompts`], [`Denoise::new`], `denoise`).
//!
//! Layouts as in text-to-video: latents `[B, F, C, h, w]`, the VAE's `[B, C, F, h, w]`, frames
//! `[B, F, 3, H, W]` in `[0, 1]`.

use candle_core::{DType, Tensor};
use std::ops::ControlFlow;
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};
use vdit_models::autoencoders::cogvideox_vae::DiagonalGaussian;
use vdit_models::transformers::cogvideox::cogvideox_rotary_pos_embed;
use vdit_schedulers::NoiseSource;

use crate::{CogVideoXPipeline, Event, GenerateOutput, GenerateRequest, OutputKind};

/// Prompt embeddings ready for the transformer: `[B, L, D]`, or `[2B, L, D]` as
/// `[negative; positive]` when guidance is on.
pub(crate) struct TextConditioning {
    pub text: Tensor,
    /// B: videos per call.
    pub batch: usize,
}

/// A text-, image- or video-to-video run once its prompts are encoded
/// ([`CogVideoXPipeline::begin`]), on its way to [`CogVideoXPipeline::finish`].
pub(crate) struct Run {
    pub req: GenerateRequest,
    pub cond: TextConditioning,
    /// The resolved (num_frames, height, width).
    pub size: (usize, usize, usize),
    /// Latent frames, padded for CogVideoX 1.5 ([`CogVideoXPipeline::latent_frames`]).
    pub latent_frames: usize,
    /// The padding frames among them, at the front: dropped before decoding.
    pub padding: usize,
    /// N in CogVideoX's dynamic guidance formula ([`Denoise::dynamic_cfg_steps`]): the request's
    /// steps unless the mode says otherwise.
    pub dynamic_cfg_steps: usize,
    /// Image-to-video's image latents `[B, F, C, h, w]`.
    pub image_latents: Option<Tensor>,
    /// CogVideoX 1.5 I2V's `ofs` input ([`CogVideoXPipeline::ofs_input`]).
    pub ofs: Option<Tensor>,
}

/// The settings of one denoising loop ([`CogVideoXPipeline::denoise`]).
pub(crate) struct Denoise<'a> {
    pub text: &'a Tensor,
    pub batch: usize,
    pub guidance_scale: f64,
    pub use_dynamic_cfg: bool,
    /// Guidance only at timesteps ≤ this ([`GenerateRequest::guidance_max_timestep`]).
    pub guidance_max_timestep: Option<usize>,
    /// φ of [`GenerateRequest::guidance_rescale`].
    pub guidance_rescale: f64,
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

impl<'a> Denoise<'a> {
    /// One loop over `timesteps` for a request's prompts and guidance: dynamic CFG over the
    /// request's `num_inference_steps`, no image latents, steps reported as `0..timesteps.len()`.
    pub fn new(
        req: &GenerateRequest,
        cond: &'a TextConditioning,
        timesteps: &'a [usize],
        rope: Option<&'a (Tensor, Tensor)>,
        noise: &'a mut dyn NoiseSource,
    ) -> Self {
        Self {
            text: &cond.text,
            batch: cond.batch,
            guidance_scale: req.guidance_scale,
            use_dynamic_cfg: req.use_dynamic_cfg,
            guidance_max_timestep: req.guidance_max_timestep,
            guidance_rescale: req.guidance_rescale,
            dynamic_cfg_steps: req.num_inference_steps,
            timesteps,
            rope,
            image_latents: None,
            ofs: None,
            noise,
            step_offset: 0,
            step_total: timesteps.len(),
        }
    }
}

/// Observer results to `Result`: `Break` cancels.
pub(crate) fn notify(flow: ControlFlow<()>) -> Result<()> {
    match flow {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}

/// The request's noise for the scheduler, or a generator seeded from `seed + 1` when it gives
/// none.
pub(crate) fn take_scheduler_noise(req: &mut GenerateRequest) -> Box<dyn NoiseSource> {
    req.scheduler_noise
        .take()
        .unwrap_or_else(|| Box::new(NoiseRng::new(req.seed.wrapping_add(1))))
}

/// `x` of rank `rank`, or of rank `rank - 1` (one item) with the batch axis added in front; any
/// other rank is an error naming `name` and the `expected` shape.
pub(crate) fn with_batch_axis(
    x: Tensor,
    rank: usize,
    name: &str,
    expected: &str,
) -> Result<Tensor> {
    match x.rank() {
        r if r + 1 == rank => Ok(x.unsqueeze(0)?),
        r if r == rank => Ok(x),
        _ => Err(Error::invalid(
            name,
            format!("expected shape {expected}, found {:?}", x.dims()),
        )),
    }
}

/// Checks sizes the request asked for (`None`: not asked) against those of its input video, each
/// `(name, asked, found)`; `input` names the video and `fix` says what to do in the error.
pub(crate) fn check_asked_sizes(
    sizes: &[(&str, Option<usize>, usize)],
    input: &str,
    fix: &str,
) -> Result<()> {
    for &(name, asked, found) in sizes {
        if let Some(a) = asked.filter(|&a| a != found) {
            return Err(Error::invalid(
                name,
                format!("{a} was asked but {input} has {found} ({fix})"),
            ));
        }
    }
    Ok(())
}

/// A sample `mean + std * noise` of a VAE posterior `[B, C, F', h, w]`; `noise` (standard normal,
/// named `name` in the error, whose shape reads as `layout`) must have the posterior's shape.
pub(crate) fn posterior_sample(
    post: &DiagonalGaussian,
    noise: &Tensor,
    name: &str,
    layout: &str,
) -> Result<Tensor> {
    if noise.dims() != post.mean.dims() {
        return Err(Error::invalid(
            name,
            format!(
                "expected shape {:?} {layout}, found {:?}",
                post.mean.dims(),
                noise.dims()
            ),
        ));
    }
    let noise = noise.to_device(post.mean.device())?.to_dtype(DType::F32)?;
    Ok(post.sample(&noise)?)
}

/// diffusers' `rescale_noise_cfg`: `guided · σ_cond / σ_guided` mixed `phi : 1 − phi` with
/// `guided`, where σ is each sample's standard deviation (over every axis but the first, with
/// torch's n − 1 divisor). `guided` and `cond` are `[B, ...]` of the same shape.
pub fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    let std = |x: &Tensor| -> Result<Tensor> {
        let b = x.dim(0)?;
        let flat = x.reshape((b, ()))?;
        let n = flat.dim(1)?;
        let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
        Ok((centred.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?.sqrt()?)
    };
    let mut shape = vec![guided.dim(0)?];
    shape.resize(guided.rank(), 1);
    let ratio = (std(cond)? / std(guided)?)?.reshape(shape)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

/// Frames must be in `[0, 1]` (a `[0, 255]` tensor would be encoded as a white flash).
pub(crate) fn check_unit_range(name: &str, x: &Tensor) -> Result<()> {
    let flat = x.to_dtype(DType::F32)?.flatten_all()?;
    let (lo, hi) = (
        flat.min(0)?.to_scalar::<f32>()?,
        flat.max(0)?.to_scalar::<f32>()?,
    );
    if !(lo >= -1e-3 && hi <= 1.0 + 1e-3) {
        return Err(Error::invalid(
            name,
            format!("values must be in [0, 1], found [{lo}, {hi}]"),
        ));
    }
    Ok(())
}

impl CogVideoXPipeline {
    /// diffusers' `vae_scale_factor_spatial`: 2^(number of VAE blocks - 1).
    pub fn vae_scale_spatial(&self) -> usize {
        1 << (self.vae.config().block_out_channels.len().saturating_sub(1))
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

    /// Learned positional embeddings (CogVideoX-5b-I2V) exist only for the sample size: an
    /// error naming the size otherwise.
    pub(crate) fn check_learned_position_size(&self, height: usize, width: usize) -> Result<()> {
        let t = self.transformer.config();
        if !t.use_learned_positional_embeddings {
            return Ok(());
        }
        let s = self.vae_scale_spatial();
        let (sh, sw) = (t.sample_height * s, t.sample_width * s);
        if (height, width) != (sh, sw) {
            return Err(Error::invalid(
                "height",
                format!(
                    "this model's learned positional embeddings exist only for {sw}x{sh} (width x height); got {width}x{height}"
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
        Ok(l.to_device(self.device())?.to_dtype(DType::F32)?)
    }

    /// The start every mode shares: reports [`Event::Started`] with `size` (frames, height, width)
    /// and `steps`, encodes the prompts ([`Self::prepare_text`]), lets `check_batch` refuse their
    /// batch size B (the mode's inputs must match it), and reports [`Event::TextEncoded`].
    pub(crate) fn encode_prompts(
        &mut self,
        req: &mut GenerateRequest,
        (num_frames, height, width): (usize, usize, usize),
        steps: usize,
        check_batch: impl FnOnce(usize) -> Result<()>,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<TextConditioning> {
        notify(observer(Event::Started {
            num_frames,
            height,
            width,
            steps,
        }))?;
        let cond = self.prepare_text(req)?;
        check_batch(cond.batch)?;
        notify(observer(Event::TextEncoded))?;
        Ok(cond)
    }

    /// Starts a text-, image- or video-to-video run of the resolved `size`: [`Self::encode_prompts`],
    /// then the run's latent frames and padding ([`Self::latent_frames`]).
    pub(crate) fn begin(
        &mut self,
        mut req: GenerateRequest,
        size: (usize, usize, usize),
        steps: usize,
        check_batch: impl FnOnce(usize) -> Result<()>,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Run> {
        let cond = self.encode_prompts(&mut req, size, steps, check_batch, observer)?;
        let (latent_frames, padding) = self.latent_frames(size.0);
        Ok(Run {
            dynamic_cfg_steps: req.num_inference_steps,
            req,
            cond,
            size,
            latent_frames,
            padding,
            image_latents: None,
            ofs: None,
        })
    }

    /// Sets the scheduler's timesteps for `steps` steps and returns them.
    pub(crate) fn schedule(&mut self, steps: usize) -> Result<Vec<usize>> {
        self.scheduler.set_timesteps(steps)?;
        Ok(self.scheduler.timesteps().to_vec())
    }

    /// The initial latents of a run: the request's own or noise drawn from `seed`
    /// ([`Self::initial_latents_with`]).
    pub(crate) fn initial_latents(&self, run: &mut Run) -> Result<Tensor> {
        let seed = run.req.seed;
        self.initial_latents_with(run, |shape| {
            NoiseRng::new(seed).randn(shape.to_vec(), self.device())
        })
    }

    /// The initial latents `[B, F_lat, C, h, w]` of a run (C: the VAE's latent channels; F_lat
    /// padded for CogVideoX 1.5), times the scheduler's `init_noise_sigma`: the request's own,
    /// checked against that shape, else `fresh(shape)`.
    pub(crate) fn initial_latents_with(
        &self,
        run: &mut Run,
        fresh: impl FnOnce([usize; 5]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (num_frames, height, width) = run.size;
        let s = self.vae_scale_spatial();
        let c = self.vae.config().latent_channels;
        let shape = [run.cond.batch, run.latent_frames, c, height / s, width / s];
        let latents = match run.req.latents.take() {
            Some(l) => self.check_latents(
                l,
                shape,
                &format!("{num_frames} frames at {height}x{width}"),
            )?,
            None => fresh(shape)?,
        };
        Ok((latents * self.scheduler.init_noise_sigma())?)
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
            self.device(),
        )?))
    }

    /// CogVideoX 1.5 I2V's `ofs` input (`[1]`, 2.0) when the transformer takes one.
    pub(crate) fn ofs_input(&self) -> Result<Option<Tensor>> {
        match self.transformer.config().ofs_embed_dim {
            Some(_) => Ok(Some(Tensor::new(&[2.0f32], self.device())?)),
            None => Ok(None),
        }
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
        // The conditional halves, for the steps above guidance_max_timestep.
        let cond_text = if do_cfg {
            Some(d.text.narrow(0, batch, batch)?)
        } else {
            None
        };
        let rope_ref = d.rope.map(|(c, s)| (c, s));
        for (i, &t) in d.timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("step", i, t).entered();
            latents = prepare(i, t, latents)?;
            // Above guidance_max_timestep: the conditional half alone, one forward of B.
            let guided = do_cfg && d.guidance_max_timestep.is_none_or(|m| t <= m);
            let model_in = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let model_in = self.scheduler.scale_model_input(&model_in, t)?;
            // [2B, F, C, h, w] ++ [2B, F, C, h, w] on channels -> [2B, F, 2C, h, w]
            let model_in = match (&image_in, d.image_latents) {
                (Some(_), Some(img)) if !guided => Tensor::cat(&[&model_in, img], 2)?,
                (Some(img), _) => Tensor::cat(&[&model_in, img], 2)?,
                (None, _) => model_in,
            };
            let text = match &cond_text {
                Some(cond) if !guided => cond,
                _ => d.text,
            };
            let tt = Tensor::full(t as f32, model_in.dim(0)?, self.device())?;
            let ofs = d.ofs.map(|o| o.to_dtype(self.dtype())).transpose()?;
            let model_output = self
                .transformer
                .forward(
                    &model_in.to_dtype(self.dtype())?,
                    text,
                    &tt,
                    rope_ref,
                    ofs.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let mut g = if guided { d.guidance_scale } else { 1.0 };
            if guided && d.use_dynamic_cfg {
                // diffusers drives this by the timestep value, not the step index.
                let n = d.dynamic_cfg_steps as f64;
                let x = ((n - t as f64) / n).powf(5.0);
                g = 1.0 + d.guidance_scale * ((1.0 - (std::f64::consts::PI * x).cos()) / 2.0);
            }
            let noise_pred = if guided {
                let uncond = model_output.narrow(0, 0, batch)?;
                let cond = model_output.narrow(0, batch, batch)?;
                // uncond + g·(cond − uncond), with g rounded to f32 as torch does
                let guided = (&uncond + ((&cond - &uncond)? * (g as f32) as f64)?)?;
                if d.guidance_rescale > 0.0 {
                    rescale_guidance(&guided, &cond, d.guidance_rescale)?
                } else {
                    guided
                }
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

    /// The end every text-, image- and video-to-video run shares: the denoising loop from the
    /// initial `latents` over `timesteps` (with the RoPE tables when the transformer uses them),
    /// then, unless only latents were asked, [`Event::Decoding`] and the decode of the frames
    /// after 1.5's padding (`[B, F, C, h, w]` -> `[B, C, F, h, w]` / scaling_factor).
    pub(crate) fn finish(
        &mut self,
        run: Run,
        latents: Tensor,
        timesteps: &[usize],
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let Run {
            mut req,
            cond,
            size: (num_frames, height, width),
            latent_frames,
            padding,
            dynamic_cfg_steps,
            image_latents,
            ofs,
        } = run;
        let rope = self.rope_tables(height, width, latent_frames)?;
        let mut noise = take_scheduler_noise(&mut req);
        let denoise = Denoise {
            dynamic_cfg_steps,
            image_latents: image_latents.as_ref(),
            ofs: ofs.as_ref(),
            ..Denoise::new(&req, &cond, timesteps, rope.as_ref(), noise.as_mut())
        };
        let latents = self.denoise(latents, denoise, &mut |_, _, x| Ok(x), observer)?;
        let frames = match req.output {
            OutputKind::Latent => None,
            OutputKind::Frames => {
                notify(observer(Event::Decoding))?;
                let real = latents.narrow(1, padding, latent_frames - padding)?;
                Some(self.decode_latents(&real)?)
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

    /// Encodes frames `[B, F, 3, H, W]` in `[0, 1]` with the VAE: the posterior over
    /// `[B, C, F', h, w]` (frames mapped to `[-1, 1]` as diffusers' `VaeImageProcessor`).
    pub(crate) fn encode_frames(&self, frames: &Tensor) -> Result<DiagonalGaussian> {
        let _span = tracing::info_span!("vae_encode").entered();
        // [B, F, 3, H, W] in [0, 1] -> [B, 3, F, H, W] in [-1, 1]
        let x = frames
            .to_device(self.device())?
            .to_dtype(DType::F32)?
            .affine(2.0, -1.0)?
            .permute((0, 2, 1, 3, 4))?
            .to_dtype(self.dtype())?;
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
        Ok(DiagonalGaussian {
            mean: post.mean.to_dtype(DType::F32)?,
            logvar: post.logvar.to_dtype(DType::F32)?,
        })
    }

    /// Latents `[B, F, C, h, w]` to frames `[B, F', 3, H, W]` in `[0, 1]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let _span = tracing::info_span!("vae_decode").entered();
        let sf = self.vae.config().scaling_factor;
        // [B, F, C, h, w] -> [B, C, F, h, w]
        let z = (latents.permute((0, 2, 1, 3, 4))?.to_dtype(self.dtype())? / sf)?;
        let video = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        // [B, 3, F, H, W] -> [B, F, 3, H, W], (x/2 + 0.5).clamp(0, 1)
        let video = (video.permute((0, 2, 1, 3, 4))? / 2.0)?;
        Ok((video + 0.5)?.clamp(0f32, 1f32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Each sample's standard deviation with torch's n − 1 divisor, by hand.
    fn std(x: &[f64]) -> f64 {
        let m = x.iter().sum::<f64>() / x.len() as f64;
        (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
    }

    #[test]
    fn rescale_guidance_matches_the_formula_by_hand() {
        // two samples of 2x3: the rescale is per sample
        let guided: Vec<f32> = vec![
            1.0, -2.0, 3.5, 0.25, 4.0, -1.0, /* sample 2 */ 0.1, 0.2, -0.3, 0.4, 0.0, 0.6,
        ];
        let cond: Vec<f32> = vec![
            0.5, -0.5, 1.0, 0.0, 1.5, -0.25, /* sample 2 */ 2.0, -1.0, 0.5, 0.0, 1.0, -2.0,
        ];
        let dev = Device::Cpu;
        let g = Tensor::from_vec(guided.clone(), (2, 2, 3), &dev).unwrap();
        let c = Tensor::from_vec(cond.clone(), (2, 2, 3), &dev).unwrap();
        let sample = |v: &[f32], s: usize| -> Vec<f64> {
            v[s * 6..s * 6 + 6].iter().map(|&x| x as f64).collect()
        };
        for phi in [0.0, 0.7, 1.0] {
            let got: Vec<f32> = rescale_guidance(&g, &c, phi)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for s in 0..2 {
                let (gs, cs, out) = (sample(&guided, s), sample(&cond, s), sample(&got, s));
                let ratio = std(&cs) / std(&gs);
                for i in 0..6 {
                    let want = phi * gs[i] * ratio + (1.0 - phi) * gs[i];
                    assert!(
                        (out[i] - want).abs() < 1e-6,
                        "phi {phi} sample {s} [{i}]: {} vs {want}",
                        out[i]
                    );
                }
                if phi == 1.0 {
                    // each sample takes the conditional prediction's spread
                    assert!((std(&out) - std(&cs)).abs() < 1e-6);
                }
            }
        }
    }
}
