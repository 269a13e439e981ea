//! vdit-schedulers: diffusion samplers configured from diffusers' `scheduler_config.json`.
//!
//! Reference: diffusers 0.42 (`CogVideoXDDIMScheduler`, `CogVideoXDPMScheduler`, `DDIMScheduler`,
//! `DDPMScheduler`), reproduced to float32 rounding; see `/work/shared/parity/README.md` §8–12.
//! The pipeline and the trainer drive every scheduler through [`Scheduler`] and never special-case
//! one; multistep state lives inside the scheduler. Stochastic steps take their noise from a
//! [`NoiseSource`]: a seeded [`NoiseRng`] in normal use, [`RecordedNoise`] in parity tests.
//!
//! Tensors may have any shape (the pipeline uses latents `[B, F, C, H, W]`); the sample's dtype and
//! device are kept. [`load_scheduler`] builds the class a config's `_class_name` names.
//!
//! - [`schedule`]: betas / ᾱ tables and timestep spacings, shared by all schedulers.
//! - [`config`]: serde configs with diffusers' names and defaults.

pub mod config;
pub mod schedule;

mod cogvideox_ddim;
mod cogvideox_dpm;
mod common;
mod ddim;
mod ddpm;

pub use cogvideox_ddim::CogVideoXDDIMScheduler;
pub use cogvideox_dpm::CogVideoXDPMScheduler;
pub use config::{
    BetaSchedule, CogVideoXSchedulerConfig, DDIMSchedulerConfig, DDPMSchedulerConfig,
    PredictionType, TimestepSpacing, VarianceType,
};
pub use ddim::DDIMScheduler;
pub use ddpm::DDPMScheduler;
pub use schedule::{NoiseTable, TableDType};

use candle_core::{Device, Tensor};
use std::collections::VecDeque;
use std::path::Path;
use vdit_core::rng::NoiseRng;
use vdit_core::{Error, Result};

/// Where stochastic schedulers get their noise: a seeded generator in normal use, a queue of
/// recorded draws in parity tests. Schedulers cast the result to the sample's dtype.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor>;
}

impl NoiseSource for NoiseRng {
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        NoiseRng::randn(self, shape.to_vec(), dev)
    }
}

/// Pre-recorded draws returned in order (e.g. the draws torch made in a reference run).
/// Asking for more than were recorded, or for another shape, is an error.
#[derive(Clone, Debug, Default)]
pub struct RecordedNoise {
    draws: VecDeque<Tensor>,
    used: usize,
}

impl RecordedNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            draws: draws.into_iter().collect(),
            used: 0,
        }
    }

    pub fn push(&mut self, draw: Tensor) {
        self.draws.push_back(draw);
    }

    /// Draws not yet consumed.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }

    /// Draws consumed so far.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let Some(z) = self.draws.pop_front() else {
            return Err(Error::invalid(
                "noise",
                format!(
                    "recorded noise exhausted: draw {} of shape {shape:?} requested, only {} were recorded",
                    self.used + 1,
                    self.used
                ),
            ));
        };
        if z.dims() != shape {
            return Err(Error::invalid(
                "noise",
                format!(
                    "recorded draw {} has shape {:?}, {shape:?} was requested",
                    self.used + 1,
                    z.dims()
                ),
            ));
        }
        self.used += 1;
        Ok(z.to_device(dev)?)
    }
}

/// One denoising scheduler. The denoising loop is
/// `set_timesteps(n)`, then for each `t` in `timesteps()`:
/// `x = step(model(scale_model_input(x, t), t), t, x, noise)`, starting from
/// `init_noise_sigma() * noise`.
pub trait Scheduler: Send {
    /// Prepares `n` inference steps (resets multistep state).
    fn set_timesteps(&mut self, n: usize) -> Result<()>;
    /// The timesteps to run, in order (as diffusers' `scheduler.timesteps`).
    fn timesteps(&self) -> &[usize];
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _t: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step at timestep `t` (the i-th of `timesteps()`), returning the sample for the
    /// next step (for the last step, what diffusers' pipeline keeps). Multistep state (DPM's previous
    /// x̂₀ and previous timestep) lives in `&mut self`.
    fn step(
        &mut self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Forward process q(x_t | x₀) = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, for video-to-video and training.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor>;
    /// The v-prediction target √ᾱ_t·ε − √(1−ᾱ_t)·x₀ at `t`, for training.
    fn velocity(&self, sample: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor>;
    fn prediction_type(&self) -> PredictionType;
    fn num_train_timesteps(&self) -> usize;
    /// ᾱ for every training timestep (widened to f64), e.g. for SNR loss weighting.
    fn alphas_cumprod(&self) -> &[f64];
}

/// The `_class_name`s [`load_scheduler`] accepts.
pub const SCHEDULER_CLASSES: [&str; 4] = [
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
];

/// Reads `scheduler_config.json` (a file, or a folder holding it) and builds the scheduler its
/// `_class_name` names.
pub fn load_scheduler(path: &Path) -> Result<Box<dyn Scheduler>> {
    let file = if path.is_dir() {
        let f = path.join("scheduler_config.json");
        if !f.is_file() {
            let hint = if path.join("scheduler").is_dir() {
                format!(
                    " (for a pipeline folder, pass {})",
                    path.join("scheduler").display()
                )
            } else {
                String::new()
            };
            return Err(Error::io(
                &f,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no scheduler_config.json in this folder{hint}"),
                ),
            ));
        }
        f
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&file, "<json>", format!("not valid JSON: {e}")))?;
    let accepted = SCHEDULER_CLASSES.join(", ");
    let class = match raw.get("_class_name") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Error::config(
                &file,
                "_class_name",
                format!("expected a string naming one of {accepted}, found {other}"),
            ))
        }
        None => {
            return Err(Error::config(
                &file,
                "_class_name",
                format!("missing; expected one of {accepted}"),
            ))
        }
    };
    tracing::debug!(file = %file.display(), class = %class, "loading scheduler");
    use vdit_core::config::parse_config as parse;
    Ok(match class.as_str() {
        "CogVideoXDDIMScheduler" => Box::new(CogVideoXDDIMScheduler::with_file(
            parse(&file, &text)?,
            file,
        )?),
        "CogVideoXDPMScheduler" => Box::new(CogVideoXDPMScheduler::with_file(
            parse(&file, &text)?,
            file,
        )?),
        "DDIMScheduler" => Box::new(DDIMScheduler::with_file(parse(&file, &text)?, file)?),
        "DDPMScheduler" => Box::new(DDPMScheduler::with_file(parse(&file, &text)?, file)?),
        other => {
            return Err(Error::config(
                &file,
                "_class_name",
                format!("unsupported scheduler {other:?}; expected one of {accepted}"),
            ))
        }
    })
}
