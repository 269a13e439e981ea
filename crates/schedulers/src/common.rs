//! State and tensor arithmetic shared by the schedulers.
//!
//! Precision follows torch's type promotion: a step coefficient is a 0-dim tensor in the table's dtype
//! (f32 or f64); multiplying it into the sample rounds it to the sample's dtype first, then each
//! tensor op rounds once. [`scale`] and [`div_scalar`] do exactly that with candle ops
//! (`affine(c, 0)` is `v * c` in the sample dtype; division is a true division, not a reciprocal).

use crate::config::{check_table, PredictionType, Shared, TimestepSpacing, X0Clamp};
use crate::schedule::{
    cogvideox_table, diffusers_timesteps, plain_table, with_dtype, NoiseTable, Real,
};
use crate::{CogVideoXSchedulerConfig, NoiseSource};
use candle_core::{DType, Tensor};
use std::path::PathBuf;
use vdit_core::{Error, Result};

/// What every scheduler holds: its table, the config fields every step reads and the current
/// inference timesteps.
#[derive(Clone, Debug)]
pub(crate) struct Base {
    pub class: &'static str,
    /// The config file (or `<Class config>`), for messages.
    pub file: PathBuf,
    pub table: NoiseTable,
    /// ᾱ past the last step: 1 (`set_alpha_to_one`, and always for DDPM) or ᾱ₀.
    pub final_alpha_cumprod: f64,
    pub prediction_type: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub timesteps: Vec<usize>,
    pub num_inference_steps: Option<usize>,
}

/// Where a step's previous timestep (the one whose ᾱ it steps to) comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Prev {
    /// diffusers' `t - num_train_timesteps // num_inference_steps` (DDIM, DPM).
    Spaced,
    /// The next entry of `timesteps()`, -1 after the last (DDPM).
    Next,
}

/// What every step starts from: ᾱ at `t` and at the previous timestep, and the unclipped x̂₀.
pub(crate) struct StepStart {
    pub a_t: f64,
    /// The previous timestep, negative past the last step.
    pub prev_t: i64,
    pub a_prev: f64,
    /// √ᾱ_t and √(1−ᾱ_t) in the table dtype.
    pub sqrt_ab: (f64, f64),
    pub x0: Tensor,
}

impl Base {
    /// A CogVideoX scheduler's base: validates `cfg`, then builds its SNR-shifted table.
    pub fn cogvideox(
        class: &'static str,
        file: PathBuf,
        cfg: &CogVideoXSchedulerConfig,
    ) -> Result<Self> {
        cfg.validate(&file, class)?;
        let shared = cfg.shared();
        let table = cogvideox_table(
            &shared.betas,
            cfg.snr_shift_scale,
            shared.rescale_betas_zero_snr,
        );
        Self::new(class, file, table, &shared, false, cfg.set_alpha_to_one)
    }

    /// A plain DDIM / DDPM scheduler's base, from a validated config.
    pub fn plain(
        class: &'static str,
        file: PathBuf,
        cfg: &Shared,
        set_alpha_to_one: bool,
    ) -> Result<Self> {
        let rescaled = cfg.rescale_betas_zero_snr;
        let table = plain_table(&cfg.betas, rescaled);
        Self::new(class, file, table, cfg, rescaled, set_alpha_to_one)
    }

    /// Checks the built table (`rescaled`: its betas went through the zero-terminal-SNR rescale);
    /// no timesteps set yet.
    fn new(
        class: &'static str,
        file: PathBuf,
        table: NoiseTable,
        cfg: &Shared,
        rescaled: bool,
        set_alpha_to_one: bool,
    ) -> Result<Self> {
        check_table(
            &file,
            &table.betas,
            cfg.betas.trained_betas.is_some(),
            rescaled,
        )?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            table.alphas_cumprod[0]
        };
        Ok(Self {
            class,
            file,
            table,
            final_alpha_cumprod,
            prediction_type: cfg.prediction_type,
            spacing: cfg.timestep_spacing,
            steps_offset: cfg.steps_offset,
            timesteps: Vec::new(),
            num_inference_steps: None,
        })
    }

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
    fn n(&self) -> Result<usize> {
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

    /// The timestep after `t` in `timesteps()`, or -1 for the last one.
    fn next_timestep(&self, t: usize) -> Result<i64> {
        self.n()?;
        let ts = &self.timesteps;
        let i = ts.iter().position(|&v| v == t).ok_or_else(|| {
            Error::invalid(
                "timestep",
                format!("{t} is not one of {}'s timesteps {ts:?}", self.class),
            )
        })?;
        Ok(ts.get(i + 1).map_or(-1, |&v| v as i64))
    }

    /// The start of a step at `t` (already checked with [`check_t`](Self::check_t)): checks the
    /// model output's shape, finds the previous timestep and ᾱ there (`final_alpha_cumprod` when it
    /// is negative), and x̂₀ from the prediction type.
    pub fn start_step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        prev: Prev,
    ) -> Result<StepStart> {
        check_same_shape("model_output", model_output, sample)?;
        let prev_t = match prev {
            Prev::Spaced => t as i64 - (self.num_train() / self.n()?) as i64,
            Prev::Next => self.next_timestep(t)?,
        };
        let a_t = self.ac(t);
        let a_prev = if prev_t >= 0 {
            self.ac(prev_t as usize)
        } else {
            self.final_alpha_cumprod
        };
        let (sa, sb) = with_dtype!(self.table.dtype, T => sqrt_ab::<T>(a_t));
        // x̂₀ from the model output (the same formulas in all four diffusers schedulers).
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div_scalar(&(sample - scale(model_output, sb)?)?, sa)?,
            PredictionType::VPrediction => (scale(sample, sa)? - scale(model_output, sb)?)?,
            PredictionType::Sample => model_output.clone(),
        };
        Ok(StepStart {
            a_t,
            prev_t,
            a_prev,
            sqrt_ab: (sa, sb),
            x0,
        })
    }

    /// ε̂ as plain DDIM computes it, from the unclipped x̂₀ of `st`.
    pub fn pred_eps(
        &self,
        st: &StepStart,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let (sa, sb) = st.sqrt_ab;
        match self.prediction_type {
            PredictionType::Epsilon => Ok(model_output.clone()),
            PredictionType::Sample => div_scalar(&(sample - scale(&st.x0, sa)?)?, sb),
            PredictionType::VPrediction => Ok((scale(model_output, sa)? + scale(sample, sb)?)?),
        }
    }

    /// q(x_t | x₀): √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        let (sa, sb, noise) = forward_parts(&self.table, x0, noise, t)?;
        Ok((scale(x0, sa)? + scale(&noise, sb)?)?)
    }

    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        let (sa, sb, noise) = forward_parts(&self.table, x0, noise, t)?;
        Ok((scale(&noise, sa)? - scale(x0, sb)?)?)
    }
}

