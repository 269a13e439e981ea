//! Plain DDIM: diffusers' `DDIMScheduler`.
//!
//! Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12. With ᾱ_prev at `t - T//N`
//! (`final_alpha_cumprod` below 0): x̂₀ and ε̂ from the prediction type, x̂₀ thresholded or clipped,
//! σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)),
//! x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε̂ (+ σ·z when η > 0, one draw per step).
//! η is a call argument in diffusers (default 0); here it is set with [`DDIMScheduler::with_eta`].

use crate::common::{self, clamp_x0, draw_noise, pred_eps, pred_x0, scale, Base};
use crate::config::{check_table, in_memory, DDIMSchedulerConfig};
use crate::schedule::{plain_table, with_dtype, Real};
use crate::{NoiseSource, PredictionType, Scheduler};
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::{Error, Result};

const CLASS: &str = "DDIMScheduler";

#[derive(Clone, Debug)]
pub struct DDIMScheduler {
    cfg: DDIMSchedulerConfig,
    base: Base,
    final_alpha_cumprod: f64,
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
    pub fn new(cfg: DDIMSchedulerConfig) -> Result<Self> {
        Self::with_file(cfg, in_memory(CLASS))
    }

    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: DDIMSchedulerConfig, file: PathBuf) -> Result<Self> {
        cfg.validate(&file)?;
        let table = plain_table(&cfg.beta_spec(), cfg.rescale_betas_zero_snr);
        check_table(
            &file,
            &table.betas,
            cfg.trained_betas.is_some(),
            Some(cfg.rescale_betas_zero_snr),
        )?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            table.alphas_cumprod[0]
        };
        let base = Base {
            class: CLASS,
            file,
            table,
            spacing: cfg.timestep_spacing,
            steps_offset: cfg.steps_offset,
            timesteps: Vec::new(),
            num_inference_steps: None,
        };
        Ok(Self {
            cfg,
            base,
            final_alpha_cumprod,
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

    pub fn config(&self) -> &DDIMSchedulerConfig {
        &self.cfg
    }

    pub fn table(&self) -> &crate::NoiseTable {
        &self.base.table
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
        common::check_same_shape("model_output", model_output, sample)?;
        let a_t = self.base.ac(t);
        let (_, a_prev) = self.base.ddim_prev(t, self.final_alpha_cumprod)?;
        let dtype = self.base.table.dtype;
        let pt = self.cfg.prediction_type;
        let x0 = pred_x0(pt, dtype, sample, model_output, a_t)?;
        let eps = pred_eps(pt, dtype, sample, model_output, &x0, a_t)?;
        let x0 = clamp_x0(x0, &self.cfg.clamp())?;
        let (c_x0, c_dir, std) = with_dtype!(dtype, T => ddim_coeffs::<T>(a_t, a_prev, self.eta));
        let mut prev = (scale(&x0, c_x0)? + scale(&eps, c_dir)?)?;
        if self.eta > 0.0 {
            let z = draw_noise(noise, model_output)?;
            prev = (prev + scale(&z, std)?)?;
        }
        Ok((prev, x0))
    }
}

impl Scheduler for DDIMScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        Ok(self.step_with_x0(model_output, t, sample, noise)?.0)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        common::add_noise(&self.base.table, original, noise, t)
    }

    fn velocity(&self, sample: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        common::velocity(&self.base.table, sample, noise, t)
    }

    fn prediction_type(&self) -> PredictionType {
        self.cfg.prediction_type
    }

    fn num_train_timesteps(&self) -> usize {
        self.base.num_train()
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.base.table.alphas_cumprod
    }
}
