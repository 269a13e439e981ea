//! Noise-schedule tables (betas, ᾱ) and timestep spacings, shared by every scheduler.
//!
//! Everything here reproduces diffusers 0.42 bit for bit, which means following torch's dtypes:
//! - `scaled_linear` betas are float64 in the CogVideoX schedulers, float32 everywhere else;
//!   `linear`, `squaredcos_cap_v2`, `sigmoid`, `laplace` and `trained_betas` are float32.
//!   The whole table (ᾱ, SNR shift, zero-terminal-SNR rescale) and the per-step coefficients are then
//!   computed in that dtype, so the arithmetic here is generic over [`Real`] (f32 or f64).
//! - `torch.linspace` evaluates `start + step*i` (first half) and `end - step*(n-1-i)` (second half)
//!   as fused multiply-adds; `torch.cumprod` accumulates float32 in float64.
//! - Timesteps use numpy's rounding (`np.round`, half to even) and `np.arange` with a float step.
//!
//! Tables are stored widened to f64 (exact for f32 tables) together with their [`TableDType`].

use crate::config::{BetaSchedule, TimestepSpacing};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// The floating-point types diffusers' schedule arithmetic runs in (torch float32 / float64 on CPU).
pub trait Real:
    Copy
    + PartialOrd
    + std::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// Rounds to nearest (exact for values already representable).
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    fn exp(self) -> Self;
    fn exp_m1(self) -> Self;
    /// `self * a + b` with one rounding (what torch's compiled kernels produce).
    fn fma(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn exp_m1(self) -> Self {
                <$t>::exp_m1(self)
            }
            fn fma(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// The dtype diffusers keeps a scheduler's tables in (and computes its step coefficients in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableDType {
    F32,
    F64,
}

/// Runs `$body` with `$T` bound to the Rust float type of a [`TableDType`].
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::schedule::TableDType::F32 => {
                type $T = f32;
                $body
            }
            $crate::schedule::TableDType::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// A scheduler's noise table: `betas` and `alphas_cumprod` (ᾱ) as diffusers holds them, widened to f64.
#[derive(Clone, Debug)]
pub struct NoiseTable {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub dtype: TableDType,
}

impl NoiseTable {
    fn from_parts<T: Real>(betas: &[T], alphas_cumprod: &[T], dtype: TableDType) -> Self {
        Self {
            betas: betas.iter().map(|v| v.f64()).collect(),
            alphas_cumprod: alphas_cumprod.iter().map(|v| v.f64()).collect(),
            dtype,
        }
    }
}

/// Where the betas come from.
#[derive(Clone, Copy, Debug)]
pub struct BetaSpec<'a> {
    pub schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub num_train_timesteps: usize,
    pub trained_betas: Option<&'a [f64]>,
}

