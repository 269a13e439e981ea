//! `vdit eval model` and `vdit eval vae`: a model folder scored on Shapes World.
//!
//! ```text
//! vdit eval model [--model DIR] --split val-iid --count 200 [--batch 8] [--out report.json] [--save-videos DIR]
//! vdit eval vae   [--model DIR] --split val-iid --count 200 [--out report.json]
//! ```
//!
//! `model` generates one clip per caption of the split (clip i's caption, as `vdit world sample`
//! would draw it) at the model's defaults and scores it against the caption with the Shapes
//! World scorer. `vae` encodes the split's ground-truth renders, decodes the posterior mean, and
//! reports PSNR plus the scorer's accuracy on the reconstructions.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vdit_pipeline::{CogVideoXPipeline, GenerateRequest, OutputKind, PromptInput};
use vdit_world::{
    parse_caption, render, sample_clip, score_clip_at, ClipRecord, RenderOpts, Report, Split,
};

#[derive(clap::Args, Debug)]
pub struct EvalModelArgs {
    /// Model folder. Default: the shipped model (or VDIT_MODEL).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// train, val-iid or val-comp.
    #[arg(long, default_value = "val-iid")]
    pub split: String,
    /// Clips (captions) to generate and score.
    #[arg(long, default_value_t = 200)]
    pub count: u64,
    /// World seed of the captions; clip i depends only on (split, seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Denoising steps. Default: the model's.
    #[arg(long)]
    pub num_inference_steps: Option<usize>,
    /// Guidance scale. Default: the model's.
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Guidance only at timesteps <= N (1000: every step). Default: the model's.
    #[arg(long, value_name = "N")]
    pub guidance_max_timestep: Option<usize>,
    /// Guidance rescale φ in [0, 1] (diffusers' `guidance_rescale`; 0: off). Default: the model's.
    #[arg(long, value_name = "PHI")]
    pub guidance_rescale: Option<f64>,
    /// Pixel frames (4k+1). Default: the model's.
    #[arg(long)]
    pub num_frames: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the generated clips (MP4) and captions.jsonl here, for `vdit eval world`.
    #[arg(long)]
    pub save_videos: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct EvalVaeArgs {
    /// Model folder (its vae/ is used). Default: the shipped model (or VDIT_MODEL).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "val-iid")]
    pub split: String,
    #[arg(long, default_value_t = 200)]
    pub count: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 17)]
    pub frames: usize,
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    #[arg(long, default_value_t = 64)]
    pub height: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub(crate) fn model_dir(m: &Option<PathBuf>) -> Result<PathBuf> {
    match m.clone().or_else(crate::generate::default_model) {
        Some(m) => Ok(m),
        None => bail!(
            "no --model given and no default model found (set VDIT_MODEL or pass --model DIR)"
        ),
    }
}

pub(crate) fn check_counts(count: u64, batch: usize) -> Result<()> {
    if count == 0 {
        bail!("invalid --count: expected at least 1, found 0");
    }
    if batch == 0 {
        bail!("invalid --batch: expected at least 1, found 0");
    }
    Ok(())
}

/// Loads a model folder for evaluation: f32 on the default device, the text encoder kept
/// between batches.
pub(crate) fn load_pipeline(model: &Path) -> Result<CogVideoXPipeline> {
    let dev = vdit_core::device::default_device()?;
    let mut pipe = CogVideoXPipeline::load(model, DType::F32, &dev)
        .with_context(|| format!("loading model {}", model.display()))?;
    pipe.text_encoder_policy = vdit_pipeline::TextEncoderPolicy::Keep;
    Ok(pipe)
}

