//! `vdit train --config FILE [--resume]`: trains the config's stage (see
//! `crates/train/src/config.rs` for every field and its default), writing `loss.jsonl`,
//! `loss.png`, checkpoints and the exported model under `out_dir`. A progress bar shows the loss
//! and the ETA; Ctrl-C saves a checkpoint and stops (a second Ctrl-C exits at once).

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vdit_train::{Control, TrainConfig};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training config: TOML when the name ends in .toml, else JSON. Fields left out take their
    /// defaults (documented in crates/train/src/config.rs).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest checkpoint in out_dir (starts from scratch if there is none).
    #[arg(long)]
    pub resume: bool,
    /// Override the config's out_dir.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Override the config's steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop with a checkpoint once step N is done, as Ctrl-C would: reproduces a run that was
    /// interrupted at step N and resumed (e.g. with other --steps; see the model card).
    #[arg(long, value_name = "N")]
    pub stop_at: Option<u64>,
    /// Print the full config (defaults filled in) as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// No progress bar; a line every 5% instead.
    #[arg(long)]
    pub quiet: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second Ctrl-C: leave now.
        // SAFETY: _exit is async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            libc::_exit(130)
        }
    }
}

fn install_sigint() {
    // SAFETY: installs a handler that only touches an atomic (and calls _exit), both
    // async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut cfg = TrainConfig::load(&args.config)?;
    let mut resume_cmd = format!("vdit train --config {} --resume", args.config.display());
    if let Some(d) = &args.out_dir {
        resume_cmd.push_str(&format!(" --out-dir {}", d.display()));
    }
    if let Some(s) = args.steps {
        resume_cmd.push_str(&format!(" --steps {s}"));
    }
    if let Some(d) = args.out_dir {
        cfg.out_dir = d;
    }
    if let Some(s) = args.steps {
        cfg.steps = s;
        cfg.validate(&args.config).context("--steps")?;
    }
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    install_sigint();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.steps)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("train {}", cfg.stage.name()));
    let every = (cfg.steps / 20).max(1);
    let mut smoothed: Option<f64> = None;
    let summary = vdit_train::stages::run(&cfg, args.resume, &mut |p| {
        let loss = p.record.loss;
        let s = match smoothed {
            Some(s) => 0.95 * s + 0.05 * loss,
            None => loss,
        };
        smoothed = Some(s);
        let msg = format!(
            "loss {loss:.4} (avg {s:.4})  lr {:.2e}  |g| {:.2}  {} elapsed, eta {}",
            p.record.lr,
            p.record.grad_norm,
            hms(p.session),
            hms(p.eta)
        );
        if bar.is_hidden() {
            if p.step % every == 0 || p.step == p.total {
                eprintln!("step {}/{}  {msg}", p.step, p.total);
            }
        } else {
            bar.set_position(p.step);
            bar.set_message(msg);
        }
        if INTERRUPTED.load(Ordering::SeqCst) || args.stop_at.is_some_and(|n| p.step >= n) {
            Control::Stop
        } else {
            Control::Continue
        }
    });
    bar.finish_and_clear();
    let summary = summary?;
    let last = summary.log.last().map(|r| r.loss).unwrap_or(f64::NAN);
    let done = summary.steps - summary.start;
    eprintln!(
        "{} {} steps ({} -> {}) in {:.1} s ({:.3} s/step); last loss {last:.4}",
        if summary.stopped {
            "stopped after"
        } else {
            "trained"
        },
        done,
        summary.start,
        summary.steps,
        summary.seconds,
        summary.seconds / done.max(1) as f64
    );
    let out = &cfg.out_dir;
    eprintln!("  log:  {}", out.join("loss.jsonl").display());
    eprintln!("  plot: {}", out.join("loss.png").display());
    if let Some(c) = &summary.checkpoint {
        eprintln!("  checkpoint: {}", c.display());
    }
    if let Some(e) = &summary.export {
        eprintln!("  model: {}", e.display());
    }
    if summary.stopped {
        eprintln!("  continue with: {resume_cmd}");
    }
    Ok(())
}
