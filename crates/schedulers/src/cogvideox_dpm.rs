//! CogVideoX's stochastic DPM-Solver++(2M) sampler: diffusers' `CogVideoXDPMScheduler`.
//!
//! Lu et al. 2022, "DPM-Solver++", SDE variant, with CogVideoX's SNR-shifted, zero-terminal-SNR table.
//! With λ = log √(ᾱ/(1−ᾱ)), h = λ_prev − λ_t (ᾱ_prev at `t - T//N`):
//! - first order: x_prev = m₁·x_t − m₂·x̂₀ + σ·z, m₁ = √((1−ᾱ_prev)/(1−ᾱ_t))·e^{−h},
//!   m₂ = expm1(−2h)·√ᾱ_prev, σ = √(1−ᾱ_prev)·√(1−e^{−2h});
//! - second order (from the second step on, except the last): with r = h_last/h,
//!   D = (1 + 1/2r)·x̂₀ − (1/2r)·x̂₀_old and x_prev = m₁·x_t − m₂·D + σ·z.
//!
//! Noise is drawn every step, even with η = 0: one draw on first-order steps, two on second-order
//! steps (the first is discarded), so the draws go 1, 2, …, 2, 1. At t = 999 with zero terminal SNR,
//! ᾱ = 0, λ = −∞ and h = +∞; IEEE arithmetic gives m₁ = 0, m₂ = −√ᾱ_prev (and on the next step
//! r = ∞, so D = x̂₀). The last step (ᾱ_prev = 1) returns x̂₀.

use crate::common::{self, draw_noise, pred_x0, scale, Base};
use crate::config::{in_memory, CogVideoXSchedulerConfig};
use crate::schedule::{cogvideox_table, with_dtype, Real};
use crate::{NoiseSource, PredictionType, Scheduler};
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::Result;

const CLASS: &str = "CogVideoXDPMScheduler";

#[derive(Clone, Debug)]
pub struct CogVideoXDPMScheduler {
    cfg: CogVideoXSchedulerConfig,
    base: Base,
    final_alpha_cumprod: f64,
    /// x̂₀ of the previous step and that step's timestep (the 2M multistep state).
    previous: Option<(Tensor, usize)>,
}

/// Step multipliers, in the table dtype: (m₁, m₂, σ, second-order (m₃, m₄) if `a_back` is given).
struct Mults {
    m1: f64,
    m2: f64,
    noise: f64,
    m3: f64,
    m4: f64,
}

fn dpm_mults<T: Real>(a_t: f64, a_prev: f64, a_back: Option<f64>) -> Mults {
    let one = T::of(1.0);
    let two = T::of(2.0);
    let (a_t, a_prev) = (T::of(a_t), T::of(a_prev));
    let lamb_of = |a: T| (a / (one - a)).sqrt().ln();
    let lamb = lamb_of(a_t);
    let lamb_next = lamb_of(a_prev);
    let h = lamb_next - lamb;
    let m1 = ((one - a_prev) / (one - a_t)).sqrt() * (-h).exp();
    let m2 = (T::of(-2.0) * h).exp_m1() * a_prev.sqrt();
    let noise = (one - a_prev).sqrt() * (one - (T::of(-2.0) * h).exp()).sqrt();
    let (m3, m4) = match a_back {
        Some(a_back) => {
            let h_last = lamb - lamb_of(T::of(a_back));
            let r = h_last / h;
            (one + one / (two * r), one / (two * r))
        }
        None => (T::of(f64::NAN), T::of(f64::NAN)),
    };
    Mults {
        m1: m1.f64(),
        m2: m2.f64(),
        noise: noise.f64(),
        m3: m3.f64(),
        m4: m4.f64(),
    }
}

impl CogVideoXDPMScheduler {
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
            previous: None,
        })
    }

    pub fn config(&self) -> &CogVideoXSchedulerConfig {
        &self.cfg
    }

    pub fn table(&self) -> &crate::NoiseTable {
        &self.base.table
    }

    /// One step returning (x_prev, x̂₀), as diffusers' `step(..., return_dict=False)`; updates the
    /// multistep state.
    pub fn step_with_x0(
        &mut self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        self.base.check_t(t)?;
        common::check_same_shape("model_output", model_output, sample)?;
        let a_t = self.base.ac(t);
        let (prev_t, a_prev) = self.base.ddim_prev(t, self.final_alpha_cumprod)?;
        let a_back = self.previous.as_ref().map(|(_, tb)| self.base.ac(*tb));
        let dtype = self.base.table.dtype;
        let x0 = pred_x0(self.cfg.prediction_type, dtype, sample, model_output, a_t)?;
        let m = with_dtype!(dtype, T => dpm_mults::<T>(a_t, a_prev, a_back));

        // diffusers draws (and, on second-order steps, discards) a first-order noise tensor every step.
        let z = draw_noise(noise, sample)?;
        let denoised = match &self.previous {
            Some((old_x0, _)) if prev_t >= 0 => {
                let d = (scale(&x0, m.m3)? - scale(old_x0, m.m4)?)?;
                let z = draw_noise(noise, sample)?;
                Some((d, z))
            }
            _ => None,
        };
        let (d, z) = match &denoised {
            Some((d, z)) => (d, z),
            None => (&x0, &z),
        };
        let prev = ((scale(sample, m.m1)? - scale(d, m.m2)?)? + scale(z, m.noise)?)?;
        self.previous = Some((x0.clone(), t));
        Ok((prev, x0))
    }
}

impl Scheduler for CogVideoXDPMScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.previous = None;
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
