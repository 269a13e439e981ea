//! 3D rotary position tables (diffusers' `get_3d_rotary_pos_embed`, `use_real=True`,
//! `repeat_interleave_real=True`) and their application to `[.., N, .., head_dim]` tensors.
//!
//! The table for a `T × H × W` token grid is `(cos, sin)`, each `[T·H·W, head_dim]`, rows in
//! (t, h, w) order; columns are `[t part d/4 | h part 3d/8 | w part 3d/8]`, each part holding
//! `cos(pos·ωᵢ)` twice in a row (pairs `(x[2i], x[2i+1])` rotate together). Arithmetic follows
//! torch in float32 (positions, frequencies and their product), with `sin`/`cos` correctly rounded.

use candle_core::{DType, Device, Result, Tensor, D};

/// Positions along each axis of the grid.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeGrid {
    /// CogVideoX 1.0: `linspace(start, stop·(n−1)/n, n)` over a crop region of the base grid
    /// for H and W, and `linspace(0, T·(T−1)/T, T)` for time.
    Linspace {
        /// `((top, left), (bottom, right))` from `get_resize_crop_region_for_grid`.
        crop: ((i64, i64), (i64, i64)),
        grid_h: usize,
        grid_w: usize,
        frames: usize,
    },
    /// CogVideoX 1.5: plain `arange` positions; the first `grid_h`/`grid_w` of `max_h`/`max_w`.
    Slice {
        max_h: usize,
        max_w: usize,
        grid_h: usize,
        grid_w: usize,
        frames: usize,
    },
}

/// torch's float32 `linspace` on CPU: `start + i·step` for the first half and
/// `end − (n−1−i)·step` for the second.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `(cos, sin)` of diffusers' `get_1d_rotary_pos_embed(dim, pos, theta, use_real=True)`, each
/// `[len(pos), dim]`, row-major.
fn rope_1d(dim: usize, pos: &[f32], theta: f64) -> (Vec<f32>, Vec<f32>) {
    // freqs = 1 / theta^(arange(0, dim, 2) / dim), float32
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            let p = theta.powf(e as f64) as f32;
            1.0 / p
        })
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * dim);
    let mut sin = Vec::with_capacity(pos.len() * dim);
    for &p in pos {
        for &f in &freqs {
            let a = (p * f) as f64;
            let (s, c) = a.sin_cos();
            cos.extend([c as f32, c as f32]);
            sin.extend([s as f32, s as f32]);
        }
    }
    (cos, sin)
}

/// The `(cos, sin)` tables, each `[T·H·W, head_dim]` f32 on `dev`.
pub fn rotary_pos_embed_3d(
    head_dim: usize,
    grid: &RopeGrid,
    theta: f64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    if !head_dim.is_multiple_of(8) || head_dim == 0 {
        candle_core::bail!("3D RoPE needs a head dimension divisible by 8, got {head_dim}")
    }
    let (pos_t, pos_h, pos_w, t, gh, gw) = match *grid {
        RopeGrid::Linspace {
            crop: ((top, left), (bottom, right)),
            grid_h,
            grid_w,
            frames,
        } => {
            let lin = |start: i64, stop: i64, n: usize| {
                linspace_f32(start as f64, stop as f64 * (n as f64 - 1.0) / n as f64, n)
            };
            let pt = linspace_f32(
                0.0,
                frames as f64 * (frames as f64 - 1.0) / frames as f64,
                frames,
            );
            (
                pt,
                lin(top, bottom, grid_h),
                lin(left, right, grid_w),
                frames,
                grid_h,
                grid_w,
            )
        }
        RopeGrid::Slice {
            max_h,
            max_w,
            grid_h,
            grid_w,
            frames,
        } => {
            if grid_h > max_h || grid_w > max_w {
                candle_core::bail!(
                    "RoPE grid {grid_h}x{grid_w} exceeds the model's base grid {max_h}x{max_w} (sample_height/width over patch_size)"
                )
            }
            let ar = |n: usize| (0..n).map(|i| i as f32).collect::<Vec<_>>();
            (ar(frames), ar(grid_h), ar(grid_w), frames, grid_h, grid_w)
        }
    };
    let (dt, dh, dw) = (head_dim / 4, head_dim / 8 * 3, head_dim / 8 * 3);
    let (tc, ts) = rope_1d(dt, &pos_t, theta);
    let (hc, hs) = rope_1d(dh, &pos_h, theta);
    let (wc, ws) = rope_1d(dw, &pos_w, theta);
    let n = t * gh * gw;
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    for ti in 0..t {
        for hi in 0..gh {
            for wi in 0..gw {
                cos.extend_from_slice(&tc[ti * dt..(ti + 1) * dt]);
                cos.extend_from_slice(&hc[hi * dh..(hi + 1) * dh]);
                cos.extend_from_slice(&wc[wi * dw..(wi + 1) * dw]);
                sin.extend_from_slice(&ts[ti * dt..(ti + 1) * dt]);
                sin.extend_from_slice(&hs[hi * dh..(hi + 1) * dh]);
                sin.extend_from_slice(&ws[wi * dw..(wi + 1) * dw]);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, head_dim), dev)?,
        Tensor::from_vec(sin, (n, head_dim), dev)?,
    ))
}

