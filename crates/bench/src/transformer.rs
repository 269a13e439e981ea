//! The transformer benchmark: one forward of `CogVideoXTransformer3D` at the real 2B width
//! (30 heads × 64, text 4096, time 512) with `layers` blocks and random weights, on random
//! latents `[B, F, 16, H, W]`, 226 text tokens and timestep 999 — the work of
//! `shared/bench/perf_transformer.py`. The sample size is set to the input size, so the 2B
//! sin-cos table is built once at construction (as diffusers' buffer is), not per forward.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::time::{Duration, Instant};
use vdit_models::transformers::cogvideox::{
    cogvideox_rotary_pos_embed, CogVideoXTransformer3D, CogVideoXTransformerConfig,
};

/// Text tokens per prompt, as the pipeline pads them.
pub const TEXT_TOKENS: usize = 226;

/// The 2B-width config with `layers` blocks, sample size = the latent `frames × height × width`,
/// and 3D RoPE instead of sin-cos positions when `rope` (as `ROPE=1` in the reference script).
pub fn bench_config(
    frames: usize,
    height: usize,
    width: usize,
    layers: usize,
    rope: bool,
) -> CogVideoXTransformerConfig {
    CogVideoXTransformerConfig {
        num_layers: layers,
        sample_height: height,
        sample_width: width,
        sample_frames: (frames - 1) * 4 + 1,
        use_rotary_positional_embeddings: rope,
        ..CogVideoXTransformerConfig::cogvideox_2b()
    }
}

/// Builds the model with N(0, 0.02) weights (norm weights too; the values do not change the work).
pub fn random_model(
    cfg: &CogVideoXTransformerConfig,
    dev: &Device,
) -> Result<CogVideoXTransformer3D> {
    let vm = VarMap::new();
    let model = CogVideoXTransformer3D::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    for var in vm.all_vars() {
        var.set(&Tensor::randn(0f32, 0.02, var.shape(), dev)?)?;
    }
    Ok(model)
}

/// Times `runs` forwards (latent `frames × height × width`, batch `batch`) of a random model
/// with `layers` blocks; returns each forward's wall time. Building the model and the inputs
/// is not timed.
pub fn run(
    frames: usize,
    height: usize,
    width: usize,
    batch: usize,
    layers: usize,
    rope: bool,
    runs: usize,
) -> Result<Vec<Duration>> {
    anyhow::ensure!(
        frames >= 1 && batch >= 1,
        "frames and batch must be at least 1"
    );
    let dev = Device::Cpu;
    let cfg = bench_config(frames, height, width, layers, rope);
    let model = random_model(&cfg, &dev)?;
    let x = Tensor::randn(
        0f32,
        1.0,
        (batch, frames, cfg.in_channels, height, width),
        &dev,
    )?;
    let text = Tensor::randn(0f32, 1.0, (batch, TEXT_TOKENS, cfg.text_embed_dim), &dev)?;
    let t = Tensor::full(999f32, batch, &dev)?;
    let tables = if rope {
        Some(cogvideox_rotary_pos_embed(
            &cfg,
            height * 8,
            width * 8,
            frames,
            8,
            &dev,
        )?)
    } else {
        None
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let y = model.forward(&x, &text, &t, tables.as_ref().map(|(c, s)| (c, s)), None)?;
        times.push(t0.elapsed());
        anyhow::ensure!(y.dims() == x.dims(), "output shape {:?}", y.dims());
    }
    Ok(times)
}
