//! State and tensor arithmetic shared by the schedulers.
//!
//! Precision follows torch's type promotion: a step coefficient is a 0-dim tensor in the table's dtype
//! (f32 or f64); multiplying it into the sample rounds it to the sample's dtype first, then each
//! tensor op rounds once. [`scale`] and [`div_scalar`] do exactly that with candle ops
//! (`affine(c, 0)` is `v * c` in the sample dtype; division is a true division, not a reciprocal).

use crate::config::{PredictionType, TimestepSpacing, X0Clamp};
use crate::schedule::{diffusers_timesteps, with_dtype, NoiseTable, Real, TableDType};
use crate::NoiseSource;
use candle_core::{DType, Tensor};
use std::path::PathBuf;
use vdit_core::{Error, Result};

/// What every scheduler holds: its table and the current inference timesteps.
#[derive(Clone, Debug)]
pub(crate) struct Base {
    pub class: &'static str,
    /// The config file (or `<Class config>`), for messages.
    pub file: PathBuf,
    pub table: NoiseTable,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub timesteps: Vec<usize>,
    pub num_inference_steps: Option<usize>,
}

impl Base {
    pub fn num_train(&self) -> usize {
        self.table.alphas_cumprod.len()
    }

    /// diffusers' `set_timesteps(n)`, validated. A spurious trailing `-1` (numpy's float `arange`
    /// gives N+1 trailing timesteps for some N, e.g. 61 of 1000) is dropped with a warning: diffusers
    /// would run an extra step at t = -1, i.e. at ᾱ[T-1].
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.num_train();
        if n == 0 || n > t {
            return Err(Error::invalid(
                "num_inference_steps",
                format!(
                    "{n} is outside 1..={t} ({}: num_train_timesteps = {t})",
                    self.class
                ),
            ));
        }
        let raw = diffusers_timesteps(self.spacing, t, n, self.steps_offset);
        let mut ts = Vec::with_capacity(raw.len());
        for v in raw {
            if v < 0 {
                tracing::warn!(
                    class = self.class,
                    num_inference_steps = n,
                    "dropping the spurious trailing timestep -1 that diffusers' trailing spacing yields for this N"
                );
                continue;
            }
            if v as usize >= t {
                return Err(Error::config(
                    &self.file,
                    "steps_offset",
                    format!(
                        "{} with {n} leading-spaced steps gives timestep {v}, past num_train_timesteps {t}",
                        self.steps_offset
                    ),
                ));
            }
            ts.push(v as usize);
        }
        self.timesteps = ts;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// The `n` of the last `set_timesteps`, or an error if it was never called.
    pub fn n(&self) -> Result<usize> {
        self.num_inference_steps
            .ok_or_else(|| Error::Msg(format!("{}: call set_timesteps before step", self.class)))
    }

    pub fn check_t(&self, t: usize) -> Result<()> {
        let n = self.num_train();
        if t >= n {
            return Err(Error::invalid(
                "timestep",
                format!("{t} is outside 0..{n} ({})", self.class),
            ));
        }
        Ok(())
    }

    pub fn ac(&self, t: usize) -> f64 {
        self.table.alphas_cumprod[t]
    }

    /// diffusers' `prev_timestep = t - num_train_timesteps // num_inference_steps` (DDIM, DPM), with ᾱ
    /// there or `final_alpha_cumprod` when it is negative.
    pub fn ddim_prev(&self, t: usize, final_alpha_cumprod: f64) -> Result<(i64, f64)> {
        let n = self.n()?;
        let prev = t as i64 - (self.num_train() / n) as i64;
        let a_prev = if prev >= 0 {
            self.ac(prev as usize)
        } else {
            final_alpha_cumprod
        };
        Ok((prev, a_prev))
    }
}

/// `c * x` with `c` rounded to `x`'s dtype first (torch: 0-dim f64 tensor times an f32 tensor).
pub(crate) fn scale(x: &Tensor, c: f64) -> Result<Tensor> {
    Ok(x.affine(c, 0.0)?)
}

/// `x / c` as a true division in `x`'s dtype.
pub(crate) fn div_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

pub(crate) fn check_same_shape(name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(
            name,
            format!(
                "shape {:?} does not match the sample's {:?}",
                a.dims(),
                b.dims()
            ),
        ));
    }
    Ok(())
}

/// One noise draw shaped like `like`, in its dtype and on its device.
pub(crate) fn draw_noise(noise: &mut dyn NoiseSource, like: &Tensor) -> Result<Tensor> {
    let z = noise.randn(like.dims(), like.device())?;
    if z.dims() != like.dims() {
        return Err(Error::invalid(
            "noise",
            format!(
                "the noise source returned shape {:?}, {:?} was requested",
                z.dims(),
                like.dims()
            ),
        ));
    }
    Ok(z.to_dtype(like.dtype())?.to_device(like.device())?)
}

/// √ᾱ and √(1−ᾱ) in the table dtype `T`.
fn sqrt_ab<T: Real>(a: f64) -> (f64, f64) {
    let a = T::of(a);
    (a.sqrt().f64(), (T::of(1.0) - a).sqrt().f64())
}

