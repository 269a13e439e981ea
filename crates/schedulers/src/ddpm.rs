//! Ancestral DDPM sampling: diffusers' `DDPMScheduler`.
//!
//! Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 7. Unlike DDIM, the previous
//! timestep is the next entry of `timesteps()` (ᾱ_prev = 1 after the last). With α_t = ᾱ_t/ᾱ_prev,
//! β_t = 1 − α_t: x̂₀ from the prediction type (thresholded or clipped),
//! μ = (√ᾱ_prev·β_t/(1−ᾱ_t))·x̂₀ + (√α_t·(1−ᾱ_prev)/(1−ᾱ_t))·x_t, and for t > 0 one noise draw z:
//! x_prev = μ + σ·z with σ² = β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t (`fixed_small`, clamped at 1e-20),
//! σ = exp(½·log β̃_t) (`fixed_small_log`), σ² = β_t (`fixed_large`), or learned from the model:
//! `learned` (σ² is the second half of the output along dim 1) and `learned_range`
//! (log σ² = f·log β_t + (1−f)·log β̃_t with f = (v+1)/2).

use crate::common::{clamp_x0, draw_noise, scale, scheduler_impls, Base, Prev};
use crate::config::{DDPMSchedulerConfig, VarianceType};
use crate::schedule::{with_dtype, Real};
use crate::NoiseSource;
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::{Error, Result};

const CLASS: &str = "DDPMScheduler";

#[derive(Clone, Debug)]
pub struct DDPMScheduler {
    cfg: DDPMSchedulerConfig,
    base: Base,
}

/// Step coefficients in the table dtype.
struct Coeffs {
    c_x0: f64,
    c_sample: f64,
    /// σ for fixed_small: √β̃_t, with β̃_t = (1−ᾱ_prev)/(1−ᾱ_t)·β_t clamped at 1e-20.
    std_small: f64,
    std_small_log: f64,
    std_large: f64,
    log_small: f64,
    log_large: f64,
}

fn ddpm_coeffs<T: Real>(a_t: f64, a_prev: f64) -> Coeffs {
    let one = T::of(1.0);
    let (a_t, a_prev) = (T::of(a_t), T::of(a_prev));
    let (b_t, b_prev) = (one - a_t, one - a_prev);
    let alpha = a_t / a_prev;
    let beta = one - alpha;
    let c_x0 = (a_prev.sqrt() * beta) / b_t;
    let c_sample = alpha.sqrt() * b_prev / b_t;
    let var = (one - a_prev) / (one - a_t) * beta;
    let floor = T::of(1e-20);
    let var = if var < floor { floor } else { var };
    Coeffs {
        c_x0: c_x0.f64(),
        c_sample: c_sample.f64(),
        std_small: var.sqrt().f64(),
        std_small_log: (T::of(0.5) * var.ln()).exp().f64(),
        std_large: beta.sqrt().f64(),
        log_small: var.ln().f64(),
        log_large: beta.ln().f64(),
    }
}

impl DDPMScheduler {
    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: DDPMSchedulerConfig, file: PathBuf) -> Result<Self> {
        cfg.validate(&file)?;
        // diffusers' DDPM steps to ᾱ = 1 after the last timestep (`set_alpha_to_one` in effect).
        let base = Base::plain(CLASS, file, &cfg.shared(), true)?;
        Ok(Self { cfg, base })
    }

    /// One step returning (x_prev, x̂₀), as diffusers' `step(..., return_dict=False)`.
    pub fn step_with_x0(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        self.base.check_t(t)?;
        let vt = self.cfg.variance_type;
        let learned = matches!(vt, VarianceType::Learned | VarianceType::LearnedRange);
        let (model_output, predicted_variance) = match (model_output.dims(), sample.dims()) {
            (m, s) if learned && m.len() >= 2 && s.len() >= 2 && m[1] == 2 * s[1] => {
                let c = s[1];
                (
                    model_output.narrow(1, 0, c)?,
                    Some(model_output.narrow(1, c, c)?),
                )
            }
            _ if learned => {
                return Err(Error::invalid(
                    "model_output",
                    format!(
                    "variance_type {vt:?} needs the model output to hold twice the sample's size \
                         along dim 1 (sample {:?}, output {:?})",
                    sample.dims(),
                    model_output.dims()
                ),
                ))
            }
            _ => (model_output.clone(), None),
        };
        let st = self.base.start_step(&model_output, t, sample, Prev::Next)?;
        let x0 = clamp_x0(st.x0, &self.cfg.clamp())?;
        let dtype = self.base.table.dtype;
        let c = with_dtype!(dtype, T => ddpm_coeffs::<T>(st.a_t, st.a_prev));
        let mut prev = (scale(&x0, c.c_x0)? + scale(sample, c.c_sample)?)?;
        if t > 0 {
            let z = draw_noise(noise, &model_output)?;
            let term = match (vt, &predicted_variance) {
                (VarianceType::FixedSmall, _) => scale(&z, c.std_small)?,
                (VarianceType::FixedSmallLog, _) => scale(&z, c.std_small_log)?,
                (VarianceType::FixedLarge, _) => scale(&z, c.std_large)?,
                (VarianceType::Learned, Some(v)) => (v.sqrt()? * &z)?,
                (VarianceType::LearnedRange, Some(v)) => {
                    // frac = (v + 1) / 2; log σ² = frac·log β_t + (1 − frac)·log β̃_t
                    let frac = ((v + 1.0)? / 2.0)?;
                    let log_var = (scale(&frac, c.log_large)?
                        + scale(&frac.affine(-1.0, 1.0)?, c.log_small)?)?;
                    (log_var.affine(0.5, 0.0)?.exp()? * &z)?
                }
                _ => {
                    return Err(Error::Msg(format!(
                        "{CLASS}: variance_type {vt:?} is not supported (validated at load)"
                    )))
                }
            };
            prev = (prev + term)?;
        }
        Ok((prev, x0))
    }
}

scheduler_impls!(DDPMScheduler, DDPMSchedulerConfig, step_with_x0(noise));
