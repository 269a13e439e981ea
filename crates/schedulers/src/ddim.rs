//! Plain DDIM: diffusers' `DDIMScheduler`.
//!
//! Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12. With ᾱ_prev at `t - T//N`
//! (`final_alpha_cumprod` below 0): x̂₀ and ε̂ from the prediction type, x̂₀ thresholded or clipped,
//! σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)),
//! x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε̂ (+ σ·z when η > 0, one draw per step).
//! η is a call argument in diffusers (default 0); here it is set with [`DDIMScheduler::with_eta`].

use crate::common::{clamp_x0, draw_noise, scale, scheduler_impls, Base, Prev};
use crate::config::DDIMSchedulerConfig;
use crate::schedule::{with_dtype, Real};
use crate::NoiseSource;
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::{Error, Result};

const CLASS: &str = "DDIMScheduler";

#[derive(Clone, Debug)]
pub struct DDIMScheduler {
    cfg: DDIMSchedulerConfig,
    base: Base,
    eta: f64,
}

/// (√ᾱ_prev, √(1−ᾱ_prev−σ²), σ) in the table dtype.
fn ddim_coeffs<T: Real>(a_t: f64, a_prev: f64, eta: f64) -> (f64, f64, f64) {
    let one = T::of(1.0);
    let (a_t, a_prev) = (T::of(a_t), T::of(a_prev));
    let (b_t, b_prev) = (one - a_t, one - a_prev);
    let variance = (b_prev / b_t) * (one - a_t / a_prev);
    let std = T::of(eta) * variance.sqrt();
    let dir = (one - a_prev - std * std).sqrt();
    (a_prev.sqrt().f64(), dir.f64(), std.f64())
}

impl DDIMScheduler {
    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: DDIMSchedulerConfig, file: PathBuf) -> Result<Self> {
        cfg.validate(&file)?;
        let base = Base::plain(CLASS, file, &cfg.shared(), cfg.set_alpha_to_one)?;
        Ok(Self {
            cfg,
            base,
            eta: 0.0,
        })
    }

    /// Sets η (0 = deterministic DDIM, 1 = DDPM-like variance).
    pub fn with_eta(mut self, eta: f64) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::invalid(
                "eta",
                format!("must be a finite number >= 0 (found {eta})"),
            ));
        }
        self.eta = eta;
        Ok(self)
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// One step returning (x_prev, x̂₀), as diffusers' `step(..., eta, return_dict=False)`.
    pub fn step_with_x0(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        self.base.check_t(t)?;
        let st = self
            .base
            .start_step(model_output, t, sample, Prev::Spaced)?;
        let eps = self.base.pred_eps(&st, sample, model_output)?;
        let x0 = clamp_x0(st.x0, &self.cfg.clamp())?;
        let dtype = self.base.table.dtype;
        let (c_x0, c_dir, std) =
            with_dtype!(dtype, T => ddim_coeffs::<T>(st.a_t, st.a_prev, self.eta));
        let mut prev = (scale(&x0, c_x0)? + scale(&eps, c_dir)?)?;
        if self.eta > 0.0 {
            let z = draw_noise(noise, model_output)?;
            prev = (prev + scale(&z, std)?)?;
        }
        Ok((prev, x0))
    }
}

scheduler_impls!(DDIMScheduler, DDIMSchedulerConfig, step_with_x0(noise));
