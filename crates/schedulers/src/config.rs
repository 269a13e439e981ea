//! Scheduler configs: diffusers' `scheduler_config.json` field names and defaults.
//!
//! Enumerated fields (`beta_schedule`, `prediction_type`, `timestep_spacing`, `variance_type`) are
//! serde enums, so an unknown value is an error naming the file, the key and the accepted values.
//! `validate` adds the checks serde cannot express (per-class schedules, table lengths, ranges).

use crate::schedule::BetaSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;
use vdit_core::config::ensure;
use vdit_core::Result;

/// `beta_schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// DDPMScheduler only.
    #[serde(rename = "sigmoid")]
    Sigmoid,
    /// DDPMScheduler only.
    #[serde(rename = "laplace")]
    Laplace,
}

impl BetaSchedule {
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredcosCapV2 => "squaredcos_cap_v2",
            Self::Sigmoid => "sigmoid",
            Self::Laplace => "laplace",
        }
    }
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PredictionType {
    /// The added noise ε.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample x₀.
    #[serde(rename = "sample")]
    Sample,
}

/// `timestep_spacing` (Lin et al. 2023, table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
    #[serde(rename = "linspace")]
    Linspace,
}

/// DDPM's `variance_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarianceType {
    #[serde(rename = "fixed_small")]
    FixedSmall,
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    #[serde(rename = "fixed_large")]
    FixedLarge,
    /// Accepted by diffusers' config but its `step` takes the square root of a log variance (NaN);
    /// rejected by [`DDPMSchedulerConfig::validate`].
    #[serde(rename = "fixed_large_log")]
    FixedLargeLog,
    /// The model predicts the variance: its output holds twice the sample's size along dim 1.
    #[serde(rename = "learned")]
    Learned,
    /// The model predicts an interpolation between the fixed small and large log variances.
    #[serde(rename = "learned_range")]
    LearnedRange,
}

/// The file name used in messages for a config built in code rather than read from disk.
pub(crate) fn in_memory(class: &str) -> std::path::PathBuf {
    format!("<{class} config>").into()
}

/// The beta schedules the DDIM-type classes accept.
const SCHEDULES: [BetaSchedule; 3] = [
    BetaSchedule::Linear,
    BetaSchedule::ScaledLinear,
    BetaSchedule::SquaredcosCapV2,
];

/// The beta schedules `DDPMScheduler` accepts (also sigmoid and laplace).
const DDPM_SCHEDULES: [BetaSchedule; 5] = [
    BetaSchedule::Linear,
    BetaSchedule::ScaledLinear,
    BetaSchedule::SquaredcosCapV2,
    BetaSchedule::Sigmoid,
    BetaSchedule::Laplace,
];

/// Reads a config file and runs `validate` on it (its errors name `path`).
fn load_validated<C: DeserializeOwned + Serialize>(
    path: &Path,
    validate: impl FnOnce(&C) -> Result<()>,
) -> Result<C> {
    let cfg: C = vdit_core::config::load_config(path)?;
    validate(&cfg)?;
    Ok(cfg)
}

/// A range check on one float field: unless `ok(value)`, an error naming `file` and `key` that says
/// the value "must {expected} (found {value})".
fn check_f64(
    file: &Path,
    key: &str,
    value: f64,
    ok: fn(f64) -> bool,
    expected: &str,
) -> Result<()> {
    ensure(ok(value), file, key, || {
        format!("must {expected} (found {value})")
    })
}

/// `num_train_timesteps`, then either the length of `trained_betas` or a `beta_schedule` that `class`
/// supports (one of `allowed`).
fn check_betas(file: &Path, class: &str, spec: &BetaSpec, allowed: &[BetaSchedule]) -> Result<()> {
    let n = spec.num_train_timesteps;
    ensure(n >= 1, file, "num_train_timesteps", || {
        "must be at least 1".into()
    })?;
    match spec.trained_betas {
        Some(tb) => ensure(tb.len() == n, file, "trained_betas", || {
            format!("has {} values but num_train_timesteps is {n}", tb.len())
        }),
        None => ensure(
            allowed.contains(&spec.schedule),
            file,
            "beta_schedule",
            || {
                let names: Vec<_> = allowed.iter().map(|s| s.name()).collect();
                format!(
                    "{class} supports {} (found {})",
                    names.join(", "),
                    spec.schedule.name()
                )
            },
        ),
    }
}

/// Checks the betas of a built table lie in [0, 1] (otherwise ᾱ is negative or NaN). `rescaled`:
/// the betas went through `rescale_betas_zero_snr` (plain DDIM / DDPM), which the message then says.
pub(crate) fn check_table(file: &Path, betas: &[f64], trained: bool, rescaled: bool) -> Result<()> {
    if let Some(i) = betas
        .iter()
        .position(|b| !b.is_finite() || !(0.0..=1.0).contains(b))
    {
        let key = if trained {
            "trained_betas"
        } else {
            "beta_start/beta_end"
        };
        let extra = if rescaled {
            " (after rescale_betas_zero_snr)"
        } else {
            ""
        };
        return Err(vdit_core::Error::config(
            file,
            key,
            format!(
                "beta[{i}] = {} lies outside [0, 1]{extra}; betas must be probabilities",
                betas[i]
            ),
        ));
    }
    Ok(())
}

