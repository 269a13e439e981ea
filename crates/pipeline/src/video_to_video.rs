//! Video-to-video with CogVideoX (SDEdit), step for step as diffusers'
//! `CogVideoXVideoToVideoPipeline` (diffusers 0.42.1,
//! `pipelines/cogvideo/pipeline_cogvideox_video2video.py`).
//!
//! Layouts: the input video is `[B, F, 3, H, W]` in `[0, 1]` at the generation size (F = 4k+1;
//! resizing is the caller's business: `vdit_video::fit_video`); latents `[B, F', C, h, w]`;
//! frames come out as `[B, F, 3, H, W]` in `[0, 1]`.
//!
//! The steps, where they differ from text-to-video:
//! 1. Timesteps: the full `N`-step schedule is cut by `strength`: `init = min(int(N * strength), N)`
//!    steps run, the last `init` of the schedule (`t_start = N - init`). The scheduler still
//!    thinks in `N` steps (DDIM's and DPM's previous-timestep rule uses `1000 // N`), and DPM's
//!    multistep state starts afresh at the first step that runs.
//! 2. Latents: the video goes to `[-1, 1]` and through the VAE; the posterior *sample*
//!    (`mean + std * noise`) is scaled by `scaling_factor` (always multiplied, whatever
//!    `invert_scale_latents` says), then noised to the first timestep that runs:
//!    `add_noise(x0, noise, timesteps[t_start])`.
//! 3. Dynamic CFG uses `N = init` (the steps that run) with the timestep values of the full
//!    schedule, as diffusers (it reassigns `num_inference_steps` before the loop).
//! 4. CogVideoX 1.5: the latent frame count must already be a multiple of `patch_size_t`.
//!
//! Random draws: the posterior sample (`seed + 2`), the forward-process noise (`seed`), the
//! scheduler's noise (`seed + 1`); each can be given instead.

use candle_core::Tensor;
use std::ops::ControlFlow;
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};

use crate::common::{check_asked_sizes, check_unit_range, posterior_sample, with_batch_axis};
use crate::{CogVideoXPipeline, Event, GenerateOutput, GenerateRequest};

/// One video-to-video generation: a [`GenerateRequest`] plus the input video and the strength.
pub struct VideoToVideoRequest {
    /// Prompt, steps, guidance, seed, scheduler noise and output kind as for text-to-video.
    /// `num_frames`, `height` and `width` may be left `None` (they come from the video) or must
    /// match it. `latents`, when given, are the already-noised start (diffusers' `latents`
    /// argument) and the video is not encoded.
    pub request: GenerateRequest,
    /// The input video `[B, F, 3, H, W]`, values in `[0, 1]`, F = 4k+1.
    pub video: Tensor,
    /// How much of the schedule runs, in (0, 1]: 1 ignores the video's content, small values
    /// keep it. diffusers' default is 0.8.
    pub strength: f64,
    /// Standard-normal noise of the VAE posterior sample, `[B, C, F', h, w]`; drawn from
    /// `seed + 2` when absent.
    pub encode_noise: Option<Tensor>,
    /// The forward-process noise `[B, F', C, h, w]`; drawn from `seed` when absent.
    pub noise: Option<Tensor>,
}

impl VideoToVideoRequest {
    pub fn new(request: GenerateRequest, video: Tensor, strength: f64) -> Self {
        Self {
            request,
            video,
            strength,
            encode_noise: None,
            noise: None,
        }
    }
}

/// diffusers' `get_timesteps`: the timesteps that run for `strength` (the schedule's tail).
/// Errors when no step would run.
pub fn strength_timesteps(timesteps: &[usize], strength: f64) -> Result<Vec<usize>> {
    let n = timesteps.len();
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid(
            "strength",
            format!("must be in (0, 1], got {strength}"),
        ));
    }
    // Python's int() of a positive float truncates, as `as usize` does.
    let init = ((n as f64 * strength) as usize).min(n);
    if init == 0 {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} of {n} steps runs no step (int({n} x {strength}) = 0); raise the strength or the number of steps"
            ),
        ));
    }
    Ok(timesteps[n - init..].to_vec())
}

