//! CogVideoX's DDIM sampler (η = 0): diffusers' `CogVideoXDDIMScheduler`.
//!
//! Song et al. 2021, "Denoising Diffusion Implicit Models", with CogVideoX's SNR-shifted,
//! zero-terminal-SNR table. Per step, with ᾱ_prev taken at `t - T//N` (not the next timestep):
//! x̂₀ from the prediction type, a = √((1−ᾱ_prev)/(1−ᾱ_t)), b = √ᾱ_prev − √ᾱ_t·a,
//! x_prev = a·x_t + b·x̂₀. No clipping (diffusers ignores `clip_sample` here), no noise: deterministic.
//! The last step uses ᾱ_prev = 1 (`set_alpha_to_one`) and so returns x̂₀.

use crate::common::{self, pred_x0, scale, Base};
use crate::config::{in_memory, CogVideoXSchedulerConfig};
use crate::schedule::{cogvideox_table, with_dtype, Real};
use crate::{NoiseSource, PredictionType, Scheduler};
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::Result;

const CLASS: &str = "CogVideoXDDIMScheduler";

#[derive(Clone, Debug)]
pub struct CogVideoXDDIMScheduler {
    cfg: CogVideoXSchedulerConfig,
    base: Base,
    final_alpha_cumprod: f64,
}

/// DDIM's two step coefficients (a, b), in the table dtype.
fn ddim_coeffs<T: Real>(a_t: f64, a_prev: f64) -> (f64, f64) {
    let (a_t, a_prev) = (T::of(a_t), T::of(a_prev));
    let one = T::of(1.0);
    let a = ((one - a_prev) / (one - a_t)).sqrt();
    let b = a_prev.sqrt() - a_t.sqrt() * a;
    (a.f64(), b.f64())
}

impl CogVideoXDDIMScheduler {
    pub fn new(cfg: CogVideoXSchedulerConfig) -> Result<Self> {
        Self::with_file(cfg, in_memory(CLASS))
    }

    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: CogVideoXSchedulerConfig, file: PathBuf) -> Result<Self> {
        cfg.validate(&file, CLASS)?;
        let table = cogvideox_table(
            &cfg.beta_spec(),
            cfg.snr_shift_scale,
            cfg.rescale_betas_zero_snr,
        );
        crate::config::check_table(&file, &table.betas, cfg.trained_betas.is_some(), None)?;
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
        })
    }

    pub fn config(&self) -> &CogVideoXSchedulerConfig {
        &self.cfg
    }

    pub fn table(&self) -> &crate::NoiseTable {
        &self.base.table
    }

    /// One step returning (x_prev, x̂₀), as diffusers' `step(..., return_dict=False)`.
    pub fn step_with_x0(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.base.check_t(t)?;
        common::check_same_shape("model_output", model_output, sample)?;
        let a_t = self.base.ac(t);
        let (_, a_prev) = self.base.ddim_prev(t, self.final_alpha_cumprod)?;
        let dtype = self.base.table.dtype;
        let x0 = pred_x0(self.cfg.prediction_type, dtype, sample, model_output, a_t)?;
        let (a, b) = with_dtype!(dtype, T => ddim_coeffs::<T>(a_t, a_prev));
        let prev = (scale(sample, a)? + scale(&x0, b)?)?;
        Ok((prev, x0))
    }
}

impl Scheduler for CogVideoXDDIMScheduler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        Ok(self.step_with_x0(model_output, t, sample)?.0)
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