/// x̂₀ from the model output (the same formulas in all four diffusers schedulers).
pub(crate) fn pred_x0(
    pt: PredictionType,
    dtype: TableDType,
    sample: &Tensor,
    model_output: &Tensor,
    a_t: f64,
) -> Result<Tensor> {
    let (sa, sb) = with_dtype!(dtype, T => sqrt_ab::<T>(a_t));
    match pt {
        PredictionType::Epsilon => div_scalar(&(sample - scale(model_output, sb)?)?, sa),
        PredictionType::VPrediction => Ok((scale(sample, sa)? - scale(model_output, sb)?)?),
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// ε̂ as plain DDIM computes it, from the unclipped x̂₀.
pub(crate) fn pred_eps(
    pt: PredictionType,
    dtype: TableDType,
    sample: &Tensor,
    model_output: &Tensor,
    x0: &Tensor,
    a_t: f64,
) -> Result<Tensor> {
    let (sa, sb) = with_dtype!(dtype, T => sqrt_ab::<T>(a_t));
    match pt {
        PredictionType::Epsilon => Ok(model_output.clone()),
        PredictionType::Sample => div_scalar(&(sample - scale(x0, sa)?)?, sb),
        PredictionType::VPrediction => Ok((scale(model_output, sa)? + scale(sample, sb)?)?),
    }
}

/// √ᾱ and √(1−ᾱ) as diffusers' `add_noise` / `get_velocity` compute them: the table is first cast to
/// the sample's dtype (f64 samples stay f64, anything else is computed in f32).
fn forward_coeffs(table: &NoiseTable, x: &Tensor, t: usize) -> Result<(f64, f64)> {
    let n = table.alphas_cumprod.len();
    if t >= n {
        return Err(Error::invalid("timestep", format!("{t} is outside 0..{n}")));
    }
    let a = table.alphas_cumprod[t];
    Ok(if x.dtype() == DType::F64 {
        sqrt_ab::<f64>(a)
    } else {
        sqrt_ab::<f32>(a)
    })
}

/// q(x_t | x₀): √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.
pub(crate) fn add_noise(
    table: &NoiseTable,
    x0: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<Tensor> {
    check_same_shape("noise", noise, x0)?;
    let (sa, sb) = forward_coeffs(table, x0, t)?;
    Ok((scale(x0, sa)? + scale(&noise.to_dtype(x0.dtype())?, sb)?)?)
}

/// v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀.
pub(crate) fn velocity(
    table: &NoiseTable,
    x0: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<Tensor> {
    check_same_shape("noise", noise, x0)?;
    let (sa, sb) = forward_coeffs(table, x0, t)?;
    Ok((scale(&noise.to_dtype(x0.dtype())?, sa)? - scale(x0, sb)?)?)
}

/// diffusers' x̂₀ post-processing: dynamic thresholding if enabled, else clipping if enabled.
pub(crate) fn clamp_x0(x0: Tensor, c: &X0Clamp) -> Result<Tensor> {
    if c.thresholding {
        threshold_sample(&x0, c.dynamic_thresholding_ratio, c.sample_max_value)
    } else if c.clip_sample {
        let r = c.clip_sample_range;
        Ok(x0.clamp(-r, r)?)
    } else {
        Ok(x0)
    }
}

/// Dynamic thresholding (Imagen, Saharia et al. 2022): per batch item, s = quantile(|x|, ratio)
/// clamped to [1, sample_max_value]; x ← clamp(x, −s, s)/s. Computed on the CPU in f32 (f64 for f64
/// input) like diffusers, with torch.quantile's linear interpolation.
fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    fn rows<T: Real + candle_core::WithDType>(
        data: &[T],
        b: usize,
        ratio: f64,
        max_value: f64,
    ) -> Vec<T> {
        let per = data.len() / b.max(1);
        let mut out = Vec::with_capacity(data.len());
        for row in data.chunks(per.max(1)) {
            let mut sorted: Vec<T> = row
                .iter()
                .map(|&v| if v < T::of(0.0) { -v } else { v })
                .collect();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            // torch.quantile: rank = q*(n-1) in the input dtype; lerp between floor and ceil.
            let rank = T::of(ratio) * T::of((per - 1) as f64);
            let lo_i = rank.f64().floor() as usize;
            let hi_i = (rank.f64().ceil() as usize).min(per - 1);
            let w = rank - T::of(lo_i as f64);
            let (lo, hi) = (sorted[lo_i], sorted[hi_i]);
            let q = if w.f64().abs() < 0.5 {
                w.fma(hi - lo, lo)
            } else {
                (-(hi - lo)).fma(T::of(1.0) - w, hi)
            };
            // torch.clamp(s, min=1, max=sample_max_value) = min(max(s, 1), max_value)
            let one = T::of(1.0);
            let q = if q < one { one } else { q };
            let s = if q > T::of(max_value) {
                T::of(max_value)
            } else {
                q
            };
            out.extend(row.iter().map(|&v| {
                let c = if v < -s { -s } else { v };
                let c = if c > s { s } else { c };
                c / s
            }));
        }
        out
    }
    let dims = x.dims().to_vec();
    let b = dims.first().copied().unwrap_or(1);
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let flat = x.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    let y = if x.dtype() == DType::F64 {
        let v = rows(&flat.to_vec1::<f64>()?, b, ratio, max_value);
        Tensor::from_vec(v, dims.as_slice(), &candle_core::Device::Cpu)?
    } else {
        let v = rows(
            &flat.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            b,
            ratio,
            max_value,
        );
        Tensor::from_vec(v, dims.as_slice(), &candle_core::Device::Cpu)?
    };
    Ok(y.to_dtype(x.dtype())?.to_device(x.device())?)
}
