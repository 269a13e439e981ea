//! Timestep and position embeddings (diffusers `models/embeddings.py`).
//!
//! - [`timestep_embedding`]: `get_timestep_embedding`, sinusoidal, float32 as torch computes it.
//! - [`TimestepEmbedding`]: `Linear → SiLU → Linear` (`linear_1`, `linear_2`).
//! - [`sincos_pos_embed_3d`]: `get_3d_sincos_pos_embed` (float64 frequencies, as diffusers).

use super::linear::Linear;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Sinusoidal embedding of `t [N]` (any float dtype; used as f32) into `[N, dim]` f32:
/// frequencies `exp(−ln(max_period)·i/(half − shift))`, then `[sin | cos]`, or `[cos | sin]`
/// with `flip_sin_to_cos`; an odd `dim` gets a zero last column.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    max_period: f64,
) -> Result<Tensor> {
    if t.rank() != 1 {
        candle_core::bail!("timesteps must be 1-D, found shape {:?}", t.dims())
    }
    let ts: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
    let half = dim / 2;
    // torch: (-ln(max_period) * arange(half, f32)) / (half - shift), all in f32; exp in f32
    let c = -(max_period.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = c * i as f32 / denom;
            (e as f64).exp() as f32
        })
        .collect();
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &tv in &ts {
        let args = freqs.iter().map(|&f| (tv * f) as f64);
        let (sin, cos): (Vec<f32>, Vec<f32>) =
            args.map(|a| (a.sin() as f32, a.cos() as f32)).unzip();
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if !dim.is_multiple_of(2) {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (ts.len(), dim), t.device())
}

/// diffusers' `TimestepEmbedding(in, out, act_fn="silu")`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(in_dim, out_dim, true, vb.pp("linear_1"))?,
            linear_2: Linear::new(out_dim, out_dim, true, vb.pp("linear_2"))?,
        })
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&candle_nn::ops::silu(&self.linear_1.forward(x)?)?)
    }
}

/// Writes the 1D sin-cos embedding `[sin(pos·ω) | cos(pos·ω)]` of `dim = row.len()` columns,
/// `ω_i = 1/10000^(i/(dim/2))`, in f64.
fn sincos_1d_into(dim: usize, pos: f64, row: &mut [f64]) {
    let half = dim / 2;
    for i in 0..half {
        let omega = 1.0 / 10000f64.powf(i as f64 / half as f64);
        let (s, c) = (pos * omega).sin_cos();
        row[i] = s;
        row[half + i] = c;
    }
}

/// diffusers' `get_3d_sincos_pos_embed(embed_dim, (grid_w, grid_h), frames, s_scale, t_scale)`,
/// flattened to `[frames·grid_h·grid_w, embed_dim]` (rows in (t, h, w) order) and cast to f32.
///
/// Columns: `[temporal embed_dim/4 | spatial 3·embed_dim/4]`; the spatial part is
/// `[1D embedding of the w coordinate | 1D embedding of the h coordinate]` (diffusers' variable
/// `emb_h` takes the W grid). Positions are float32 `arange(n)/scale`, frequencies float64.
pub fn sincos_pos_embed_3d(
    embed_dim: usize,
    grid_h: usize,
    grid_w: usize,
    frames: usize,
    spatial_interpolation_scale: f64,
    temporal_interpolation_scale: f64,
    dev: &Device,
) -> Result<Tensor> {
    if !embed_dim.is_multiple_of(16) {
        // 3/4 of it is split in two halves of sin|cos pairs, and 1/4 into sin|cos
        candle_core::bail!("3D sin-cos positions need embed_dim divisible by 16, got {embed_dim}")
    }
    let d_t = embed_dim / 4;
    let d_s = embed_dim - d_t;
    let s_scale = spatial_interpolation_scale as f32;
    let t_scale = temporal_interpolation_scale as f32;
    let n = frames * grid_h * grid_w;
    let mut out = vec![0f32; n * embed_dim];
    let mut row = vec![0f64; embed_dim];
    for t in 0..frames {
        let pt = (t as f32 / t_scale) as f64;
        sincos_1d_into(d_t, pt, &mut row[..d_t]);
        for h in 0..grid_h {
            let ph = (h as f32 / s_scale) as f64;
            for w in 0..grid_w {
                let pw = (w as f32 / s_scale) as f64;
                sincos_1d_into(d_s / 2, pw, &mut row[d_t..d_t + d_s / 2]);
                sincos_1d_into(d_s / 2, ph, &mut row[d_t + d_s / 2..]);
                let r = (t * grid_h + h) * grid_w + w;
                for (o, &v) in out[r * embed_dim..(r + 1) * embed_dim].iter_mut().zip(&row) {
                    *o = v as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, (n, embed_dim), dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_layout() -> Result<()> {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu)?;
        let e: Vec<Vec<f32>> = timestep_embedding(&t, 8, true, 0.0, 10000.0)?.to_vec2()?;
        // t = 0: cos part 1, sin part 0
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // t = 10, i = 1: frequency 10000^(-1/4) = 0.1
        assert!((e[1][1] - (1.0f64).cos() as f32).abs() < 1e-6);
        assert!((e[1][5] - (1.0f64).sin() as f32).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn sincos_3d_layout() -> Result<()> {
        // D = 16: temporal 4 columns, w part 6, h part 6
        let e: Vec<Vec<f32>> =
            sincos_pos_embed_3d(16, 2, 3, 2, 1.0, 1.0, &Device::Cpu)?.to_vec2()?;
        assert_eq!(e.len(), 12);
        let r = &e[6 + 3 + 2]; // t = 1, h = 1, w = 2
        assert_eq!(r[0], 1f32.sin()); // temporal sin, ω0 = 1
        assert_eq!(r[2], 1f32.cos());
        assert_eq!(r[4], 2f32.sin()); // w part first
        assert_eq!(r[7], 2f32.cos());
        assert_eq!(r[10], 1f32.sin()); // then h
        Ok(())
    }
}
