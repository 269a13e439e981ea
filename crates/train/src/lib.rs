//! vdit-train: the model-independent half of vdit's trainer (`vdit train --config FILE`).
//!
//! - [`config`]: [`TrainConfig`], one struct with commented defaults, read from JSON or TOML.
//! - [`data`]: Shapes World batches by bucket (size x length), a pure function of (seed, step);
//!   pixels `[B, 3, F, H, W]` in [-1, 1] with captions.
//! - [`objective`]: the diffusion loss (timesteps, noise, x_t, v target, CogVideoX weighting).
//! - [`optim`]: AdamW with checkpointable state, warmup + cosine schedule, global-norm clipping,
//!   EMA.
//! - [`trainable`]: the [`Trainable`] trait a model implements to be trained.
//! - [`init`]: [`SeededVarMap`], a `VarBuilder` backend making seeded, named vars.
//! - [`trainer`]: the loop, with progress/stop callback; [`checkpoint`]: exact save/resume;
//!   [`log`] and [`plot`]: `loss.jsonl` and `loss.png`.
//! - [`diffops`]: differentiable forms of norms, softmax, attention, conv3d, resizing;
//!   [`gradcheck`]: finite-difference checks and the every-var-gets-a-gradient check.
//! - [`toy`]: a small conv net that proves the loop; [`stages`]: `stage` → model.
//!
//! Output folder: `config.json`, `loss.jsonl`, `loss.png`, `checkpoints/step-NNNNNNNN/`,
//! `export/` (the model's inference files, EMA weights, written at the end).

pub mod checkpoint;
pub mod cogvideox_train;
pub mod config;
pub mod data;
pub mod diffops;
pub mod gradcheck;
pub mod init;
pub mod log;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod stages;
pub mod t2v_stage;
pub mod t5_train;
pub mod toy;
pub mod trainable;
pub mod trainer;
pub mod vae_stage;
pub mod vae_train;
pub mod word_tokenizer;

pub use config::{Stage, TrainConfig};
pub use data::{Batch, Bucket};
pub use init::SeededVarMap;
pub use log::LogRecord;
pub use trainable::{component, save_weights, LossOutput, Trainable};
pub use trainer::{train, Control, Progress, Summary};
