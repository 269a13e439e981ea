//! Extending a clip forwards or backwards by N frames, conditioned on its last (or first) frames.
//!
//! **Method: latent replacement during sampling** (the "replacement" sampler of video diffusion
//! models, RePaint without resampling). A window of the model's size is denoised in which some
//! latent frames are *known*: they encode the clip's frames at the seam. Before every transformer
//! call the known frames of the current latents are overwritten with the known clean latents
//! noised to the current timestep, `√ᾱ_t·x₀ + √(1−ᾱ_t)·ε` (one fixed ε per window, so the known
//! frames follow the path a deterministic sampler would take through them); after the last step
//! they are set to x₀ exactly. The transformer attends jointly over the whole window, so the new
//! frames are generated to agree with the known ones; the window is then decoded as a whole, so the
//! causal VAE decoder also carries the context across the seam. The clip's own frames are kept
//! untouched: the output is `clip ++ new` (forward) or `new ++ clip` (backward).
//!
//! Why this method rather than conditioning through the image-to-video path:
//! - it needs no image-conditioned checkpoint: any text-to-video CogVideoX model (vdit's own small
//!   default model included) extends clips, with no training;
//! - it conditions on several frames, so motion (direction, speed) carries over the seam, where an
//!   image-to-video model sees one frame and must guess the motion;
//! - both directions work the same way, while image-to-video models only know "the first frame".
//!
//! With an image-to-video checkpoint (in_channels = 2 x latent channels) the image channels get
//! the context's first frame when extending forwards (as that model expects), and zeros when
//! extending backwards (the first frame is what is being generated).
//!
//! **The causal VAE fixes the alignment.** Latent 0 of a clip encodes pixel frame 0 alone and
//! latent j ≥ 1 encodes frames 4j−3..4j (for temporal compression 4). Forwards, the context is the
//! clip's last `4(c−1)+1` frames, encoded as a clip of their own: its c latents sit at window
//! positions 0..c, exactly as they would in a clip starting there, and the window's remaining
//! latents give `4·(W−c)` new frames. Backwards, the context is the clip's first `4c` frames; they
//! must land on whole 4-frame latent groups at the window's end, so they are encoded with their
//! first frame repeated in front (`[f0, f0, f1, …, f_{4c−1}]`, which is also what the causal
//! convolutions' replicate padding sees) and the c group latents are kept. The window's first
//! `W−c` latents are new: `4·(W−c−1)+1` frames, of which the last `4·(W−c−1)` are kept (frame 0,
//! farthest from the seam, is dropped so both directions add multiples of 4).
//!
//! Longer extensions run window after window, each conditioned on the clip as extended so far,
//! and the last window's surplus frames (those farthest from the seam) are dropped.
//!
//! Window (`request.num_frames`, default the model's `sample_frames`): its real latent count W must
//! be odd (pixel frames 8k+1: 9, 17, 25, 49, ...), because the CogVideoX decoder turns an even
//! latent count into 4W frames instead of 4(W−1)+1. CogVideoX 1.5 pads the window at the front
//! to a multiple of `patch_size_t` with free latents dropped before decoding, as text-to-video.
//! Context latents c (default (W+1)/2 forwards, (W−1)/2 backwards, so both add 4·(W−1)/2 frames per
//! window) are capped by the clip's length.
//!
//! Known latents use the posterior mean (no sampling noise). Random draws: the window's initial
//! noise (`seed`), the scheduler's noise (`seed + 1`), the replacement ε (`seed + 2`), continuing
//! from window to window.

use candle_core::{DType, Tensor};
use std::ops::{ControlFlow, Range};
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};

use crate::common::{
    check_asked_sizes, check_unit_range, notify, take_scheduler_noise, with_batch_axis, Denoise,
};
use crate::{CogVideoXPipeline, Event, GenerateRequest};

/// Which end of the clip grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// New frames after the clip's last frame.
    Forward,
    /// New frames before the clip's first frame.
    Backward,
}

impl std::str::FromStr for Direction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "forward" => Ok(Direction::Forward),
            "backward" => Ok(Direction::Backward),
            other => Err(Error::invalid(
                "direction",
                format!("expected forward or backward, got {other:?}"),
            )),
        }
    }
}

