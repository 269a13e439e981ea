//! vdit-core: the pieces every other crate stands on.
//!
//! - [`error`]: one typed error for the libraries; every message names the file, key or flag.
//! - [`config`]: reading diffusers `config.json` / `scheduler_config.json` with upstream names.
//! - [`weights`]: memory-mapped safetensors (one file or sharded) behind a shape-checked
//!   `VarBuilder` that also reports tensors the model never asked for.
//! - [`folder`]: a diffusers pipeline folder (`model_index.json` and its components).
//! - [`device`], [`rng`]: device/dtype selection and the seeded noise generator.
//! - [`testing`]: helpers for parity tests against reference fixtures.

pub mod config;
pub mod device;
pub mod error;
pub mod folder;
pub mod rng;
pub mod testing;
pub mod weights;

pub use error::{Error, Result};
