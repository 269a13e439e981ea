//! `cargo run --release -p vdit-bench --example transformer -- [F H W B LAYERS] [--rope] [--runs N]`
//!
//! Times the transformer at the 2B width (default: latent 13×30×44, batch 1, 2 layers, 2 runs)
//! and prints each run and the process's peak RSS.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let mut nums = Vec::new();
    let mut rope = false;
    let mut runs = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rope" => rope = true,
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            n => nums.push(n.parse::<usize>().with_context(|| format!("not a number: {n}"))?),
        }
    }
    let get = |i: usize, d: usize| nums.get(i).copied().unwrap_or(d);
    let (f, h, w, b, layers) = (get(0, 13), get(1, 30), get(2, 44), get(3, 1), get(4, 2));
    let times = vdit_bench::transformer::run(f, h, w, b, layers, rope, runs)?;
    for (i, t) in times.iter().enumerate() {
        println!(
            "run{i}: latent {f}x{h}x{w} B={b} layers={layers} rope={rope} tokens/sample={}+226 forward={:.2}s",
            f * (h / 2) * (w / 2),
            t.as_secs_f64()
        );
    }
    if let Some(rss) = vdit_bench::peak_rss_bytes() {
        println!("peak RSS {:.2} GB", rss as f64 / 1e9);
    }
    Ok(())
}
