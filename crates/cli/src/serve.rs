//! `vdit serve`: video generation as a service (see vdit_server). Jobs are submitted over HTTP
//! (`POST /v1/videos`), followed over SSE, downloaded as MP4/GIF, and kept in SQLite under
//! `--data`, so a restart loses nothing. A web page is served at `/`.
//!
//! Prints `listening on http://ADDR` on stdout once ready (ADDR with the real port when
//! `--addr` asks for port 0); Ctrl-C or SIGTERM stops it, leaving a running job to be resumed
//! at the next start.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use vdit_server::{Limits, ServerConfig};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A diffusers-format CogVideoX folder with text_encoder/ and tokenizer/. Default:
    /// VDIT_MODEL, else the shipped models/vdit-shapes.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Folder for the job database (jobs.sqlite3) and the videos.
    #[arg(long, default_value = "vdit-data")]
    pub data: PathBuf,
    /// Worker threads, each with its own copy of the model and one job at a time.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Most jobs waiting at once; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest num_frames a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_frames)]
    pub max_frames: usize,
    /// Largest height x width a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_pixels)]
    pub max_pixels: usize,
    /// Largest num_inference_steps a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    pub max_steps: usize,
    /// Largest request body, bytes (413 above).
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Longest prompt, characters.
    #[arg(long, default_value_t = Limits::default().max_prompt_chars)]
    pub max_prompt_chars: usize,
    /// Estimated peak memory one job may need, GiB (default: half the machine's memory).
    #[arg(long)]
    pub max_job_memory_gb: Option<f64>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let model = match args.model.clone().or_else(crate::generate::default_model) {
        Some(m) => m,
        None => bail!(
            "no --model given and no default model found (set VDIT_MODEL or pass --model DIR)"
        ),
    };
    let max_job_bytes = match args.max_job_memory_gb {
        None => vdit_server::validate::default_job_bytes(),
        Some(g) if g.is_finite() && g > 0.0 => (g * (1u64 << 30) as f64) as u64,
        Some(g) => bail!("invalid --max-job-memory-gb: must be a positive number, got {g}"),
    };
    for (flag, v) in [
        ("--workers", args.workers),
        ("--max-queue", args.max_queue),
        ("--max-frames", args.max_frames),
        ("--max-pixels", args.max_pixels),
        ("--max-steps", args.max_steps),
        ("--max-body-bytes", args.max_body_bytes),
        ("--max-prompt-chars", args.max_prompt_chars),
    ] {
        if v == 0 {
            bail!("invalid {flag}: must be at least 1");
        }
    }
    let cfg = ServerConfig {
        model: model.clone(),
        addr: args.addr,
        data: args.data.clone(),
        limits: Limits {
            max_frames: args.max_frames,
            max_pixels: args.max_pixels,
            max_steps: args.max_steps,
            max_body_bytes: args.max_body_bytes,
            max_prompt_chars: args.max_prompt_chars,
            max_job_bytes,
        },
        max_queue: args.max_queue,
        workers: args.workers,
        start_paused: false,
    };
    let handle = vdit_server::start(cfg, true)
        .with_context(|| format!("starting the server with model {}", model.display()))?;
    let r = handle.recovery();
    if r.requeued + r.failed > 0 {
        eprintln!(
            "recovered {} unfinished job(s) from {}; {} failed after repeated interruptions",
            r.requeued,
            args.data.display(),
            r.failed
        );
    }
    let m = handle.model();
    eprintln!(
        "model {} ({} frames at {}x{}, {} steps by default), data in {}",
        m.name,
        m.default_frames,
        m.default_width,
        m.default_height,
        m.default_steps,
        args.data.display()
    );
    println!("listening on http://{}", handle.addr());
    std::io::stdout().flush().ok();
    handle.wait();
    eprintln!("stopped");
    Ok(())
}