/// `c * x` with `c` rounded to `x`'s dtype first (torch: 0-dim f64 tensor times an f32 tensor).
pub(crate) fn scale(x: &Tensor, c: f64) -> Result<Tensor> {
    Ok(x.affine(c, 0.0)?)
}

/// `x / c` as a true division in `x`'s dtype.
fn div_scalar(x: &Tensor, c: f64) -> Result<Tensor> {
    let c = Tensor::new(c, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&c)?)
}

fn check_same_shape(name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
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

/// The forward process's √ᾱ_t and √(1−ᾱ_t) as diffusers' `add_noise` / `get_velocity` compute them
/// (the table is first cast to the sample's dtype: f64 samples stay f64, anything else is computed
/// in f32), and `noise` (checked to be shaped like `x0`) in `x0`'s dtype.
fn forward_parts(
    table: &NoiseTable,
    x0: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<(f64, f64, Tensor)> {
    check_same_shape("noise", noise, x0)?;
    let n = table.alphas_cumprod.len();
    if t >= n {
        return Err(Error::invalid("timestep", format!("{t} is outside 0..{n}")));
    }
    let a = table.alphas_cumprod[t];
    let (sa, sb) = if x0.dtype() == DType::F64 {
        sqrt_ab::<f64>(a)
    } else {
        sqrt_ab::<f32>(a)
    };
    Ok((sa, sb, noise.to_dtype(x0.dtype())?))
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

/// The methods every scheduler shares, for a struct `$ty` with fields `cfg: $cfg` and `base: Base`,
/// a `CLASS` const, a `with_file(cfg, file)` constructor and a `step_with_x0` returning
/// (x_prev, x̂₀): `new`, `config` and `table`, and the whole [`Scheduler`](crate::Scheduler) impl.
/// `step_with_x0(noise)`: it takes the noise source (`step_with_x0()`: it draws none).
/// `reset $field`: `set_timesteps` also clears the multistep state in `self.$field` (an `Option`).
/// The invoking module has `Tensor` (candle's) and `Result` (vdit_core's) in scope.
macro_rules! scheduler_impls {
    ($ty:ident, $cfg:ty, step_with_x0($($noise:ident)?) $(, reset $state:ident)?) => {
        impl $ty {
            /// Builds the scheduler from `cfg` (validated; errors name `<Class config>`).
            pub fn new(cfg: $cfg) -> Result<Self> {
                Self::with_file(cfg, $crate::config::in_memory(CLASS))
            }

            pub fn config(&self) -> &$cfg {
                &self.cfg
            }

            pub fn table(&self) -> &$crate::NoiseTable {
                &self.base.table
            }
        }

        impl $crate::Scheduler for $ty {
            fn set_timesteps(&mut self, n: usize) -> Result<()> {
                $(self.$state = None;)?
                self.base.set_timesteps(n)
            }

            fn timesteps(&self) -> &[usize] {
                &self.base.timesteps
            }

            fn step(
                &mut self,
                model_output: &Tensor,
                t: usize,
                sample: &Tensor,
                noise: &mut dyn $crate::NoiseSource,
            ) -> Result<Tensor> {
                let call = $crate::common::scheduler_impls!(
                    @call self(model_output, t, sample) noise $($noise)?
                );
                Ok(call?.0)
            }

            fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
                self.base.add_noise(original, noise, t)
            }

            fn velocity(&self, sample: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
                self.base.velocity(sample, noise, t)
            }

            fn prediction_type(&self) -> $crate::PredictionType {
                self.base.prediction_type
            }

            fn num_train_timesteps(&self) -> usize {
                self.base.num_train()
            }

            fn alphas_cumprod(&self) -> &[f64] {
                &self.base.table.alphas_cumprod
            }
        }
    };
    // `step_with_x0`'s call, passing the noise source on or (deterministic samplers) dropping it.
    (@call $s:ident($($arg:ident),*) $z:ident noise) => { $s.step_with_x0($($arg,)* $z) };
    (@call $s:ident($($arg:ident),*) $z:ident) => {{ let _unused = $z; $s.step_with_x0($($arg),*) }};
}
pub(crate) use scheduler_impls;
