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

use crate::common::{draw_noise, scale, scheduler_impls, Base, Prev};
use crate::config::CogVideoXSchedulerConfig;
use crate::schedule::{with_dtype, Real};
use crate::NoiseSource;
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::Result;

const CLASS: &str = "CogVideoXDPMScheduler";

#[derive(Clone, Debug)]
pub struct CogVideoXDPMScheduler {
    cfg: CogVideoXSchedulerConfig,
    base: Base,
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
    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: CogVideoXSchedulerConfig, file: PathBuf) -> Result<Self> {
        let base = Base::cogvideox(CLASS, file, &cfg)?;
        Ok(Self {
            cfg,
            base,
            previous: None,
        })
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
        let st = self
            .base
            .start_step(model_output, t, sample, Prev::Spaced)?;
        let a_back = self.previous.as_ref().map(|(_, tb)| self.base.ac(*tb));
        let dtype = self.base.table.dtype;
        let m = with_dtype!(dtype, T => dpm_mults::<T>(st.a_t, st.a_prev, a_back));

        // diffusers draws (and, on second-order steps, discards) a first-order noise tensor every step.
        let z = draw_noise(noise, sample)?;
        let denoised = match &self.previous {
            Some((old_x0, _)) if st.prev_t >= 0 => {
                let d = (scale(&st.x0, m.m3)? - scale(old_x0, m.m4)?)?;
                let z = draw_noise(noise, sample)?;
                Some((d, z))
            }
            _ => None,
        };
        let (d, z) = match &denoised {
            Some((d, z)) => (d, z),
            None => (&st.x0, &z),
        };
        let prev = ((scale(sample, m.m1)? - scale(d, m.m2)?)? + scale(z, m.noise)?)?;
        self.previous = Some((st.x0.clone(), t));
        Ok((prev, st.x0))
    }
}

scheduler_impls!(
    CogVideoXDPMScheduler,
    CogVideoXSchedulerConfig,
    step_with_x0(noise),
    reset previous
);