/// The fields every config shares, as the shared scheduler code reads them.
pub(crate) struct Shared<'a> {
    pub betas: BetaSpec<'a>,
    pub rescale_betas_zero_snr: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

/// Sample clipping and dynamic thresholding of x̂₀ (plain DDIM / DDPM).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct X0Clamp {
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
}

/// Thresholding or clipping parameters in range (only those that are in use).
fn check_clamp(file: &Path, c: &X0Clamp) -> Result<()> {
    if c.thresholding {
        check_f64(
            file,
            "dynamic_thresholding_ratio",
            c.dynamic_thresholding_ratio,
            |r| r > 0.0 && r <= 1.0,
            "lie in (0, 1]",
        )?;
        check_f64(
            file,
            "sample_max_value",
            c.sample_max_value,
            |v| v.is_finite() && v > 0.0,
            "be positive",
        )
    } else if c.clip_sample {
        check_f64(
            file,
            "clip_sample_range",
            c.clip_sample_range,
            |v| v.is_finite() && v >= 0.0,
            "be >= 0",
        )
    } else {
        Ok(())
    }
}

/// The crate-private views of a config: `shared()` ([`Shared`]) for every class and, given `clamp`,
/// `clamp()` ([`X0Clamp`]) for the classes with thresholding fields.
macro_rules! views {
    ($cfg:ty $(, $clamp:ident)?) => {
        impl $cfg {
            pub(crate) fn shared(&self) -> Shared<'_> {
                Shared {
                    betas: BetaSpec {
                        schedule: self.beta_schedule,
                        beta_start: self.beta_start,
                        beta_end: self.beta_end,
                        num_train_timesteps: self.num_train_timesteps,
                        trained_betas: self.trained_betas.as_deref(),
                    },
                    rescale_betas_zero_snr: self.rescale_betas_zero_snr,
                    prediction_type: self.prediction_type,
                    timestep_spacing: self.timestep_spacing,
                    steps_offset: self.steps_offset,
                }
            }

            $(
                pub(crate) fn $clamp(&self) -> X0Clamp {
                    X0Clamp {
                        thresholding: self.thresholding,
                        dynamic_thresholding_ratio: self.dynamic_thresholding_ratio,
                        sample_max_value: self.sample_max_value,
                        clip_sample: self.clip_sample,
                        clip_sample_range: self.clip_sample_range,
                    }
                }
            )?
        }
    };
}
views!(CogVideoXSchedulerConfig);
views!(DDIMSchedulerConfig, clamp);
views!(DDPMSchedulerConfig, clamp);

/// `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` (identical fields and defaults).
/// `clip_sample`, `clip_sample_range` and `sample_max_value` are stored but unused, as in diffusers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CogVideoXSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
    /// SNR shift s: ᾱ ← ᾱ/(s + (1−s)ᾱ), applied before the zero-terminal-SNR rescale.
    pub snr_shift_scale: f64,
}

impl Default for CogVideoXSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
            snr_shift_scale: 3.0,
        }
    }
}

impl CogVideoXSchedulerConfig {
    /// CogVideoX-2b (DDIM): v-prediction, trailing, zero terminal SNR, SNR shift 3 (from the model card;
    /// a model folder's own `scheduler_config.json` always wins).
    pub fn cogvideox_2b() -> Self {
        Self {
            clip_sample: false,
            prediction_type: PredictionType::VPrediction,
            timestep_spacing: TimestepSpacing::Trailing,
            rescale_betas_zero_snr: true,
            snr_shift_scale: 3.0,
            ..Self::default()
        }
    }

    /// CogVideoX-5b (DPM): as 2b with SNR shift 1.
    pub fn cogvideox_5b() -> Self {
        Self {
            snr_shift_scale: 1.0,
            ..Self::cogvideox_2b()
        }
    }

    /// Reads a `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        load_validated(path, |c: &Self| c.validate(path, "CogVideoXScheduler"))
    }

    pub fn validate(&self, file: &Path, class: &str) -> Result<()> {
        check_betas(file, class, &self.shared().betas, &SCHEDULES)?;
        check_f64(
            file,
            "snr_shift_scale",
            self.snr_shift_scale,
            |s| s.is_finite() && s > 0.0,
            "be a positive number",
        )
    }
}

/// diffusers' `DDIMScheduler`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDIMSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDIMSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DDIMSchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        load_validated(path, |c: &Self| c.validate(path))
    }

    pub fn validate(&self, file: &Path) -> Result<()> {
        check_betas(file, "DDIMScheduler", &self.shared().betas, &SCHEDULES)?;
        check_clamp(file, &self.clamp())
    }
}

/// diffusers' `DDPMScheduler`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDPMSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDPMSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DDPMSchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        load_validated(path, |c: &Self| c.validate(path))
    }

    pub fn validate(&self, file: &Path) -> Result<()> {
        check_betas(file, "DDPMScheduler", &self.shared().betas, &DDPM_SCHEDULES)?;
        ensure(
            self.variance_type != VarianceType::FixedLargeLog,
            file,
            "variance_type",
            || {
                "fixed_large_log is not supported: diffusers' DDPMScheduler.step takes the square root \
                 of a negative log variance (NaN); use fixed_small, fixed_small_log, fixed_large, learned \
                 or learned_range"
                    .into()
            },
        )?;
        check_clamp(file, &self.clamp())
    }
}
