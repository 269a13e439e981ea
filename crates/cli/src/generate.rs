//! `vdit generate`: text-to-video from a diffusers-format folder, and with one of
//! - `--image PATH` (PNG/JPEG): image-to-video: an image-to-video checkpoint (in_channels 2 x
//!   latent) takes it on its image channels; a text-to-video model (the default model included)
//!   takes it as latent frame 0 by latent replacement (vdit_pipeline::image_condition);
//! - `--video PATH --strength S` (MP4/GIF/PNG-frame directory): video-to-video;
//! - `--extend PATH --direction forward|backward --num-frames N`: N new frames after (before) the
//!   clip, by latent replacement (works with text-to-video models; see vdit_pipeline::extend).
//!
//! Inputs are scaled to cover the model's size and centre-cropped (vdit_video::fit), with a note
//! on stderr saying what was done; videos are trimmed to a valid frame count with a note too.
//!
//! Output by the path's form: `.mp4` (H.264 yuv420p), `.gif` (looping), a directory of PNG frames,
//! or with `--output-type latent` a safetensors file holding the final latents (tensor `latents`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vdit_pipeline::{
    CogVideoXPipeline, Direction, Event, ExtendRequest, GenerateRequest, ImageToVideoRequest,
    OutputKind, PromptInput, VideoToVideoRequest,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputType {
    /// Decoded video, written by the output path's form.
    Video,
    /// The final latents `[B, F, C, h, w]`, as safetensors (tensor `latents`).
    Latent,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers-format CogVideoX folder (model_index.json, transformer/, vae/, scheduler/, ...).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The text prompt.
    #[arg(long, required_unless_present = "prompt_embeds")]
    pub prompt: Option<String>,
    /// Image-to-video, video-to-video and extension inputs.
    #[command(flatten)]
    pub media: Box<MediaArgs>,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Pixel frames: 4k+1 (e.g. 49). Default: the model's. With --extend: the frames to add,
    /// a multiple of 4 (required).
    #[arg(long)]
    pub num_frames: Option<usize>,
    /// Pixels, a multiple of 16. Default: the model's.
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    /// Denoising steps. Default: the model's `generation_config.json`, else 50.
    #[arg(long)]
    pub num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less turns guidance off. Default: the model's, else 6.
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// CogVideoX's dynamic guidance schedule (default: the model's, else off).
    #[arg(long)]
    pub use_dynamic_cfg: bool,
    /// Guidance only at timesteps <= N; the noisier steps take the conditional prediction
    /// alone (and skip the unconditional forward). 1000 guides every step. Default: the
    /// model's `generation_config.json`, else every step.
    #[arg(long, value_name = "N")]
    pub guidance_max_timestep: Option<usize>,
    /// Guidance rescale φ in [0, 1] (diffusers' `guidance_rescale`, Lin et al. 2024): each
    /// guided prediction is brought towards the conditional one's standard deviation, against
    /// the over-saturation of strong guidance. 0 turns it off. Default: the model's, else 0.
    #[arg(long, value_name = "PHI")]
    pub guidance_rescale: Option<f64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Frames per second of the written video. Default: the model's, else 8.
    #[arg(long)]
    pub fps: Option<f32>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Output path: `.mp4`, `.gif`, a directory for PNG frames, or `.safetensors` with `--output-type latent`.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputType::Video)]
    pub output_type: OutputType,
    /// Prompt embeddings `[B, L, D]` (safetensors holding one tensor); bypasses the text encoder.
    #[arg(long)]
    pub prompt_embeds: Option<PathBuf>,
    /// Negative prompt embeddings, as `--prompt-embeds`.
    #[arg(long)]
    pub negative_prompt_embeds: Option<PathBuf>,
    /// Initial noise `[B, F, C, H/8, W/8]` (safetensors holding one tensor); bypasses the RNG.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The conditioning inputs of `vdit generate` (boxed: they would make every subcommand large).
