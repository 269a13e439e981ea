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

    /// Whether `name` (a tensor of an `init_from` checkpoint) is a part the model keeps frozen
    /// and loads itself, so the trainer does not look for a var of that name. Default: none.
    fn frozen(&self, _name: &str) -> bool {
        false
    }
}

/// The weights named `<prefix>.<key>`, renamed `<key>`: one component of a joint stage (e.g.
/// `component(weights, "transformer")` for `transformer/diffusion_pytorch_model.safetensors`).
pub fn component(weights: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    let p = format!("{prefix}.");
    weights
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
        .collect()
}

/// Writes named weights as one safetensors file (contiguous f32 as they are).
pub fn save_weights(path: &Path, weights: &[(String, Tensor)]) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = weights.iter().cloned().collect();
    if map.len() != weights.len() {
        return Err(vdit_core::Error::Weights(format!(
            "{}: duplicate tensor names",
            path.display()
        )));
    }
    candle_core::safetensors::save(&map, path)
        .map_err(|e| vdit_core::Error::Weights(format!("{}: cannot write: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn components_split_by_prefix() {
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let w = vec![
            ("text_encoder.shared.weight".to_string(), t.clone()),
            ("transformer.proj_out.bias".to_string(), t.clone()),
            ("transformerx.bias".to_string(), t),
        ];
        let c: Vec<String> = component(&w, "transformer")
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(c, vec!["proj_out.bias"]);
        let dir = std::env::temp_dir().join(format!("vdit-train-comp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        save_weights(&p, &component(&w, "text_encoder")).unwrap();
        let back = vdit_core::testing::load_tensors(&p).unwrap();
        assert!(back.contains_key("shared.weight") && back.len() == 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
