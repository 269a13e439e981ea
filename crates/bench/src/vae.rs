//! The VAE benchmark: one `decode` of `AutoencoderKLCogVideoX` at the real width (diffusers'
//! defaults = the CogVideoX-2B/5B VAE: blocks (128, 256, 256, 512), 16 latent channels, 3 layers
//! per block) with random weights, on a random latent `[1, 16, F, H, W]` — the work of
//! `shared/bench/perf_vae.py`. Latents larger than 30x45 are decoded with tiling (the default),
//! which `perf_vae.py` does not enable.

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::time::{Duration, Instant};
use vdit_models::autoencoders::{AutoencoderKLCogVideoX, AutoencoderKLCogVideoXConfig};

/// Random weights generated on request and not kept (the model keeps its own f32 copy, so a
/// `VarMap` would double the weights' memory). Conv weights are U(-1/sqrt(fan_in), 1/sqrt(fan_in))
/// as PyTorch initialises them; 1-D `weight`s (norms) are 1, biases small.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = if dims.len() == 1 && name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else if dims.len() == 1 {
            (Tensor::rand(-1f32, 1f32, s, dev)? * 0.02)?
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            (Tensor::rand(-1f32, 1f32, s, dev)? * bound)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The real-width VAE (2B config) with random weights.
pub fn random_vae() -> Result<AutoencoderKLCogVideoX> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    Ok(AutoencoderKLCogVideoX::new(
        AutoencoderKLCogVideoXConfig::cogvideox_2b(),
        vb,
    )?)
}

/// Times one decode of a random latent `[1, 16, latent_frames, h, w]` (model construction and
/// input creation are not timed). 3x30x45 -> 9 frames of 240x360; 13x60x90 -> 49 of 480x720.
pub fn run_decode(latent_frames: usize, h: usize, w: usize) -> Result<Duration> {
    anyhow::ensure!(
        latent_frames >= 1 && h >= 1 && w >= 1,
        "latent sizes must be at least 1"
    );
    let vae = random_vae()?;
    let z = Tensor::randn(0f32, 1.0, (1, 16, latent_frames, h, w), &Device::Cpu)?;
    let t0 = Instant::now();
    let y = vae.decode(&z)?;
    let dt = t0.elapsed();
    // decoder batches of 2 latent frames (the first takes the odd one): 2 -> 8 frames, 3 -> 9
    let frames = if latent_frames % 2 == 1 {
        4 * latent_frames - 3
    } else {
        4 * latent_frames
    };
    anyhow::ensure!(
        y.dims() == [1, 3, frames, 8 * h, 8 * w],
        "decoded shape {:?}",
        y.dims()
    );
    Ok(dt)
}
