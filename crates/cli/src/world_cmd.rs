//! `vdit world` (sample, bench, parse) and `vdit eval world`: Shapes World from the command line.
//!
//! ```text
//! vdit world sample --split val-comp --count 500 --seed 0 --out data/val-comp [--width 64 --height 64 --frames 17 --fps 8] [--antialias] [--format png|gif|mp4]
//! vdit world bench --count 1000 [--width 64 --height 64 --frames 17]
//! vdit world parse "a small red circle moving quickly left on a black background"
//! vdit eval world --videos data/val-comp [--out report.json]
//! vdit eval modes --model DIR --split val-iid --count 100 --out report.json  (see eval_modes)
//! ```

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use vdit_world::{parse_caption, report, score_dir, ClipFormat, RenderOpts, Split};

#[derive(Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    command: WorldCommand,
}

#[derive(Subcommand)]
enum WorldCommand {
    /// Sample captioned clips of a split: DIR/<id>/frame_000.png ... and DIR/captions.jsonl.
    Sample(SampleArgs),
    /// Render and score clips in memory and print the throughput.
    Bench(BenchArgs),
    /// Parse a caption and print the attributes it states and leaves open (JSON).
    Parse {
        /// The caption, quoted.
        caption: String,
    },
}

/// Size, length and rate of the rendered clips.
#[derive(Args, Clone)]
struct ClipArgs {
    /// Frame width in pixels.
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Frame height in pixels.
    #[arg(long, default_value_t = 64)]
    height: usize,
    /// Frames per clip (4k+1 suits the causal VAE: 1, 9, 17, ...).
    #[arg(long, default_value_t = 17)]
    frames: usize,
    /// Frames per second (the motion per second is the same at any rate).
    #[arg(long, default_value_t = 8.0)]
    fps: f32,
    /// Anti-alias (4x4 supersampling) instead of one sample per pixel.
    #[arg(long)]
    antialias: bool,
}

impl ClipArgs {
    fn opts(&self) -> anyhow::Result<RenderOpts> {
        let o = RenderOpts {
            width: self.width,
            height: self.height,
            frames: self.frames,
            fps: self.fps,
            antialias: self.antialias,
        };
        o.validate()?;
        Ok(o)
    }
}

#[derive(Args)]
struct SampleArgs {
    /// train, val-iid or val-comp.
    #[arg(long)]
    split: String,
    /// Number of clips.
    #[arg(long)]
    count: u64,
    /// Seed; clip i of a split depends only on (split, seed, i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    clip: ClipArgs,
    /// Clip container: png (a directory of frames per clip), gif or mp4.
    #[arg(long, default_value = "png")]
    format: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Number of clips.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Split to sample from.
    #[arg(long, default_value = "train")]
    split: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    clip: ClipArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Score clips against their Shapes World captions.
    World(EvalWorldArgs),
    /// Generate clips for a split's captions with a model and score them.
    Model(crate::eval_model::EvalModelArgs),
    /// Reconstruct a split's clips through a model's VAE: PSNR and scorer accuracy.
    Vae(crate::eval_model::EvalVaeArgs),
    /// Image-to-video, extension and video-to-video with a model, scored on a split's clips.
    Modes(crate::eval_modes::EvalModesArgs),
}

#[derive(Args)]
struct EvalWorldArgs {
    /// Directory with captions.jsonl and, per id, <id>/ (PNG frames), <id>.gif or <id>.mp4.
    #[arg(long)]
    videos: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write each clip's score as JSON lines (id, caption, background, every track
    /// with its per-frame centroids, areas and shapes, and the judgement of each object).
    #[arg(long)]
    clips: Option<PathBuf>,
}

pub fn run_world(args: WorldArgs) -> anyhow::Result<()> {
    match args.command {
        WorldCommand::Sample(a) => sample(a),
        WorldCommand::Bench(a) => bench(a),
        WorldCommand::Parse { caption } => {
            let p = parse_caption(&caption)?;
            let open: Vec<_> = p.objects.iter().map(|o| o.open()).collect();
            let v = serde_json::json!({ "parsed": p, "open": open });
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}

fn sample(a: SampleArgs) -> anyhow::Result<()> {
    let split: Split = a.split.parse()?;
    let format: ClipFormat = a.format.parse()?;
    let opts = a.clip.opts()?;
    if a.count == 0 {
        anyhow::bail!("invalid --count: expected at least 1, found 0");
    }
    let t = Instant::now();
    let records =
        vdit_world::export(&a.out, split, a.count, a.seed, opts, format).with_context(|| {
            format!(
                "sampling {} clips of {split} into {}",
                a.count,
                a.out.display()
            )
        })?;
    eprintln!(
        "wrote {} {split} clips ({}x{}, {} frames at {} fps{}) and captions.jsonl to {} in {:.1} s",
        records.len(),
        opts.width,
        opts.height,
        opts.frames,
        opts.fps,
        if opts.antialias { ", anti-aliased" } else { "" },
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let split: Split = a.split.parse()?;
    let opts = a.clip.opts()?;
    let r = vdit_world::bench::bench(split, a.seed, a.count, opts)?;
    let all = &r.report.summary()["all"];
    println!(
        "{} clips of {}x{}x{} ({split}{}), {} threads: render + score {:.2} s = {:.0} clips/s (render alone {:.2} s = {:.0} clips/s); all-correct {:.4}",
        r.clips,
        opts.frames,
        opts.width,
        opts.height,
        if opts.antialias { ", anti-aliased" } else { "" },
        r.threads,
        r.total_s,
        r.clips_per_s(),
        r.render_s,
        r.clips as f64 / r.render_s,
        all.all_correct.unwrap_or(f64::NAN)
    );
    Ok(())
}

pub fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        EvalCommand::World(a) => eval_world(a),
        EvalCommand::Model(a) => crate::eval_model::run_model(a),
        EvalCommand::Vae(a) => crate::eval_model::run_vae(a),
        EvalCommand::Modes(a) => crate::eval_modes::run_modes(a),
    }
}

fn eval_world(a: EvalWorldArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let clips = score_dir(&a.videos).with_context(|| format!("scoring {}", a.videos.display()))?;
    if clips.is_empty() {
        anyhow::bail!("{}: captions.jsonl lists no clips", a.videos.display());
    }
    let rep = report(&clips);
    print!("{}", rep.table());
    eprintln!(
        "scored {} clips in {:.1} s",
        clips.len(),
        t.elapsed().as_secs_f64()
    );
    if let Some(out) = &a.out {
        std::fs::write(out, rep.to_json_pretty() + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    if let Some(path) = &a.clips {
        vdit_world::write_clip_scores(path, &clips)
            .with_context(|| format!("writing --clips {}", path.display()))?;
        eprintln!("per-clip scores written to {}", path.display());
    }
    Ok(())
}