impl CogVideoXPipeline {
    /// Checks an input video `[B, F, 3, H, W]` (or `[F, 3, H, W]`) in `[0, 1]` against the
    /// request and the model, and sets the request's sizes to the video's; returns the video as
    /// `[B, F, 3, H, W]` and the resolved (num_frames, height, width).
    fn check_video(
        &self,
        video: Tensor,
        req: &mut GenerateRequest,
    ) -> Result<(Tensor, (usize, usize, usize))> {
        let video = with_batch_axis(video, 5, "video", "[B, F, 3, H, W]")?;
        let (_, vf, vc, vh, vw) = video.dims5()?;
        if vc != 3 {
            return Err(Error::invalid(
                "video",
                format!(
                    "expected 3 colour channels in [B, F, 3, H, W], found {:?}",
                    video.dims()
                ),
            ));
        }
        check_asked_sizes(
            &[
                ("num_frames", req.num_frames, vf),
                ("height", req.height, vh),
                ("width", req.width, vw),
            ],
            "the input video",
            "resize or trim the video first",
        )?;
        req.num_frames = Some(vf);
        req.height = Some(vh);
        req.width = Some(vw);
        let size = self.resolve_size(req).map_err(|e| match e {
            Error::InvalidArgument { name, msg }
                if ["num_frames", "height", "width"].contains(&name.as_str()) =>
            {
                Error::invalid(
                    "video",
                    format!("the input video does not fit the model: {name} {msg}"),
                )
            }
            other => other,
        })?;
        check_unit_range("video", &video)?;
        Ok((video, size))
    }

    /// Runs a video-to-video generation, reporting to `observer` as [`Self::generate`] does
    /// (`Started.steps` and the step totals count the steps that run).
    pub fn video_to_video(
        &mut self,
        req: VideoToVideoRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        self.check_text_to_video("video-to-video")?;
        let VideoToVideoRequest {
            request: mut req,
            video,
            strength,
            encode_noise,
            noise: fwd_noise,
        } = req;
        let (video, size) = self.check_video(video, &mut req)?;
        let (vb, num_frames) = (video.dim(0)?, size.0);

        let timesteps = strength_timesteps(&self.schedule(req.num_inference_steps)?, strength)?;
        let steps_run = timesteps.len();
        let one_video_per_prompt = |batch| {
            if vb == batch {
                return Ok(());
            }
            Err(Error::invalid(
                "video",
                format!("{vb} videos for {batch} prompts; give one video per prompt"),
            ))
        };
        let mut run = self.begin(req, size, steps_run, one_video_per_prompt, observer)?;
        // Dynamic CFG counts the steps that run (diffusers reassigns num_inference_steps).
        run.dynamic_cfg_steps = steps_run;
        if run.padding != 0 {
            let pt = self.transformer.config().patch_size_t.unwrap_or(1);
            return Err(Error::invalid(
                "num_frames",
                format!(
                    "video-to-video needs the latent frame count to be a multiple of patch_size_t {pt}; {num_frames} frames give {} latent frames",
                    run.latent_frames - run.padding
                ),
            ));
        }
        // Unless given, the latents are the video's: posterior sample times scaling_factor, noised
        // to the first timestep that runs.
        let seed = run.req.seed;
        let latents = self.initial_latents_with(&mut run, |shape| {
            let post = self.encode_frames(&video)?;
            let en = match encode_noise {
                Some(n) => n,
                None => NoiseRng::new(seed.wrapping_add(2))
                    .randn(post.mean.dims().to_vec(), self.device())?,
            };
            let z = posterior_sample(&post, &en, "encode_noise", "[B, C, F', h, w]")?;
            // [B, C, F', h, w] -> [B, F', C, h, w], times scaling_factor
            let x0 = (z.permute((0, 2, 1, 3, 4))? * self.vae.config().scaling_factor)?;
            if x0.dims() != shape {
                return Err(Error::Msg(format!(
                    "the VAE encoded {num_frames} frames to latents {:?}, expected {shape:?}",
                    x0.dims()
                )));
            }
            let n = match fwd_noise {
                Some(n) => self.check_latents(n, shape, "the forward-process noise")?,
                None => NoiseRng::new(seed).randn(shape.to_vec(), self.device())?,
            };
            self.scheduler
                .add_noise(&x0.contiguous()?, &n, timesteps[0])
        })?;
        self.finish(run, latents, &timesteps, observer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_cuts_the_schedule_as_diffusers() {
        let ts = [999, 832, 666, 499, 332, 166];
        // int(6 * 0.7) = int(4.2) = 4: the last four
        assert_eq!(strength_timesteps(&ts, 0.7).unwrap(), [666, 499, 332, 166]);
        assert_eq!(strength_timesteps(&ts, 1.0).unwrap(), ts);
        // int(6 * 0.5) = 3
        assert_eq!(strength_timesteps(&ts, 0.5).unwrap(), [499, 332, 166]);
        // int(6 * 0.1) = 0 steps: an error, not an empty loop
        let e = strength_timesteps(&ts, 0.1).unwrap_err().to_string();
        assert!(e.contains("strength") && e.contains("no step"), "{e}");
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let e = strength_timesteps(&ts, bad).unwrap_err().to_string();
            assert!(e.contains("strength") && e.contains("(0, 1]"), "{e}");
        }
    }
}
