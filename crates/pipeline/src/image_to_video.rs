//! Image-to-video with CogVideoX, step for step as diffusers' `CogVideoXImageToVideoPipeline`
//! (diffusers 0.42.1, `pipelines/cogvideo/pipeline_cogvideox_image2video.py`), for the
//! CogVideoX-5b-I2V and CogVideoX1.5-5B-I2V checkpoints.
//!
//! Layouts: the image is `[B, 3, H, W]` in `[0, 1]` at the generation size (resizing is the
//! caller's business: `vdit_video::fit`); latents and image latents are `[B, F, C, h, w]`; the
//! transformer sees both on channels, `[B, F, 2C, h, w]` (its `in_channels` is 2 x the VAE's
//! `latent_channels`); frames come out as `[B, F, 3, H, W]` in `[0, 1]`.
//!
//! The steps, where they differ from text-to-video:
//! 1. The image goes to `[-1, 1]` and through the VAE as a one-frame video. The image latent is a
//!    *sample* of the posterior, `mean + std * noise` (diffusers' `retrieve_latents` with
//!    `sample_mode="sample"`): this is the noise augmentation of the image that diffusers' inference
//!    does; the noise is [`ImageToVideoRequest::image_noise`] or drawn from `seed + 2`.
//!    [`ImageToVideoRequest::image_noise_sigma`] optionally adds the CogVideoX training recipe's
//!    pixel-space augmentation (`image + sigma * noise`) before encoding; diffusers never does.
//! 2. The latent is scaled by `scaling_factor`, or divided by it when the VAE config has
//!    `invert_scale_latents` (CogVideoX 1.5, "the CogVideoX team forgot to multiply the scaling
//!    factor during training").
//! 3. Zero frames are appended up to the noise's frame count; for CogVideoX 1.5 the noise has the
//!    padded frame count (`F_lat` rounded up to `patch_size_t`), and if the image latents' count is
//!    still not a multiple of `patch_size_t` their first `count mod patch_size_t` frames are
//!    prepended again (diffusers' rule; a no-op with diffusers' padding).
//! 4. Every step appends the (CFG-duplicated) image latents to the scaled latents on channels;
//!    CogVideoX 1.5 also passes `ofs = 2.0`. Learned positional embeddings (5b-I2V) are the
//!    transformer's business: they require the model's sample height and width.
//! 5. As text-to-video, 1.5's padding frames are dropped from the front before decoding.
//!
//! Random draws, in order: the initial latents (`seed`), the scheduler's noise (`seed + 1`), the
//! posterior sample (`seed + 2`), the pixel augmentation (`seed + 3`). (diffusers draws the
//! posterior sample first from one generator; parity tests give every tensor explicitly.)

use candle_core::{DType, Tensor};
use std::ops::ControlFlow;
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};

use crate::common::{check_unit_range, posterior_sample, with_batch_axis};
use crate::{CogVideoXPipeline, Event, GenerateOutput, GenerateRequest};

/// One image-to-video generation: a [`GenerateRequest`] plus the image.
pub struct ImageToVideoRequest {
    /// Prompt, sizes, steps, guidance, seed, initial latents (`[B, F, C, h, w]` with C the VAE's
    /// latent channels), scheduler noise and output kind, as for text-to-video.
    pub request: GenerateRequest,
    /// The conditioning image `[B, 3, H, W]` (or `[3, H, W]`), values in `[0, 1]`, exactly the
    /// generation's height and width.
    pub image: Tensor,
    /// Standard-normal noise of the VAE posterior sample, `[B, C, 1, h, w]`; drawn from
    /// `seed + 2` when absent.
    pub image_noise: Option<Tensor>,
    /// Optional pixel-space noise augmentation before encoding: `image + sigma * noise` in the
    /// `[-1, 1]` range (CogVideoX's I2V training recipe draws `sigma = exp(N(-3, 0.5))`). `None`
    /// (the default, as diffusers) adds nothing.
    pub image_noise_sigma: Option<f64>,
}

impl ImageToVideoRequest {
    pub fn new(request: GenerateRequest, image: Tensor) -> Self {
        Self {
            request,
            image,
            image_noise: None,
            image_noise_sigma: None,
        }
    }
}

impl CogVideoXPipeline {
    /// An error naming the model unless it takes an image (transformer `in_channels` = 2 x the
    /// VAE's `latent_channels`).
    pub fn check_image_to_video(&self) -> Result<()> {
        if self.is_image_to_video() {
            return Ok(());
        }
        let (c, l) = (
            self.transformer.config().in_channels,
            self.vae.config().latent_channels,
        );
        Err(Error::invalid(
            "image",
            format!(
                "the model {} cannot take an image: its transformer has in_channels {c} = the VAE's latent_channels {l}, a text-to-video model; image-to-video needs an image-to-video checkpoint with in_channels {} (2 x {l}, as CogVideoX-5b-I2V)",
                self.folder.root.display(),
                2 * l
            ),
        ))
    }