/// Generates and scores `count` clips of a split.
pub fn run_model(a: EvalModelArgs) -> Result<()> {
    check_counts(a.count, a.batch)?;
    let split: Split = a.split.parse()?;
    let model = model_dir(&a.model)?;
    let t0 = Instant::now();
    let mut pipe = load_pipeline(&model)?;
    let defaults = pipe.defaults.clone();
    let probe = GenerateRequest {
        num_frames: a.num_frames,
        height: a.height,
        width: a.width,
        num_inference_steps: a
            .num_inference_steps
            .unwrap_or(defaults.num_inference_steps),
        guidance_scale: a.guidance_scale.unwrap_or(defaults.guidance_scale),
        use_dynamic_cfg: defaults.use_dynamic_cfg,
        guidance_max_timestep: a.guidance_max_timestep.or(defaults.guidance_max_timestep),
        guidance_rescale: a.guidance_rescale.unwrap_or(defaults.guidance_rescale),
        ..Default::default()
    };
    let (frames, height, width) = pipe.resolve_size(&probe)?;
    let fps = defaults.fps;
    let opts = RenderOpts {
        width,
        height,
        frames,
        fps,
        antialias: false,
    };
    opts.validate()?;
    if let Some(d) = &a.save_videos {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    eprintln!(
        "evaluating {} on {} {split} captions: {frames}x{height}x{width}, {} steps, guidance {}{}{}",
        model.display(),
        a.count,
        probe.num_inference_steps,
        probe.guidance_scale,
        probe
            .guidance_max_timestep
            .map_or(String::new(), |m| format!(" at timesteps <= {m}")),
        if probe.guidance_rescale > 0.0 {
            format!(", rescaled {}", probe.guidance_rescale)
        } else {
            String::new()
        }
    );
    let bar = indicatif::ProgressBar::new(a.count);
    let mut report = Report::new();
    let mut records = Vec::new();
    let mut gen_time = 0.0;
    let indices: Vec<u64> = (0..a.count).collect();
    for (bi, chunk) in indices.chunks(a.batch).enumerate() {
        let clips: Vec<_> = chunk
            .iter()
            .map(|&i| sample_clip(split, a.seed, i, opts.duration()))
            .collect();
        let prompts: Vec<&str> = clips.iter().map(|(_, c)| c.as_str()).collect();
        let tg = Instant::now();
        let embeds = pipe.encode_text(&prompts)?;
        let negative = if probe.guidance_scale > 1.0 {
            let empty = vec![""; prompts.len()];
            Some(PromptInput::Embeds(pipe.encode_text(&empty)?))
        } else {
            None
        };
        let req = GenerateRequest {
            prompt: PromptInput::Embeds(embeds),
            negative_prompt: negative,
            num_frames: Some(frames),
            height: Some(height),
            width: Some(width),
            num_inference_steps: probe.num_inference_steps,
            guidance_scale: probe.guidance_scale,
            use_dynamic_cfg: probe.use_dynamic_cfg,
            guidance_max_timestep: probe.guidance_max_timestep,
            guidance_rescale: probe.guidance_rescale,
            seed: a.seed.wrapping_mul(1_000_003).wrapping_add(bi as u64),
            output: OutputKind::Frames,
            ..Default::default()
        };
        let out = pipe.generate(req, &mut |_| ControlFlow::Continue(()))?;
        gen_time += tg.elapsed().as_secs_f64();
        let videos = vdit_pipeline::frames_to_rgb8(out.frames.as_ref().expect("frames asked"))?;
        for ((&index, (scene, caption)), video) in chunk.iter().zip(&clips).zip(videos) {
            let parsed = parse_caption(caption)?;
            let score = score_clip_at(&video, width, height, fps, &parsed)?;
            let truth = score_clip_at(&render(scene, opts), width, height, fps, &parsed)?;
            report.add(Some(split), &parsed, &score, Some(&truth));
            if let Some(d) = &a.save_videos {
                let id = vdit_world::clip_id(split, index);
                let v = vdit_video::Video {
                    width: width as u32,
                    height: height as u32,
                    fps,
                    frames: video,
                };
                let p = d.join(format!("{id}.mp4"));
                vdit_video::write_video(&p, &v)
                    .with_context(|| format!("writing {}", p.display()))?;
                records.push(ClipRecord {
                    id,
                    split: Some(split),
                    caption: caption.clone(),
                    scene: Some(scene.clone()),
                    seed: Some(a.seed),
                    index: Some(index),
                    width: Some(width),
                    height: Some(height),
                    frames: Some(frames),
                    fps: Some(fps),
                    antialias: Some(false),
                });
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(d) = &a.save_videos {
        vdit_world::dataset::write_records(&d.join("captions.jsonl"), &records)?;
    }
    print!("{}", report.table());
    eprintln!(
        "{} clips in {:.1} s ({:.2} s per clip generating, batches of {})",
        a.count,
        t0.elapsed().as_secs_f64(),
        gen_time / a.count as f64,
        a.batch
    );
    write_report(&a.out, report.to_json())
}

pub(crate) fn write_report(out: &Option<PathBuf>, json: serde_json::Value) -> Result<()> {
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    Ok(())
}

/// Reconstructs `count` ground-truth clips through the VAE: PSNR and scorer accuracy.
pub fn run_vae(a: EvalVaeArgs) -> Result<()> {
    check_counts(a.count, 1)?;
    let split: Split = a.split.parse()?;
    let model = model_dir(&a.model)?;
    let vae_dir = vae_folder(&model);
    let dev = vdit_core::device::default_device()?;
    let vae = vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoX::load(
        &vae_dir,
        DType::F32,
        &dev,
    )
    .with_context(|| format!("loading VAE {}", vae_dir.display()))?;
    let opts = RenderOpts {
        width: a.width,
        height: a.height,
        frames: a.frames,
        fps: 8.0,
        antialias: false,
    };
    opts.validate()?;
    let t0 = Instant::now();
    let mut report = Report::new();
    let mut psnrs = Vec::new();
    let mut truth_report = Report::new();
    for i in 0..a.count {
        let (scene, caption) = sample_clip(split, a.seed, i, opts.duration());
        let frames = render(&scene, opts);
        let x = rgb8_to_tensor(&frames, a.width, a.height, &dev)?;
        let z = vae.encode(&x)?.mode();
        let y = vae.decode(&z)?; // [1, 3, F, H, W] in [-1, 1]
        let y = ((y.clamp(-1.0, 1.0)? + 1.0)? * 0.5)?.permute((0, 2, 1, 3, 4))?;
        let rec = vdit_pipeline::frames_to_rgb8(&y)?.remove(0);
        let a_bytes: Vec<u8> = frames.concat();
        let b_bytes: Vec<u8> = rec.concat();
        psnrs.push(vdit_video::psnr(&a_bytes, &b_bytes));
        let parsed = parse_caption(&caption)?;
        let score = score_clip_at(&rec, a.width, a.height, opts.fps, &parsed)?;
        let truth = score_clip_at(&frames, a.width, a.height, opts.fps, &parsed)?;
        report.add(Some(split), &parsed, &score, Some(&truth));
        truth_report.add(Some(split), &parsed, &truth, Some(&truth));
    }
    let finite: Vec<f64> = psnrs.iter().copied().filter(|p| p.is_finite()).collect();
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "VAE {}: {} {split} clips of {}x{}x{}: PSNR mean {mean:.2} dB, min {min:.2} dB ({} exact)",
        vae_dir.display(),
        a.count,
        a.frames,
        a.height,
        a.width,
        psnrs.len() - finite.len()
    );
    println!("scorer on the reconstructions:");
    print!("{}", report.table());
    eprintln!("in {:.1} s", t0.elapsed().as_secs_f64());
    write_report(
        &a.out,
        serde_json::json!({
            "vae": vae_dir.display().to_string(),
            "split": split.name(),
            "clips": a.count,
            "psnr_mean_db": mean,
            "psnr_min_db": min,
            "reconstructions": report.to_json(),
            "ground_truth": truth_report.to_json(),
        }),
    )
}

/// A pipeline folder's `vae/`, or the folder itself when it is a VAE folder.
fn vae_folder(model: &Path) -> PathBuf {
    if model.join("model_index.json").is_file() {
        model.join("vae")
    } else {
        model.to_path_buf()
    }
}

/// RGB8 frames to `[1, 3, F, H, W]` in [-1, 1].
fn rgb8_to_tensor(
    frames: &[Vec<u8>],
    w: usize,
    h: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let f = frames.len();
    let plane = w * h;
    let mut out = vec![0f32; 3 * f * plane];
    for (k, frame) in frames.iter().enumerate() {
        for (p, rgb) in frame.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[(c * f + k) * plane + p] = rgb[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, 3, f, h, w), dev)?)
}
