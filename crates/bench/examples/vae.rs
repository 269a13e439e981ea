//! `cargo run --release -p vdit-bench --example vae -- [F H W]`
//!
//! Times one decode of the real-width CogVideoX VAE with random weights (default: latent
//! 3x30x45 -> 9 x 240 x 360, as `shared/bench/perf_vae.py 3 30 45`) and prints the time and the
//! process's peak RSS. 13 60 90 is the 49-frame 480x720 decode (tiled).
//!
//! `... --example vae -- conv CIN COUT T H W` times one causal 3x3x3 convolution of the VAE's
//! kernel (with the fused GroupNorm + SiLU input transform) and prints its GFLOP/s.

use anyhow::{Context, Result};
use std::time::Instant;
use vdit_models::autoencoders::conv3d::{conv, ConvWeights, Front, Geom, Pre, Source};
use vdit_models::autoencoders::video::Video;

fn conv_bench(n: &[usize]) -> Result<()> {
    let [cin, cout, t, h, w] = *n else {
        anyhow::bail!("conv CIN COUT T H W")
    };
    let x = Video::new(
        t,
        h,
        w,
        cin,
        (0..t * h * w * cin)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect(),
    );
    let wv: Vec<f32> = (0..cout * cin * 27)
        .map(|i| ((i * 104729) % 1000) as f32 / 1e5)
        .collect();
    let wt = ConvWeights::from_torch(&wv, &[cout, cin, 3, 3, 3], vec![0.0; cout]);
    let (scale, shift) = (vec![1.0; cin], vec![0.0; cin]);
    let pre = Pre::Affine {
        scale: &scale,
        shift: &shift,
        silu: true,
    };
    for _ in 0..2 {
        let t0 = Instant::now();
        let y = conv(
            &Source {
                x: &x,
                up: None,
                pre: &pre,
            },
            &Front::ReplicateFirst,
            &wt,
            Geom::same(1),
        );
        let dt = t0.elapsed().as_secs_f64();
        let flops = 2.0 * (cin * cout * 27) as f64 * (y.t * y.h * y.w) as f64;
        println!(
            "conv {cin}->{cout} x[{t},{h},{w}]: {:.3}s, {:.1} GFLOP/s",
            dt,
            flops / dt / 1e9
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let conv_mode = args.first().map(|a| a == "conv").unwrap_or(false);
    let nums = args
        .iter()
        .skip(conv_mode as usize)
        .map(|a| {
            a.parse::<usize>()
                .with_context(|| format!("not a number: {a}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if conv_mode {
        return conv_bench(&nums);
    }
    let get = |i: usize, d: usize| nums.get(i).copied().unwrap_or(d);
    let (f, h, w) = (get(0, 3), get(1, 30), get(2, 45));
    let dt = vdit_bench::vae::run_decode(f, h, w)?;
    println!(
        "vae decode latent=(1, 16, {f}, {h}, {w}) -> (1, 3, {}, {}, {}) in {:.1}s",
        if f % 2 == 1 { 4 * f - 3 } else { 4 * f },
        8 * h,
        8 * w,
        dt.as_secs_f64()
    );
    if let Some(rss) = vdit_bench::peak_rss_bytes() {
        println!("peak RSS {:.2} GB", rss as f64 / 1e9);
    }
    Ok(())
}