    /// Image latents `[B, F, C, h, w]` as diffusers' `prepare_latents` builds them: posterior
    /// sample, scaled (or inverse-scaled), zero-padded to `latent_frames` frames, with 1.5's
    /// first-frame rule. `image` is `[B, 3, H, W]` in `[0, 1]`; `noise` `[B, C, 1, h, w]`.
    pub fn image_latents(
        &self,
        image: &Tensor,
        noise: &Tensor,
        latent_frames: usize,
    ) -> Result<Tensor> {
        // [B, 3, H, W] -> [B, 1, 3, H, W]
        let post = self.encode_frames(&image.unsqueeze(1)?)?;
        let z = posterior_sample(&post, noise, "image_noise", "[B, C, 1, h, w]")?;
        self.image_latents_from_posterior_sample(&z, latent_frames)
    }

    /// The scaling and padding half of [`Self::image_latents`], from a posterior sample
    /// `[B, C, 1, h, w]` (VAE layout).
    pub fn image_latents_from_posterior_sample(
        &self,
        z: &Tensor,
        latent_frames: usize,
    ) -> Result<Tensor> {
        let vcfg = self.vae.config();
        let sf = vcfg.scaling_factor;
        // [B, C, 1, h, w] -> [B, 1, C, h, w]
        let z = z.permute((0, 2, 1, 3, 4))?;
        let z = if vcfg.invert_scale_latents {
            (z * (1.0 / sf))?
        } else {
            (z * sf)?
        };
        let (b, f0, c, h, w) = z.dims5()?;
        let mut img = if latent_frames > f0 {
            let pad = Tensor::zeros((b, latent_frames - f0, c, h, w), DType::F32, z.device())?;
            Tensor::cat(&[&z, &pad], 1)?
        } else {
            z
        };
        if let Some(pt) = self.transformer.config().patch_size_t.filter(|&p| p > 1) {
            let rem = img.dim(1)? % pt;
            if rem != 0 {
                let first = img.narrow(1, 0, rem)?;
                img = Tensor::cat(&[&first, &img], 1)?;
            }
        }
        Ok(img)
    }

    /// Runs an image-to-video generation, reporting to `observer` as [`Self::generate`] does.
    pub fn image_to_video(
        &mut self,
        req: ImageToVideoRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        self.check_image_to_video()?;
        let ImageToVideoRequest {
            request: req,
            image,
            image_noise,
            image_noise_sigma,
        } = req;
        let size = self.resolve_size(&req)?;
        let (_, height, width) = size;
        let image = self.check_image(image, height, width)?;
        let steps = req.num_inference_steps;
        let one_image_per_prompt = |batch| match image.dim(0)? {
            n if n == batch => Ok(()),
            n => Err(Error::invalid(
                "image",
                format!("{n} images for {batch} prompts; give one image per prompt"),
            )),
        };
        let mut run = self.begin(req, size, steps, one_image_per_prompt, observer)?;
        let timesteps = self.schedule(steps)?;

        // Latents: [B, F_lat (padded for 1.5), C, h, w], C = in_channels / 2.
        let latents = self.initial_latents(&mut run)?;

        // The image: optional pixel augmentation, then the posterior sample.
        let seed = run.req.seed;
        let image = match image_noise_sigma {
            None => image,
            Some(sigma) => {
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(Error::invalid(
                        "image_noise_sigma",
                        format!("must be a finite number >= 0, got {sigma}"),
                    ));
                }
                // in [-1, 1] units: x' = x + sigma * n  <=>  (x01' = x01 + sigma/2 * n)
                let n = NoiseRng::new(seed.wrapping_add(3)).randn(image.dims(), self.device())?;
                (&image + (n * (sigma / 2.0))?)?
            }
        };
        let s = self.vae_scale_spatial();
        let c = self.vae.config().latent_channels;
        let post_shape = [run.cond.batch, c, 1, height / s, width / s];
        let image_noise = match image_noise {
            Some(n) => n,
            None => {
                NoiseRng::new(seed.wrapping_add(2)).randn(post_shape.to_vec(), self.device())?
            }
        };
        run.image_latents = Some(self.image_latents(&image, &image_noise, run.latent_frames)?);
        run.ofs = self.ofs_input()?;
        self.finish(run, latents, &timesteps, observer)
    }

    /// Checks a conditioning image `[B, 3, H, W]` or `[3, H, W]` in `[0, 1]` against the
    /// generation size; returns it as `[B, 3, H, W]` f32 on the pipeline's device.
    fn check_image(&self, image: Tensor, height: usize, width: usize) -> Result<Tensor> {
        let image = with_batch_axis(image, 4, "image", "[B, 3, H, W]")?;
        let (_, c, h, w) = image.dims4()?;
        if c != 3 || (h, w) != (height, width) {
            return Err(Error::invalid(
                "image",
                format!(
                    "expected shape [B, 3, {height}, {width}] (RGB at the generation size; resize with vdit_video::fit), found {:?}",
                    image.dims()
                ),
            ));
        }
        check_unit_range("image", &image)?;
        self.check_learned_position_size(height, width)?;
        Ok(image.to_device(self.device())?.to_dtype(DType::F32)?)
    }
}
