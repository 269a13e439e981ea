//! What a model must provide to be trained.
//!
//! The trainer knows nothing of layers; a model knows nothing of optimisers or checkpoints
//! (DiT's split). A stage wraps its network(s) in a type implementing [`Trainable`]:
//!
//! - the VAE stage: `vars()` are the VAE's (diffusers keys: `encoder.down_blocks.0...`), `loss`
//!   encodes `batch.pixels`, samples the posterior with `rng`, decodes, and returns
//!   reconstruction + kl_weight·KL, with both parts in `metrics`;
//! - the text stage: `vars()` are the T5 encoder's and the transformer's, named
//!   `text_encoder.<key>` and `transformer.<key>` (component folder + diffusers key); `loss`
//!   tokenizes `batch.captions`, encodes `batch.pixels` with the frozen VAE (a plain tensor
//!   graph outside `vars()`, detached), and calls [`crate::objective`] on the latents.
//!
//! `loss` must be built from differentiable ops only (see [`crate::diffops`]): candle's fast
//! ops return tensors cut from the graph without an error, which the trainer catches by
//! refusing vars that get no gradient.

use crate::data::Batch;
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use vdit_core::Result;

/// The loss of one micro-batch.
pub struct LossOutput {
    /// A scalar (rank 0) f32 tensor connected to every var.
    pub loss: Tensor,
    /// Extra numbers to log (e.g. `recon`, `kl`), averaged over micro-batches.
    pub metrics: Vec<(String, f64)>,
}

impl LossOutput {
    pub fn new(loss: Tensor) -> Self {
        Self {
            loss,
            metrics: Vec::new(),
        }
    }
}

/// A model the trainer can optimise.
pub trait Trainable {
    /// Every trainable var with its checkpoint name (unique). Frozen parts are not listed.
    /// The same vars (not copies) must be returned on every call.
    fn vars(&self) -> Vec<(String, Var)>;

    /// The loss of `batch`. All randomness (timesteps, noise, posterior samples, dropout) must
    /// come from `rng`, a stream that is a pure function of (seed, step), so a resumed run draws
    /// the same numbers.
    fn loss(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<LossOutput>;

    /// Writes the trained model for inference into `dir` (e.g. a diffusers component folder:
    /// `config.json` and `diffusion_pytorch_model.safetensors`) from `weights`, the EMA weights
    /// when EMA is on, else the final ones, by var name. Called at the end of a run.
    /// Default: nothing.
    fn export(&self, _dir: &Path, _weights: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
}
