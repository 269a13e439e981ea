//! `cargo run --release -p vdit-bench --example transformer -- [F H W B LAYERS] [--rope] [--runs N]`
//!
//! Times the transformer at the 2B width (default: latent 13×30×44, batch 1, 2 layers, 2 runs)
//! and prints each run and the process's peak RSS.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::time::Instant;
use vdit_models::layers::{
    attention,
    linear::{Activation, Linear},
};

/// `--kernels`: times the main kernels alone at the 2B shapes (S = 4516 tokens, D = 1920).
fn kernels() -> Result<()> {
    let dev = Device::Cpu;
    let (s, d, heads) = (4516, 1920, 30);
    let x = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    let time = |name: &str, flop: f64, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        f()?;
        let t = Instant::now();
        let n = 3;
        for _ in 0..n {
            f()?;
        }
        let dt = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "{name:<28} {:8.1} ms {:7.1} GF/s",
            dt * 1e3,
            flop / dt / 1e9
        );
        Ok(())
    };
    let w = |o: usize, i: usize| Tensor::randn(0f32, 0.02, (o, i), &dev);
    let qkv = Linear::from_tensors(
        w(d, d)?,
        Some(Tensor::zeros(d, candle_core::DType::F32, &dev)?),
    );
    let ff1 = Linear::from_tensors(
        w(4 * d, d)?,
        Some(Tensor::zeros(4 * d, candle_core::DType::F32, &dev)?),
    );
    let ff2 = Linear::from_tensors(
        w(d, 4 * d)?,
        Some(Tensor::zeros(d, candle_core::DType::F32, &dev)?),
    );
    let h = ff1.forward(&x)?;
    let sd = (s * d) as f64;
    time("linear D->D", 2.0 * sd * d as f64, &|| Ok(qkv.forward(&x)?))?;
    time("linear D->4D + gelu", 8.0 * sd * d as f64, &|| {
        Ok(ff1.forward_act(&x, Activation::GeluTanh)?)
    })?;
    time(
        "linear 4D->D",
        8.0 * sd * d as f64,
        &|| Ok(ff2.forward(&h)?),
    )?;
    time("candle matmul D->4D", 8.0 * sd * d as f64, &|| {
        Ok(x.broadcast_matmul(&ff1.weight().t()?)?)
    })?;
    let q = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    {
        let mut buf: Vec<f32> = (0..64 * s).map(|i| (i % 97) as f32 * 0.1).collect();
        let mut sums = vec![0f32; 64];
        let t = Instant::now();
        for _ in 0..100 {
            vdit_models::layers::cpu::softmax_unnormalised(&mut buf, s, 0.125, &mut sums);
        }
        let dt = t.elapsed().as_secs_f64() / 100.0;
        println!(
            "softmax 64x{s}: {:.3} ms, {:.2} ns/elem",
            dt * 1e3,
            dt * 1e9 / (64 * s) as f64
        );
    }
    time("sdpa 30x64", 4.0 * (s * s * d) as f64, &|| {
        Ok(attention::sdpa(&q, &k, &x, heads, 0.125)?)
    })?;
    Ok(())
}

fn main() -> Result<()> {
    let mut nums = Vec::new();
    let mut rope = false;
    let mut runs = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rope" => rope = true,
            "--kernels" => return kernels(),
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            n => nums.push(
                n.parse::<usize>()
                    .with_context(|| format!("not a number: {n}"))?,
            ),
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
