//! Channels-last activations of one sample, and the element-wise pieces of the causal VAE that
//! are not convolutions: GroupNorm statistics, SiLU, nearest-neighbour index maps, temporal
//! average pooling, residual adds.
//!
//! The VAE processes each batch element on its own (every operation in it is per sample), so a
//! [`Video`] holds one sample as `[T, H, W, C]` (channels last, contiguous). Channels last lets a
//! 3x3x3 convolution read its input without an im2col copy (see [`super::conv3d`]).

use candle_core::{DType, Device, IndexOp, Tensor};
use rayon::prelude::*;

/// One sample's activations, `data[((t * h + y) * w + x) * c + ch]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Video {
    /// Wraps `data` (length `t*h*w*c`, channels last).
    pub fn new(t: usize, h: usize, w: usize, c: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), t * h * w * c, "Video::new: data length");
        Self { t, h, w, c, data }
    }

    pub fn zeros(t: usize, h: usize, w: usize, c: usize) -> Self {
        Self::new(t, h, w, c, vec![0.0; t * h * w * c])
    }

    /// Elements per frame (`h*w*c`).
    pub fn frame_len(&self) -> usize {
        self.h * self.w * self.c
    }

    pub fn frame(&self, t: usize) -> &[f32] {
        let n = self.frame_len();
        &self.data[t * n..(t + 1) * n]
    }

    /// A copy of frames `start..end`.
    pub fn frames(&self, start: usize, end: usize) -> Video {
        let n = self.frame_len();
        Video::new(
            end - start,
            self.h,
            self.w,
            self.c,
            self.data[start * n..end * n].to_vec(),
        )
    }

    /// A copy of the spatial window rows `y0..y1`, columns `x0..x1` of every frame.
    pub fn crop(&self, y0: usize, y1: usize, x0: usize, x1: usize) -> Video {
        let (hh, ww) = (y1 - y0, x1 - x0);
        let mut data = Vec::with_capacity(self.t * hh * ww * self.c);
        for t in 0..self.t {
            for y in y0..y1 {
                let row = ((t * self.h + y) * self.w) * self.c;
                data.extend_from_slice(&self.data[row + x0 * self.c..row + x1 * self.c]);
            }
        }
        Video::new(self.t, hh, ww, self.c, data)
    }

    /// Frames of several clips with equal `h, w, c`, one after another in time.
    pub fn cat_time(parts: &[Video]) -> Video {
        let first = &parts[0];
        let t = parts.iter().map(|p| p.t).sum();
        let mut data = Vec::with_capacity(t * first.frame_len());
        for p in parts {
            assert_eq!(
                (p.h, p.w, p.c),
                (first.h, first.w, first.c),
                "cat_time: sizes"
            );
            data.extend_from_slice(&p.data);
        }
        Video::new(t, first.h, first.w, first.c, data)
    }

    /// Sample `b` of a `[B, C, T, H, W]` tensor (any dtype/device), as f32 channels last.
    pub fn from_ncthw(x: &Tensor, b: usize) -> candle_core::Result<Video> {
        let (_, c, t, h, w) = x.dims5()?;
        // [C, T, H, W] -> [T, H, W, C]
        let data = x
            .i(b)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .permute((1, 2, 3, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Video::new(t, h, w, c, data))
    }

    /// The channels-first copy `[C, T, H, W]`.
    pub fn to_cthw(&self) -> Vec<f32> {
        let (t, h, w, c) = (self.t, self.h, self.w, self.c);
        let plane = t * h * w;
        let mut out = vec![0.0f32; c * plane];
        for (p, px) in self.data.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * plane + p] = v;
            }
        }
        out
    }
}

/// Source index of output index `dst` for nearest-neighbour resizing from `in_size` to
/// `out_size`, computed as PyTorch's CPU kernel does (`floor(dst * (in/out))` in f32, clamped).
pub fn nearest_index(dst: usize, in_size: usize, out_size: usize) -> usize {
    if in_size == out_size {
        dst
    } else if out_size == 2 * in_size {
        dst >> 1
    } else {
        let scale = in_size as f32 / out_size as f32;
        ((dst as f32 * scale).floor() as usize).min(in_size.saturating_sub(1))
    }
}

/// The index map of a nearest resize, one source index per output index.
pub fn nearest_map(in_size: usize, out_size: usize) -> Vec<usize> {
    (0..out_size)
        .map(|i| nearest_index(i, in_size, out_size))
        .collect()
}

