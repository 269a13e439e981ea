//! `vdit bench`: the transformer and VAE at the real widths with random weights, beside diffusers
//! on the same shapes (`shared/bench/perf_*.py`), in one invocation, with time and peak RSS.
//!
//! Each case runs in a child process (ours: `vdit bench --case ...`; the reference: its Python
//! script), so peak RSS is that child's own maximum resident set, read from `wait4`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Which workloads: all, transformer or vae.
    #[arg(long, default_value = "all")]
    pub only: String,
    /// Python with torch + diffusers for the reference (see shared/bench/README.md).
    #[arg(long, default_value = "/tmp/ref/bin/python")]
    pub reference_python: PathBuf,
    /// Folder holding perf_transformer.py and perf_vae.py.
    #[arg(long)]
    pub reference_scripts: Option<PathBuf>,
    /// Skip the reference even when it is available.
    #[arg(long)]
    pub no_reference: bool,
    /// Timed runs per transformer case (the last is reported, as the reference's run1).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Internal: run one case in this process and print its seconds.
    #[arg(long, hide = true)]
    pub case: Option<String>,
}

/// One workload: our case name and the reference script invocation.
struct Work {
    name: &'static str,
    case: &'static str,
    script: &'static str,
    args: &'static [&'static str],
    env: Option<(&'static str, &'static str)>,
}

const WORK: &[Work] = &[
    Work {
        name: "transformer 2B width, 2 layers, latent 13x30x44, batch 1",
        case: "transformer-b1",
        script: "perf_transformer.py",
        args: &["13", "30", "44", "1", "2"],
        env: None,
    },
    Work {
        name: "transformer 2B width, 2 layers, latent 13x30x44, batch 2",
        case: "transformer-b2",
        script: "perf_transformer.py",
        args: &["13", "30", "44", "2", "2"],
        env: None,
    },
    Work {
        name: "VAE decode, latent 3x30x45 -> 9x240x360",
        case: "vae-3x30x45",
        script: "perf_vae.py",
        args: &["3", "30", "45"],
        env: None,
    },
];

fn run_case(case: &str, runs: usize) -> Result<Duration> {
    let last = |v: Vec<Duration>| v.last().copied().context("no run");
    match case {
        "transformer-b1" => last(vdit_bench::transformer::run(13, 30, 44, 1, 2, false, runs)?),
        "transformer-b2" => last(vdit_bench::transformer::run(13, 30, 44, 2, 2, false, runs)?),
        "vae-3x30x45" => vdit_bench::vae::run_decode(3, 30, 45),
        other => bail!("unknown --case {other}"),
    }
}

/// Runs a command, returning (stdout, wall time, peak RSS in bytes of that child).
fn measure(cmd: &mut Command) -> Result<(String, Duration, u64)> {
    let t0 = std::time::Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.context("child stdout")?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out)?;
    let mut status = 0;
    // SAFETY: plain FFI call with valid pointers to locals; `pid` is our own child.
    #[allow(unsafe_code)]
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let rc = libc::wait4(pid, &mut status, 0, &mut usage);
        (rc, usage)
    };
    if rc < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (status {status}); output:\n{out}");
    }
    Ok((out, t0.elapsed(), usage.ru_maxrss as u64 * 1024))
}

/// The reference's timed figure: the last `forward=…s` (transformer) or `in …s` (VAE).
fn parse_reference_secs(out: &str) -> Option<f64> {
    let mut found = None;
    for line in out.lines() {
        for tok in line.split_whitespace() {
            let v = tok.strip_prefix("forward=").unwrap_or(tok);
            if let Some(num) = v.strip_suffix('s') {
                if let Ok(x) = num.parse::<f64>() {
                    if tok.starts_with("forward=") || line.contains(" in ") {
                        found = Some(x);
                    }
                }
            }
        }
    }
    found
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(case) = &args.case {
        let d = run_case(case, args.runs.max(1))?;
        println!("secs={:.3}", d.as_secs_f64());
        return Ok(());
    }
    let scripts = args
        .reference_scripts
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench"));
    let reference = !args.no_reference && args.reference_python.is_file() && scripts.is_dir();
    if !reference && !args.no_reference {
        eprintln!(
            "reference not available ({} or {} missing): reporting vdit only. Set it up with shared/bench/README.md.",
            args.reference_python.display(),
            scripts.display()
        );
    }
    let exe = std::env::current_exe()?;
    println!(
        "{:<58} {:>10} {:>10} {:>11} {:>11} {:>7} {:>7}",
        "work", "vdit", "diffusers", "vdit peak", "ref peak", "speed", "memory"
    );
    for w in WORK {
        if args.only != "all" && !w.case.starts_with(&args.only) {
            continue;
        }
        let (out, _, ours_rss) = measure(
            Command::new(&exe)
                .args(["bench", "--case", w.case, "--runs"])
                .arg(args.runs.to_string()),
        )?;
        let ours: f64 = out
            .trim()
            .strip_prefix("secs=")
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected output from our case: {out}"))?;
        let mut line = format!("{:<58} {:>9.2}s", w.name, ours);
        if reference {
            let mut cmd = Command::new(&args.reference_python);
            cmd.arg(scripts.join(w.script))
                .args(w.args)
                .env("HF_HUB_OFFLINE", "1");
            if let Some((k, v)) = w.env {
                cmd.env(k, v);
            }
            let (rout, _, ref_rss) = measure(&mut cmd)?;
            let refs = parse_reference_secs(&rout)
                .with_context(|| format!("could not read the reference's time from:\n{rout}"))?;
            line += &format!(
                " {:>9.2}s {:>11} {:>11} {:>6.2}x {:>6.2}x",
                refs,
                gb(ours_rss),
                gb(ref_rss),
                refs / ours,
                ref_rss as f64 / ours_rss as f64
            );
        } else {
            line += &format!(" {:>10} {:>11}", "-", gb(ours_rss));
        }
        println!("{line}");
    }
    println!("speed = diffusers time / vdit time; memory = diffusers peak RSS / vdit peak RSS (higher is better for vdit)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_reference_secs;

    #[test]
    fn reads_reference_lines() {
        let t = "build 1.0s params=1\nrun0: tokens/sample=4290+226 B=1 layers=2 forward=10.52s out=(1,)\nrun1: tokens/sample=4290+226 B=1 layers=2 forward=9.87s out=(1,)\n";
        assert_eq!(parse_reference_secs(t), Some(9.87));
        let v = "vae decode latent=(1, 16, 3, 30, 45) -> (1, 3, 9, 240, 360) in 155.5s\n";
        assert_eq!(parse_reference_secs(v), Some(155.5));
        assert_eq!(parse_reference_secs("nothing"), None);
    }
}