#[derive(clap::Args, Debug)]
pub struct MediaArgs {
    /// Image-to-video: the first frame (PNG or JPEG), fitted to the model's size. Needs an
    /// image-to-video checkpoint (transformer in_channels = 2 x the VAE's latent channels).
    #[arg(long, conflicts_with_all = ["video", "extend"])]
    pub image: Option<PathBuf>,
    /// Image-to-video: pixel noise added to the image before encoding, as CogVideoX's I2V
    /// training recipe does (image in [-1, 1] + sigma * N(0, 1)); default none, as diffusers.
    #[arg(long, requires = "image")]
    pub image_noise_sigma: Option<f64>,
    /// Video-to-video: the input clip (.mp4, .gif or a directory of frame_NNN.png), fitted to the
    /// model's size and trimmed to --num-frames (default: the model's, or the clip's largest 4k+1).
    #[arg(long, conflicts_with = "extend")]
    pub video: Option<PathBuf>,
    /// Video-to-video: how much of the schedule runs, in (0, 1]; lower keeps more of the input.
    #[arg(long, requires = "video")]
    pub strength: Option<f64>,
    /// Extend a clip (.mp4, .gif or a PNG-frame directory) by --num-frames new frames.
    #[arg(long)]
    pub extend: Option<PathBuf>,
    /// With --extend: add frames after the clip (forward) or before it (backward).
    #[arg(long, value_enum, default_value_t = DirectionArg::Forward, requires = "extend")]
    pub direction: DirectionArg,
    /// With --extend: the generation window in frames (8k+1; default: the model's frame count).
    #[arg(long, requires = "extend")]
    pub window_frames: Option<usize>,
    /// With --extend: known latent frames per window (default: about half the window).
    #[arg(long, requires = "extend")]
    pub context_latents: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    Forward,
    Backward,
}

/// Reads a safetensors file that must hold exactly one tensor.
pub fn read_single_tensor(path: &Path, flag: &str) -> Result<Tensor> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{flag} {}: cannot read as safetensors", path.display()))?;
    if map.len() != 1 {
        let mut keys: Vec<_> = map.keys().cloned().collect();
        keys.sort();
        bail!(
            "{flag} {}: expected exactly one tensor, found {} ({})",
            path.display(),
            map.len(),
            keys.join(", ")
        );
    }
    let t = map.into_values().next().expect("one tensor");
    Ok(t.to_dtype(DType::F32)?)
}

/// The default model folder: `VDIT_MODEL`, else the model shipped in the repository.
pub fn default_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VDIT_MODEL") {
        return Some(PathBuf::from(p));
    }
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/vdit-shapes");
    shipped
        .join("model_index.json")
        .is_file()
        .then_some(shipped)
}

/// The conditioning input of a run, read before the model is loaded so that a bad path fails
/// fast.
enum Input {
    Text,
    Image(vdit_video::Image),
    Video(vdit_video::Video),
    Extend(vdit_video::Video, Direction),
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let dtype = vdit_core::device::parse_dtype(&args.dtype).context("--dtype")?;
    if let Some(fps) = args.fps {
        if !(fps.is_finite() && fps > 0.0 && fps <= 240.0) {
            bail!("invalid --fps: must be in (0, 240], got {fps}");
        }
    }
    if let Some(s) = args.media.strength {
        if !(s.is_finite() && s > 0.0 && s <= 1.0) {
            bail!("invalid --strength: must be in (0, 1], got {s}");
        }
    }
    if args.output_type == OutputType::Latent
        && args.output.extension().and_then(|e| e.to_str()) != Some("safetensors")
    {
        bail!(
            "--output {}: with --output-type latent the output must be a .safetensors file",
            args.output.display()
        );
    }
    if args.media.extend.is_some() {
        if args.num_frames.is_none() {
            bail!("--extend needs --num-frames N: the number of frames to add (a multiple of 4)");
        }
        if args.output_type == OutputType::Latent {
            bail!("--extend writes the extended video; --output-type latent is not available");
        }
        if args.latents.is_some() {
            bail!("--extend draws its own window latents; --latents cannot be given");
        }
    }
    let input = if let Some(p) = &args.media.image {
        Input::Image(vdit_video::read_image(p).context("--image")?)
    } else if let Some(p) = &args.media.video {
        Input::Video(vdit_video::read_video(p).context("--video")?)
    } else if let Some(p) = &args.media.extend {
        let dir = match args.media.direction {
            DirectionArg::Forward => Direction::Forward,
            DirectionArg::Backward => Direction::Backward,
        };
        Input::Extend(vdit_video::read_video(p).context("--extend")?, dir)
    } else {
        Input::Text
    };
    let model = match args.model.clone().or_else(default_model) {
        Some(m) => m,
        None => bail!(
            "no --model given and no default model found (set VDIT_MODEL or pass --model DIR)"
        ),
    };
    let device = vdit_core::device::default_device()?;