/// GroupNorm over a whole clip (statistics over `T, H, W` and the channels of each group, as
/// `nn.GroupNorm` on `[1, C, T, H, W]`), folded into a per-channel affine `x * scale + shift`
/// exactly as PyTorch's kernel applies it (`scale = rstd * gamma`, `shift = beta - scale * mean`).
pub fn group_norm_affine(
    x: &Video,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let c = x.c;
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "group_norm: {c} channels, {groups} groups"
    );
    // Per-channel sums in f64, per frame in parallel, then reduced.
    let zero = || (vec![0f64; c], vec![0f64; c]);
    let (s, q) = x
        .data
        .par_chunks(x.frame_len().max(1))
        .fold(zero, |(mut s, mut q), frame| {
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                #[allow(unsafe_code)]
                unsafe {
                    channel_sums_avx2(frame, &mut s, &mut q)
                }
            } else {
                channel_sums(frame, &mut s, &mut q)
            }
            (s, q)
        })
        .reduce(zero, |(mut s, mut q), (s2, q2)| {
            s.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
            q.iter_mut().zip(&q2).for_each(|(a, b)| *a += b);
            (s, q)
        });
    let cg = c / groups;
    let n = (x.t * x.h * x.w * cg) as f64;
    let mut scale = vec![0f32; c];
    let mut shift = vec![0f32; c];
    for g in 0..groups {
        let sum: f64 = s[g * cg..(g + 1) * cg].iter().sum();
        let sq: f64 = q[g * cg..(g + 1) * cg].iter().sum();
        let mean = sum / n;
        let var = (sq / n - mean * mean).max(0.0);
        let mean = mean as f32;
        let rstd = (1.0 / (var + eps).sqrt()) as f32;
        for ch in g * cg..(g + 1) * cg {
            scale[ch] = rstd * gamma[ch];
            shift[ch] = -scale[ch] * mean + beta[ch];
        }
    }
    (scale, shift)
}

/// Adds each channel's sum and sum of squares (in f64) of the channels-last `data` to `s`, `q`.
#[inline(always)]
fn channel_sums(data: &[f32], s: &mut [f64], q: &mut [f64]) {
    let c = s.len();
    for px in data.chunks_exact(c) {
        for ((si, qi), &v) in s.iter_mut().zip(q.iter_mut()).zip(px) {
            let v = v as f64;
            *si += v;
            *qi += v * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn channel_sums_avx2(data: &[f32], s: &mut [f64], q: &mut [f64]) {
    channel_sums(data, s, q)
}

#[cfg(not(target_arch = "x86_64"))]
fn channel_sums_avx2(data: &[f32], s: &mut [f64], q: &mut [f64]) {
    channel_sums(data, s, q)
}

/// Whether the hot loops can run their AVX2 + FMA builds (the crate's baseline is SSE2, so
/// element-wise loops vectorise only 4-wide otherwise). FMA is enabled for those builds only;
/// no loop asks for fused multiply-adds (Rust never contracts `a * b + c`), so results are
/// bit-identical either way.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `exp(x)` in f32 without a libm call, so loops over it vectorise: Cody-Waite range reduction
/// and a degree-6 polynomial (Cephes `expf`), within 2 ulp of the true value on [-87, 88].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // round-to-nearest of x*log2(e) via the 1.5*2^23 trick; `n` is exact.
    let t = x * LOG2E + 12_582_912.0;
    let n = t.to_bits() as i32 - 0x4B40_0000;
    let nf = n as f32;
    let r = x - nf * C1 - nf * C2;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// SiLU as PyTorch computes it on the CPU: `x / (1 + exp(-x))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// CogVideoX's temporal compression (`CogVideoXDownsample3D` with `compress_time`):
/// `avg_pool1d(2)` over time, with frame 0 kept alone when the frame count is odd.
pub fn time_avg_pool(x: &Video) -> Video {
    let n = x.frame_len();
    let keep_first = x.t % 2 == 1;
    let rest = if keep_first { x.t - 1 } else { x.t };
    let mut data = Vec::with_capacity((keep_first as usize + rest / 2) * n);
    if keep_first {
        data.extend_from_slice(x.frame(0));
    }
    let off = keep_first as usize;
    for j in 0..rest / 2 {
        let (a, b) = (x.frame(off + 2 * j), x.frame(off + 2 * j + 1));
        data.extend(a.iter().zip(b).map(|(p, q)| (p + q) / 2.0));
    }
    Video::new(data.len() / n.max(1), x.h, x.w, x.c, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_silu_match_f64() {
        let mut worst_exp = 0f64;
        let mut worst_silu = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(x) as f64) - want).abs() / want);
            let s = x as f64 / (1.0 + (-x as f64).exp());
            if s.abs() > 1e-30 {
                worst_silu = worst_silu.max(((silu(x) as f64) - s).abs() / s.abs());
            }
            x += 0.001_3;
        }
        assert!(worst_exp < 3e-7, "exp rel err {worst_exp}");
        assert!(worst_silu < 4e-7, "silu rel err {worst_silu}");
        assert_eq!(silu(-200.0), -0.0);
        assert_eq!(silu(200.0), 200.0);
    }

    #[test]
    fn nearest_matches_torch_rule() {
        assert_eq!(nearest_map(3, 6), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(nearest_map(2, 8), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(nearest_map(4, 4), vec![0, 1, 2, 3]);
        // 3 -> 5: floor(i * 0.6)
        assert_eq!(nearest_map(3, 5), vec![0, 0, 1, 1, 2]);
    }

    #[test]
    fn time_pool_odd_and_even() {
        let v = Video::new(3, 1, 1, 1, vec![1.0, 2.0, 4.0]);
        assert_eq!(time_avg_pool(&v).data, vec![1.0, 3.0]);
        let v = Video::new(4, 1, 1, 1, vec![1.0, 2.0, 4.0, 8.0]);
        assert_eq!(time_avg_pool(&v).data, vec![1.5, 6.0]);
        let v = Video::new(1, 1, 1, 1, vec![5.0]);
        assert_eq!(time_avg_pool(&v).data, vec![5.0]);
    }
}