/// `x·cos + rot(x)·sin` with `rot(x)[2i] = −x[2i+1]`, `rot(x)[2i+1] = x[2i]`, in f32, for
/// `x [B, N, H, dh]` and `cos, sin [N, dh]` (candle ops; any device; differentiable).
pub fn apply_rope_candle(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, n, h, dh) = x.dims4()?;
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let pairs = xf.reshape((b, n, h, dh / 2, 2))?; // [B, N, H, dh/2, 2]
    let re = pairs.narrow(D::Minus1, 0, 1)?;
    let im = pairs.narrow(D::Minus1, 1, 1)?;
    let rot = Tensor::cat(&[im.neg()?, re], D::Minus1)?.reshape((b, n, h, dh))?; // [B, N, H, dh]
    let cos = cos.to_dtype(DType::F32)?.reshape((1, n, 1, dh))?;
    let sin = sin.to_dtype(DType::F32)?.reshape((1, n, 1, dh))?;
    xf.broadcast_mul(&cos)?
        .add(&rot.broadcast_mul(&sin)?)?
        .to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_halves() {
        let v = linspace_f32(0.0, 29.0, 30);
        assert_eq!(v, (0..30).map(|i| i as f32).collect::<Vec<_>>());
        let v = linspace_f32(1.0, 4.5 * 3.0 / 4.0, 4);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[3], (4.5f64 * 3.0 / 4.0) as f32);
    }

    #[test]
    fn table_layout_and_rotation() -> Result<()> {
        let dev = Device::Cpu;
        let grid = RopeGrid::Slice {
            max_h: 4,
            max_w: 4,
            grid_h: 2,
            grid_w: 3,
            frames: 2,
        };
        let (c, s) = rotary_pos_embed_3d(16, &grid, 10000.0, &dev)?;
        assert_eq!(c.dims(), &[12, 16]);
        // token (t=1, h=1, w=2) is row 1·6 + 1·3 + 2 = 11; its t part uses position 1, h part 1, w part 2
        let row: Vec<f32> = c.get(11)?.to_vec1()?;
        assert!((row[0] - 1f32.cos()).abs() < 1e-7 && row[0] == row[1]);
        assert!((row[4] - 1f32.cos()).abs() < 1e-7);
        assert!((row[10] - 2f32.cos()).abs() < 1e-7);
        // rotation of (1, 0) pairs by the angle gives (cos, sin)
        let x = Tensor::from_vec([1f32, 0.0].repeat(8 * 12), (1, 12, 1, 16), &dev)?;
        let y = apply_rope_candle(&x, &c, &s)?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let sv: Vec<f32> = s.flatten_all()?.to_vec1()?;
        let cv: Vec<f32> = c.flatten_all()?.to_vec1()?;
        for i in (0..y.len()).step_by(2) {
            assert!((y[i] - cv[i]).abs() < 1e-7 && (y[i + 1] - sv[i + 1]).abs() < 1e-7);
        }
        Ok(())
    }
}