/// `torch.linspace(start, end, n)` in the dtype `T`.
pub fn torch_linspace<T: Real>(start: f64, end: f64, n: usize) -> Vec<T> {
    let (start, end) = (T::of(start), T::of(end));
    if n <= 1 {
        return vec![start; n];
    }
    let step = (end - start) / T::of((n - 1) as f64);
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.fma(T::of(i as f64), start)
            } else {
                (-step).fma(T::of((n - 1 - i) as f64), end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (Python floats, then a float32 tensor), max_beta 0.999.
fn betas_for_alpha_bar(n: usize, laplace: bool) -> Vec<f32> {
    let alpha_bar = |t: f64| -> f64 {
        if laplace {
            let lmb = -0.5 * (1.0f64).copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
            let snr = lmb.exp();
            (snr / (1.0 + snr)).sqrt()
        } else {
            let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
            c * c
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The dtype of the betas for `schedule`: only the CogVideoX schedulers' `scaled_linear` is float64.
pub fn betas_dtype(spec: &BetaSpec, cogvideox: bool) -> TableDType {
    if cogvideox && spec.trained_betas.is_none() && spec.schedule == BetaSchedule::ScaledLinear {
        TableDType::F64
    } else {
        TableDType::F32
    }
}

/// The initial betas, in `T` (the caller picks `T` with [`betas_dtype`]).
fn base_betas<T: Real>(spec: &BetaSpec) -> Vec<T> {
    let n = spec.num_train_timesteps;
    if let Some(tb) = spec.trained_betas {
        return tb.iter().map(|&b| T::of(b as f32 as f64)).collect();
    }
    match spec.schedule {
        BetaSchedule::Linear => torch_linspace::<T>(spec.beta_start, spec.beta_end, n),
        BetaSchedule::ScaledLinear => {
            torch_linspace::<T>(spec.beta_start.sqrt(), spec.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, false)
            .into_iter()
            .map(|b| T::of(b as f64))
            .collect(),
        BetaSchedule::Laplace => betas_for_alpha_bar(n, true)
            .into_iter()
            .map(|b| T::of(b as f64))
            .collect(),
        BetaSchedule::Sigmoid => {
            // torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start, in float32.
            let range = T::of(spec.beta_end - spec.beta_start);
            let start = T::of(spec.beta_start);
            torch_linspace::<T>(-6.0, 6.0, n)
                .into_iter()
                .map(|x| T::of(1.0) / (T::of(1.0) + (-x).exp()) * range + start)
                .collect()
        }
    }
}

/// `torch.cumprod` (float32 accumulates in float64, each partial product rounded to the dtype).
fn cumprod<T: Real>(xs: &[T]) -> Vec<T> {
    let mut acc = 1.0f64;
    xs.iter()
        .map(|&x| {
            acc *= x.f64();
            T::of(acc)
        })
        .collect()
}

/// Zero-terminal-SNR rescale of ᾱ (Lin et al. 2023, Algorithm 1): returns the rescaled ᾱ.
fn rescale_alphas_bar<T: Real>(alphas_cumprod: &[T]) -> Vec<T> {
    let mut s: Vec<T> = alphas_cumprod.iter().map(|&a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return Vec::new();
    };
    let scale = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v = *v - st;
    }
    for v in s.iter_mut() {
        *v = *v * scale;
    }
    s.into_iter().map(|v| v * v).collect()
}

/// The CogVideoX schedulers' table: betas, ᾱ, SNR shift `ᾱ/(s+(1-s)ᾱ)`, then (optionally) the
/// zero-terminal-SNR rescale applied to ᾱ directly.
pub fn cogvideox_table(
    spec: &BetaSpec,
    snr_shift_scale: f64,
    rescale_zero_snr: bool,
) -> NoiseTable {
    fn build<T: Real>(spec: &BetaSpec, s: f64, rescale: bool, dtype: TableDType) -> NoiseTable {
        let betas = base_betas::<T>(spec);
        let alphas: Vec<T> = betas.iter().map(|&b| T::of(1.0) - b).collect();
        let ac = cumprod(&alphas);
        let (sh, one_minus) = (T::of(s), T::of(1.0 - s));
        let mut ac: Vec<T> = ac.into_iter().map(|a| a / (sh + one_minus * a)).collect();
        if rescale {
            ac = rescale_alphas_bar(&ac);
        }
        NoiseTable::from_parts(&betas, &ac, dtype)
    }
    let dtype = betas_dtype(spec, true);
    with_dtype!(dtype, T => build::<T>(spec, snr_shift_scale, rescale_zero_snr, dtype))
}

/// The plain DDIM / DDPM table: betas, optionally rescaled to zero terminal SNR (through ᾱ and back
/// to betas, as diffusers does), then ᾱ = cumprod(1 - betas).
pub fn plain_table(spec: &BetaSpec, rescale_zero_snr: bool) -> NoiseTable {
    fn build<T: Real>(spec: &BetaSpec, rescale: bool, dtype: TableDType) -> NoiseTable {
        let one = T::of(1.0);
        let mut betas = base_betas::<T>(spec);
        if rescale {
            let alphas: Vec<T> = betas.iter().map(|&b| one - b).collect();
            let bar = rescale_alphas_bar(&cumprod(&alphas));
            let alphas = bar
                .iter()
                .take(1)
                .copied()
                .chain(bar.windows(2).map(|w| w[1] / w[0]));
            betas = alphas.map(|a| one - a).collect();
        }
        let alphas: Vec<T> = betas.iter().map(|&b| one - b).collect();
        let ac = cumprod(&alphas);
        NoiseTable::from_parts(&betas, &ac, dtype)
    }
    let dtype = betas_dtype(spec, false);
    with_dtype!(dtype, T => build::<T>(spec, rescale_zero_snr, dtype))
}

/// diffusers' `set_timesteps` spacing, exactly as numpy computes it (may hold a spurious trailing `-1`
/// for `trailing`: `np.arange(T, 0, -T/N)` has N+1 elements for some N, e.g. T=1000, N=61).
pub fn diffusers_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let t = num_train_timesteps;
    let round = |v: f64| v.round_ties_even() as i64;
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, T-1, n): i * ((T-1)/(n-1)), the last element set to T-1 exactly.
            if n <= 1 {
                return vec![0; n];
            }
            let step = (t - 1) as f64 / (n - 1) as f64;
            (0..n)
                .rev()
                .map(|i| {
                    if i == n - 1 {
                        (t - 1) as i64
                    } else {
                        round(i as f64 * step)
                    }
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / n.max(1);
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -T/n): length ceil(T/(T/n)); values T, T+step, then T + i*(b1-b0).
            let ratio = t as f64 / n as f64;
            let len = ((t as f64) / ratio).ceil().max(0.0) as usize;
            let b0 = t as f64;
            let b1 = b0 + (-ratio);
            let delta = b1 - b0;
            (0..len)
                .map(|i| match i {
                    0 => b0,
                    1 => b1,
                    _ => b0 + i as f64 * delta,
                })
                .map(|v| round(v) - 1)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_matches_known_values() {
        let ts = diffusers_timesteps(TimestepSpacing::Trailing, 1000, 7, 0);
        assert_eq!(ts, vec![999, 856, 713, 570, 428, 285, 142]);
        // numpy's float arange yields an extra element for N = 61: diffusers' timesteps end in -1.
        let ts = diffusers_timesteps(TimestepSpacing::Trailing, 1000, 61, 0);
        assert_eq!(ts.len(), 62);
        assert_eq!(ts[60..], [15, -1]);
    }

    #[test]
    fn linspace_rounds_half_to_even() {
        // linspace(0, 9, 3) = [0, 4.5, 9] -> np.round(4.5) = 4 (half to even), not 5.
        assert_eq!(
            diffusers_timesteps(TimestepSpacing::Linspace, 10, 3, 0),
            vec![9, 4, 0]
        );
    }

    #[test]
    fn leading_adds_offset() {
        assert_eq!(
            diffusers_timesteps(TimestepSpacing::Leading, 1000, 4, 1),
            vec![751, 501, 251, 1]
        );
    }
}