    let prompt = match (&args.prompt_embeds, &args.prompt) {
        (Some(p), _) => PromptInput::Embeds(read_single_tensor(p, "--prompt-embeds")?),
        (None, Some(t)) => PromptInput::Text(t.clone()),
        (None, None) => bail!("give --prompt TEXT or --prompt-embeds FILE"),
    };
    let batch = match &prompt {
        PromptInput::Embeds(e) => e.dim(0).unwrap_or(1),
        PromptInput::Text(_) => 1,
    };
    let negative_prompt = match (&args.negative_prompt_embeds, &args.negative_prompt) {
        (Some(p), _) => Some(PromptInput::Embeds(read_single_tensor(
            p,
            "--negative-prompt-embeds",
        )?)),
        (None, Some(t)) => Some(PromptInput::Text(t.clone())),
        (None, None) => None,
    };
    let latents = args
        .latents
        .as_ref()
        .map(|p| read_single_tensor(p, "--latents"))
        .transpose()?;

    let t0 = Instant::now();
    let mut pipe = CogVideoXPipeline::load(&model, dtype, &device)
        .with_context(|| format!("loading model {}", model.display()))?;
    let load_time = t0.elapsed();
    let defaults = pipe.defaults.clone();
    let mut req = GenerateRequest {
        prompt,
        negative_prompt,
        num_frames: args.num_frames,
        height: args.height,
        width: args.width,
        num_inference_steps: args
            .num_inference_steps
            .unwrap_or(defaults.num_inference_steps),
        guidance_scale: args.guidance_scale.unwrap_or(defaults.guidance_scale),
        use_dynamic_cfg: args.use_dynamic_cfg || defaults.use_dynamic_cfg,
        guidance_max_timestep: args
            .guidance_max_timestep
            .or(defaults.guidance_max_timestep),
        guidance_rescale: args.guidance_rescale.unwrap_or(defaults.guidance_rescale),
        seed: args.seed,
        latents,
        scheduler_noise: None,
        output: match args.output_type {
            OutputType::Video => OutputKind::Frames,
            OutputType::Latent => OutputKind::Latent,
        },
    };
    let (default_frames, default_h, default_w) = pipe.default_size();
    let (height, width) = (
        args.height.unwrap_or(default_h),
        args.width.unwrap_or(default_w),
    );
    let mut fps = args.fps.unwrap_or(defaults.fps);
    // Conditioning media, fitted to the generation size (with a note), as tensors in [0, 1].
    enum Job {
        Text,
        Image(Tensor),
        Video(Tensor),
        Extend(Tensor, Direction, usize),
    }
    let job = match input {
        Input::Text => Job::Text,
        Input::Image(img) => {
            let path = args.media.image.as_deref().expect("image input");
            if !pipe.is_image_to_video() {
                eprintln!(
                    "note: {} is a text-to-video model: the image becomes the first frame by latent replacement (vdit_pipeline::image_condition)",
                    model.display()
                );
            }
            let (img, note) = vdit_video::fit(&img, width as u32, height as u32);
            if let Some(n) = note {
                eprintln!("note: {}: {n}", path.display());
            }
            // [1, 1, 3, H, W] -> [B, 3, H, W]
            let t = vdit_pipeline::rgb8_to_frames(&[img.data], width, height, &device)?
                .squeeze(1)?
                .repeat((batch, 1, 1, 1))?;
            Job::Image(t)
        }
        Input::Video(v) => {
            let path = args.media.video.as_deref().expect("video input");
            if args.fps.is_none() {
                fps = v.fps;
            }
            let tc = pipe.vae_scale_temporal();
            let available = v.frames.len();
            let want = match args.num_frames {
                Some(n) => {
                    if n > available {
                        bail!(
                            "--num-frames {n}: {} has only {available} frames",
                            path.display()
                        );
                    }
                    n
                }
                None => {
                    // the model's frame count, or the clip's largest 4k+1
                    let n = default_frames.min(available);
                    (n - 1) / tc * tc + 1
                }
            };
            let v = trim(v, want, path);
            req.num_frames = Some(want);
            let t = fitted(&v, width, height, path, &device)?;
            let t = t.repeat((batch, 1, 1, 1, 1))?;
            Job::Video(t)
        }
        Input::Extend(v, dir) => {
            let path = args.media.extend.as_deref().expect("extend input");
            if args.fps.is_none() {
                fps = v.fps;
            }
            req.num_frames = args.media.window_frames;
            let t = fitted(&v, width, height, path, &device)?;
            Job::Extend(t, dir, args.num_frames.expect("checked above"))
        }
    };
    // Reject bad sizes before touching the text encoder.
    if !matches!(job, Job::Extend(..)) {
        pipe.resolve_size(&req)?;
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(req.num_inference_steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} steps  {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut times = Timings::default();
    let mut mark = Instant::now();
    let mut observer = |e: Event<'_>| {
        match e {
            Event::Started { steps, .. } => {
                bar.set_length(steps as u64);
                bar.set_message("text")
            }
            Event::TextEncoded => {
                times.text = mark.elapsed();
                mark = Instant::now();
                bar.set_message("denoise");
            }
            Event::Step { .. } => bar.inc(1),
            Event::Decoding => {
                times.denoise += mark.elapsed();
                mark = Instant::now();
                bar.set_message("decode");
            }
        }
        ControlFlow::Continue(())
    };
    let (latents, frames, mut num_frames) = match job {
        Job::Text => {
            let out = pipe.generate(req, &mut observer)?;
            (out.latents, out.frames, out.num_frames)
        }
        Job::Image(image) => {
            let mut r = ImageToVideoRequest::new(req, image);
            r.image_noise_sigma = args.media.image_noise_sigma;
            let out = if pipe.is_image_to_video() {
                pipe.image_to_video(r, &mut observer)?
            } else {
                pipe.image_to_video_by_replacement(r, &mut observer)?
            };
            (out.latents, out.frames, out.num_frames)
        }
        Job::Video(video) => {
            let strength = args.media.strength.unwrap_or(0.8);
            let out = pipe.video_to_video(
                VideoToVideoRequest::new(req, video, strength),
                &mut observer,
            )?;
            (out.latents, out.frames, out.num_frames)
        }
        Job::Extend(video, direction, n) => {
            let out = pipe.extend(
                ExtendRequest {
                    request: req,
                    video,
                    direction,
                    num_frames: n,
                    context_latents: args.media.context_latents,
                },
                &mut observer,
            )?;
            let f = out.frames.dim(1)?;
            eprintln!(
                "extended {} by {n} frames {}: {f} frames in {} window(s)",
                args.media.extend.as_deref().expect("extend").display(),
                match direction {
                    Direction::Forward => "after its end",
                    Direction::Backward => "before its start",
                },
                out.chunks.len()
            );
            (
                Tensor::zeros(1, DType::F32, &Device::Cpu)?,
                Some(out.frames),
                f,
            )
        }
    };
    bar.finish_and_clear();

    let (mut out_w, mut out_h) = (width, height);
    match frames {
        None => {
            times.denoise = mark.elapsed();
            latents
                .save_safetensors("latents", &args.output)
                .with_context(|| format!("writing {}", args.output.display()))?;
        }
        Some(frames) => {
            times.decode = mark.elapsed();
            // (the CogVideoX decoder turns an even latent count F into 4F frames, as diffusers)
            let videos = vdit_pipeline::frames_to_rgb8(&frames)?;
            let (_, f, _, h, w) = frames.dims5()?;
            (num_frames, out_w, out_h) = (f, w, h);
            for (i, frames) in videos.into_iter().enumerate() {
                let video = vdit_video::Video {
                    width: w as u32,
                    height: h as u32,
                    fps,
                    frames,
                };
                let path = numbered(&args.output, i);
                vdit_video::write_video(&path, &video)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    eprintln!(
        "wrote {} ({} frames, {}x{}) in {:.2}s: load {:.2}s, text {:.2}s, denoise {:.2}s, decode {:.2}s",
        args.output.display(),
        num_frames,
        out_w,
        out_h,
        t0.elapsed().as_secs_f64(),
        load_time.as_secs_f64(),
        times.text.as_secs_f64(),
        times.denoise.as_secs_f64(),
        times.decode.as_secs_f64()
    );
    Ok(())
}

/// The first `n` frames of a clip, with a note when frames are dropped.
fn trim(mut v: vdit_video::Video, n: usize, path: &Path) -> vdit_video::Video {
    if v.frames.len() > n {
        eprintln!(
            "note: {}: using the first {n} of {} frames",
            path.display(),
            v.frames.len()
        );
        v.frames.truncate(n);
    }
    v
}

/// A clip fitted to `width x height` (with a note when resized) as `[1, F, 3, H, W]` in [0, 1].
fn fitted(
    v: &vdit_video::Video,
    width: usize,
    height: usize,
    path: &Path,
    device: &Device,
) -> Result<Tensor> {
    let (v, note) = vdit_video::fit_video(v, width as u32, height as u32);
    if let Some(n) = note {
        eprintln!("note: {}: {n}", path.display());
    }
    Ok(vdit_pipeline::rgb8_to_frames(
        &v.frames, width, height, device,
    )?)
}

#[derive(Default)]
struct Timings {
    text: std::time::Duration,
    denoise: std::time::Duration,
    decode: std::time::Duration,
}

/// The path for the i-th video of a batch: the path itself for the first, `name_1.ext`, ... after.
fn numbered(path: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("video");
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}_{i}.{ext}"),
        None => format!("{stem}_{i}"),
    };
    path.with_file_name(name)
}
