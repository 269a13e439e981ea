//! CogVideoX's DDIM sampler (η = 0): diffusers' `CogVideoXDDIMScheduler`.
//!
//! Song et al. 2021, "Denoising Diffusion Implicit Models", with CogVideoX's SNR-shifted,
//! zero-terminal-SNR table. Per step, with ᾱ_prev taken at `t - T//N` (not the next timestep):
//! x̂₀ from the prediction type, a = √((1−ᾱ_prev)/(1−ᾱ_t)), b = √ᾱ_prev − √ᾱ_t·a,
//! x_prev = a·x_t + b·x̂₀. No clipping (diffusers ignores `clip_sample` here), no noise: deterministic.
//! The last step uses ᾱ_prev = 1 (`set_alpha_to_one`) and so returns x̂₀.

use crate::common::{scale, scheduler_impls, Base, Prev};
use crate::config::CogVideoXSchedulerConfig;
use crate::schedule::{with_dtype, Real};
use candle_core::Tensor;
use std::path::PathBuf;
use vdit_core::Result;

const CLASS: &str = "CogVideoXDDIMScheduler";

#[derive(Clone, Debug)]
pub struct CogVideoXDDIMScheduler {
    cfg: CogVideoXSchedulerConfig,
    base: Base,
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
    /// As [`new`](Self::new); `file` names the config in error messages.
    pub fn with_file(cfg: CogVideoXSchedulerConfig, file: PathBuf) -> Result<Self> {
        let base = Base::cogvideox(CLASS, file, &cfg)?;
        Ok(Self { cfg, base })
    }

    /// One step returning (x_prev, x̂₀), as diffusers' `step(..., return_dict=False)`.
    pub fn step_with_x0(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.base.check_t(t)?;
        let st = self
            .base
            .start_step(model_output, t, sample, Prev::Spaced)?;
        let dtype = self.base.table.dtype;
        let (a, b) = with_dtype!(dtype, T => ddim_coeffs::<T>(st.a_t, st.a_prev));
        let prev = (scale(sample, a)? + scale(&st.x0, b)?)?;
        Ok((prev, st.x0))
    }
}

scheduler_impls!(
    CogVideoXDDIMScheduler,
    CogVideoXSchedulerConfig,
    step_with_x0()
);