/// One extension: a clip, a direction and how many frames to add.
pub struct ExtendRequest {
    /// Prompt, steps, guidance, seed and scheduler noise as for text-to-video. `num_frames` is the
    /// window (default: the model's `sample_frames`); `height`/`width` may be `None` or must match
    /// the clip. `latents` and `output` are not used.
    pub request: GenerateRequest,
    /// The clip `[1, F, 3, H, W]` (or `[F, 3, H, W]`), values in `[0, 1]`, at a size the model
    /// takes.
    pub video: Tensor,
    pub direction: Direction,
    /// Frames to add: a positive multiple of the VAE's temporal compression (4).
    pub num_frames: usize,
    /// Known latent frames per window (see the module docs); `None` picks the default.
    pub context_latents: Option<usize>,
}

/// What one window did (for inspection and tests).
#[derive(Debug, Clone)]
pub struct ExtendChunk {
    /// Latent positions of the known frames in the window (padding included).
    pub known: Range<usize>,
    /// The known clean latents `[1, c, C, h, w]` (scaling_factor x posterior mean).
    pub known_latents: Tensor,
    /// The window's final latents `[1, W_total, C, h, w]`.
    pub latents: Tensor,
    /// The context: pixel frames of the clip (as extended so far) the window was conditioned on.
    pub context_frames: Range<usize>,
    /// Frames of the decoded window (padding dropped) kept as new frames.
    pub new_frames: Range<usize>,
    /// Leading latents of `latents` that are 1.5 padding (dropped before decoding).
    pub padding: usize,
}

/// The extended clip.
#[derive(Debug, Clone)]
pub struct ExtendOutput {
    /// `[1, F + N, 3, H, W]` in `[0, 1]`: the input clip's frames unchanged plus N new ones.
    pub frames: Tensor,
    /// N, the frames added.
    pub added: usize,
    pub chunks: Vec<ExtendChunk>,
    /// The last window decoded whole `[1, Fw, 3, H, W]` (its context frames as the VAE
    /// reconstructs them, then its new frames).
    pub last_window: Tensor,
}

/// The window geometry of an extension.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Real latents of the window (odd).
    w: usize,
    /// 1.5 padding latents in front.
    pad: usize,
    /// Known latents.
    c: usize,
    /// Clip frames used as context.
    ctx_frames: usize,
    /// New frames a window yields.
    per_window: usize,
}

