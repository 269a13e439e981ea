//! `vdit generate`: text-to-video from a diffusers-format folder.
//!
//! Output by the path's form: `.mp4` (H.264 yuv420p), `.gif` (looping), a directory of PNG frames,
//! or with `--output-type latent` a safetensors file holding the final latents (tensor `latents`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vdit_pipeline::{CogVideoXPipeline, Event, GenerateRequest, OutputKind, PromptInput};

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
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Pixel frames: 4k+1 (e.g. 49). Default: the model's.
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

pub fn run(args: GenerateArgs) -> Result<()> {
    let dtype = vdit_core::device::parse_dtype(&args.dtype).context("--dtype")?;
    if let Some(fps) = args.fps {
        if !(fps.is_finite() && fps > 0.0 && fps <= 240.0) {
            bail!("invalid --fps: must be in (0, 240], got {fps}");
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
    let fps = args.fps.unwrap_or(defaults.fps);
    let req = GenerateRequest {
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
        seed: args.seed,
        latents,
        scheduler_noise: None,
        output: match args.output_type {
            OutputType::Video => OutputKind::Frames,
            OutputType::Latent => OutputKind::Latent,
        },
    };
    // Reject bad sizes before touching the text encoder.
    pipe.resolve_size(&req)?;

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
    let out = pipe.generate(req, &mut |e| {
        match e {
            Event::Started { .. } => bar.set_message("text"),
            Event::TextEncoded => {
                times.text = mark.elapsed();
                mark = Instant::now();
                bar.set_message("denoise");
            }
            Event::Step { .. } => bar.inc(1),
            Event::Decoding => {
                times.denoise = mark.elapsed();
                mark = Instant::now();
                bar.set_message("decode");
            }
        }
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();

    match out.frames {
        None => {
            times.denoise = mark.elapsed();
            out.latents
                .save_safetensors("latents", &args.output)
                .with_context(|| format!("writing {}", args.output.display()))?;
        }
        Some(frames) => {
            times.decode = mark.elapsed();
            let videos = vdit_pipeline::frames_to_rgb8(&frames)?;
            let (_, _, _, h, w) = frames.dims5()?;
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
        out.num_frames,
        out.width,
        out.height,
        t0.elapsed().as_secs_f64(),
        load_time.as_secs_f64(),
        times.text.as_secs_f64(),
        times.denoise.as_secs_f64(),
        times.decode.as_secs_f64()
    );
    Ok(())
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
