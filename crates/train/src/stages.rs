//! Stage builders: `stage` in the config picks the model the loop trains.
//!
//! To plug a stage in, write a type implementing [`Trainable`] (in this crate, once it may
//! depend on vdit-models) and add its arm to [`build`]: it reads its settings from
//! `cfg.model`, builds its vars through a [`crate::init::SeededVarMap`] seeded with
//! `cfg.seed`, and returns itself boxed.

use crate::config::{Stage, TrainConfig};
use crate::trainable::Trainable;
use crate::trainer::{train, Control, Progress, Summary};
use candle_core::Device;
use vdit_core::Result;

/// The model of `cfg.stage`, with fresh seeded weights.
pub fn build(cfg: &TrainConfig, dev: &Device) -> Result<Box<dyn Trainable>> {
    match cfg.stage {
        Stage::Toy => Ok(Box::new(crate::toy::ToyModel::new(cfg, dev)?)),
        Stage::Vae => Ok(Box::new(crate::vae_stage::VaeStage::new(cfg, dev)?)),
        Stage::Transformer => Ok(Box::new(crate::t2v_stage::TextToVideoStage::new(cfg, dev)?)),
    }
}

/// Builds the stage's model on the CPU and trains it.
pub fn run(
    cfg: &TrainConfig,
    resume: bool,
    on_progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Summary> {
    let dev = Device::Cpu;
    let model = build(cfg, &dev)?;
    train(cfg, model.as_ref(), &dev, resume, on_progress)
}