impl CogVideoXPipeline {
    /// Extends a clip (see the module docs for the method), reporting to `observer`: `Started`
    /// once (with the final frame count and the steps of all windows), steps numbered across
    /// windows, `Decoding` per window.
    pub fn extend(
        &mut self,
        req: ExtendRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<ExtendOutput> {
        let ExtendRequest {
            request: mut req,
            video,
            direction,
            num_frames: added,
            context_latents,
        } = req;
        let video = with_batch_axis(video, 5, "video", "[1, F, 3, H, W]")?;
        let (vb, vf, vc, vh, vw) = video.dims5()?;
        if vb != 1 || vc != 3 || vf == 0 {
            return Err(Error::invalid(
                "video",
                format!(
                    "expected one RGB clip [1, F, 3, H, W], found {:?}",
                    video.dims()
                ),
            ));
        }
        check_asked_sizes(
            &[("height", req.height, vh), ("width", req.width, vw)],
            "the clip",
            "resize the clip first",
        )?;
        if req.latents.is_some() {
            return Err(Error::invalid(
                "latents",
                "extension draws its own window latents; initial latents cannot be given",
            ));
        }
        req.height = Some(vh);
        req.width = Some(vw);
        let (window_frames, height, width) = self.resolve_size(&req)?;
        self.check_learned_position_size(height, width)?;
        check_unit_range("video", &video)?;
        let video = video.to_device(self.device())?.to_dtype(DType::F32)?;
        let plan = self.extend_plan(window_frames, vf, direction, added, context_latents)?;
        let windows = added.div_ceil(plan.per_window);
        let steps = req.num_inference_steps;
        tracing::info!(
            ?direction,
            added,
            windows,
            window_latents = plan.w,
            context_latents = plan.c,
            context_frames = plan.ctx_frames,
            "extend"
        );
        let one_prompt = |batch| {
            if batch == 1 {
                return Ok(());
            }
            Err(Error::invalid(
                "prompt_embeds",
                format!("extension takes one prompt, found a batch of {batch}"),
            ))
        };
        let size = (vf + added, height, width);
        let cond = self.encode_prompts(&mut req, size, steps * windows, one_prompt, observer)?;

        let s = self.vae_scale_spatial();
        let lc = self.vae.config().latent_channels;
        let sf = self.vae.config().scaling_factor;
        let total = plan.pad + plan.w;
        let rope = self.rope_tables(height, width, total)?;
        let ofs = self.ofs_input()?;
        let mut init_rng = NoiseRng::new(req.seed);
        let mut eps_rng = NoiseRng::new(req.seed.wrapping_add(2));
        let mut noise = take_scheduler_noise(&mut req);

        let mut clip = video;
        let mut chunks = Vec::with_capacity(windows);
        let mut last_window = None;
        let mut remaining = added;
        for wi in 0..windows {
            let _span = tracing::info_span!("window", wi).entered();
            let f = clip.dim(1)?;
            // Context frames and their latents, [1, c, C, h, w] (scaled posterior means).
            let (ctx_range, ctx) = match direction {
                Direction::Forward => {
                    let r = f - plan.ctx_frames..f;
                    (r.clone(), clip.narrow(1, r.start, plan.ctx_frames)?)
                }
                Direction::Backward => {
                    let body = clip.narrow(1, 0, plan.ctx_frames)?;
                    let first = clip.narrow(1, 0, 1)?;
                    (0..plan.ctx_frames, Tensor::cat(&[&first, &body], 1)?)
                }
            };
            let post = self.encode_frames(&ctx)?; // [1, C, c', h, w]
            let z = match direction {
                Direction::Forward => post.mean.clone(),
                Direction::Backward => post.mean.narrow(2, 1, plan.c)?,
            };
            if z.dim(2)? != plan.c {
                return Err(Error::Msg(format!(
                    "the VAE encoded {} context frames to {} latent frames, expected {}",
                    ctx.dim(1)?,
                    post.mean.dim(2)?,
                    plan.c
                )));
            }
            // [1, C, c, h, w] -> [1, c, C, h, w], times scaling_factor
            let known_latents = (z.permute((0, 2, 1, 3, 4))? * sf)?.contiguous()?;
            let known = match direction {
                Direction::Forward => plan.pad..plan.pad + plan.c,
                Direction::Backward => total - plan.c..total,
            };
            let image_latents = if self.is_image_to_video() {
                Some(match direction {
                    // the context's first frame is the window's first real frame
                    Direction::Forward => self
                        .image_latents_from_posterior_sample(&post.mean.narrow(2, 0, 1)?, total)?,
                    Direction::Backward => Tensor::zeros(
                        (1, total, lc, height / s, width / s),
                        DType::F32,
                        self.device(),
                    )?,
                })
            } else {
                None
            };

            let timesteps = self.schedule(steps)?;
            let shape = (1, total, lc, height / s, width / s);
            let latents =
                (init_rng.randn(shape, self.device())? * self.scheduler.init_noise_sigma())?;
            let eps = eps_rng.randn(known_latents.dims(), self.device())?;
            // The replacement needs only ᾱ_t (the scheduler itself is busy inside `denoise`).
            let table = self.scheduler.alphas_cumprod().to_vec();
            let mut prepare = |_: usize, t: usize, x: Tensor| -> Result<Tensor> {
                let noised = forward_noise(&table, &known_latents, &eps, t)?;
                splice(&x, known.start, &noised)
            };
            let denoise = Denoise {
                image_latents: image_latents.as_ref(),
                ofs: ofs.as_ref(),
                step_offset: wi * steps,
                step_total: windows * steps,
                ..Denoise::new(&req, &cond, &timesteps, rope.as_ref(), noise.as_mut())
            };
            let latents = self.denoise(latents, denoise, &mut prepare, observer)?;
            // The known frames end exactly at their clean latents.
            let latents = splice(&latents, known.start, &known_latents)?;
            notify(observer(Event::Decoding))?;
            let decoded = self.decode_latents(&latents.narrow(1, plan.pad, plan.w)?)?;
            let (_, _, _, dh, dw) = decoded.dims5()?;
            if (dh, dw) != (height, width) {
                return Err(Error::Msg(format!(
                    "the VAE decoded the window to {dw}x{dh} frames, expected {width}x{height} (its tiled decode, used above half the VAE's sample size, does not tile this size evenly)"
                )));
            }
            let take = remaining.min(plan.per_window);
            let new_range = match direction {
                Direction::Forward => {
                    let start = self.vae_scale_temporal() * (plan.c - 1) + 1;
                    start..start + take
                }
                Direction::Backward => {
                    let end = 1 + plan.per_window;
                    end - take..end
                }
            };
            let new = decoded.narrow(1, new_range.start, take)?;
            clip = match direction {
                Direction::Forward => Tensor::cat(&[&clip, &new], 1)?,
                Direction::Backward => Tensor::cat(&[&new, &clip], 1)?,
            };
            remaining -= take;
            last_window = Some(decoded);
            chunks.push(ExtendChunk {
                known,
                known_latents,
                latents,
                context_frames: ctx_range,
                new_frames: new_range,
                padding: plan.pad,
            });
        }
        Ok(ExtendOutput {
            frames: clip,
            added,
            chunks,
            last_window: last_window.ok_or_else(|| Error::Msg("extension ran no window".into()))?,
        })
    }

    /// Checks an extension's sizes and works out the window geometry.
    fn extend_plan(
        &self,
        window_frames: usize,
        clip_frames: usize,
        direction: Direction,
        added: usize,
        context_latents: Option<usize>,
    ) -> Result<Plan> {
        let tc = self.vae_scale_temporal();
        if added == 0 || !added.is_multiple_of(tc) {
            return Err(Error::invalid(
                "num_frames",
                format!(
                    "the frames to add must be a positive multiple of {tc} (the VAE's temporal compression), got {added}"
                ),
            ));
        }
        let w = (window_frames - 1) / tc + 1;
        let (_, pad) = self.latent_frames(window_frames);
        if w.is_multiple_of(2) {
            let lo = window_frames - tc; // odd latent count below, if it leaves room
            let hint = if lo > 2 * tc {
                format!("{lo} or {}", window_frames + tc)
            } else {
                format!("{}", window_frames + tc)
            };
            return Err(Error::invalid(
                "window",
                format!(
                    "a window of {window_frames} frames has {w} latent frames; extension needs an odd count (window frames {}k+1, e.g. {hint}), since the decoder turns an even count into {} frames",
                    2 * tc,
                    tc * w
                ),
            ));
        }
        // The most context the clip can give, and the most the window can hold.
        let (clip_max, window_max, default) = match direction {
            // 4(c-1)+1 <= F, and at least one new latent
            Direction::Forward => ((clip_frames - 1) / tc + 1, w - 1, w.div_ceil(2)),
            // 4c <= F, and the new part needs latent 0 plus one group
            Direction::Backward => (clip_frames / tc, w.saturating_sub(2), (w - 1) / 2),
        };
        if window_max == 0 {
            return Err(Error::invalid(
                "window",
                format!("a window of {window_frames} frames ({w} latents) leaves no room for new frames; use a larger window"),
            ));
        }
        if clip_max == 0 {
            return Err(Error::invalid(
                "video",
                format!(
                    "the clip has {clip_frames} frames; extending backwards needs at least {tc}"
                ),
            ));
        }
        let c = match context_latents {
            Some(c) => {
                if c == 0 || c > window_max || c > clip_max {
                    return Err(Error::invalid(
                        "context_latents",
                        format!(
                            "must be between 1 and {} for a {w}-latent window and a {clip_frames}-frame clip, got {c}",
                            window_max.min(clip_max)
                        ),
                    ));
                }
                c
            }
            None => default.clamp(1, window_max).min(clip_max),
        };
        let (ctx_frames, per_window) = match direction {
            Direction::Forward => (tc * (c - 1) + 1, tc * (w - c)),
            Direction::Backward => (tc * c, tc * (w - c - 1)),
        };
        Ok(Plan {
            w,
            pad,
            c,
            ctx_frames,
            per_window,
        })
    }
}

/// `√ᾱ_t·x₀ + √(1−ᾱ_t)·ε` with the scheduler's ᾱ table; coefficients rounded to f32 as the
/// schedulers' `add_noise` does for f32 samples.
fn forward_noise(alphas_cumprod: &[f64], x0: &Tensor, eps: &Tensor, t: usize) -> Result<Tensor> {
    let a = *alphas_cumprod.get(t).ok_or_else(|| {
        Error::invalid(
            "timestep",
            format!("{t} is outside 0..{}", alphas_cumprod.len()),
        )
    })?;
    let a = a as f32;
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    Ok(((x0 * sa as f64)? + (eps * sb as f64)?)?)
}

/// `x` with frames `start..start + part.dim(1)` (dim 1) replaced by `part`.
fn splice(x: &Tensor, start: usize, part: &Tensor) -> Result<Tensor> {
    let f = x.dim(1)?;
    let n = part.dim(1)?;
    let mut pieces = Vec::with_capacity(3);
    if start > 0 {
        pieces.push(x.narrow(1, 0, start)?);
    }
    pieces.push(part.to_dtype(x.dtype())?);
    if start + n < f {
        pieces.push(x.narrow(1, start + n, f - start - n)?);
    }
    Ok(Tensor::cat(&pieces, 1)?)
}
