//! The toy stage: a two-layer 3-D conv net trained with the real diffusion objective on Shapes
//! World clips, standing in for the VAE + transformer so the loop, logging, checkpoints and
//! resume can be proven without the model crate.
//!
//! "Latents" are the pixels average-pooled by `pool` (`[B, F, 3, H/pool, W/pool]`, the
//! transformer's layout). The net predicts v from x_t and t:
//! conv3d(3 → C, 3x3x3) + Linear(sinusoidal(t)) → GroupNorm → SiLU → conv3d(C → 3, 3x3x3).

use crate::config::{LossWeighting, TrainConfig};
use crate::data::Batch;
use crate::diffops::{conv3d, group_norm, linear, silu};
use crate::init::SeededVarMap;
use crate::objective::{diffusion_loss, sample_noised};
use crate::trainable::{LossOutput, Trainable};
use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use vdit_core::{Error, Result};
use vdit_schedulers::CogVideoXDDIMScheduler;

/// `[model]` of a toy config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToyConfig {
    /// Hidden channels. Default 16.
    pub channels: usize,
    /// GroupNorm groups (must divide `channels`). Default 4.
    pub groups: usize,
    /// Spatial average pooling from pixels to "latents" (must divide the bucket sizes). Default 4.
    pub pool: usize,
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            channels: 16,
            groups: 4,
            pool: 4,
        }
    }
}

pub struct ToyModel {
    cfg: ToyConfig,
    vars: SeededVarMap,
    conv_in: (Tensor, Tensor),
    time_proj: (Tensor, Tensor),
    norm: (Tensor, Tensor),
    conv_out: (Tensor, Tensor),
    sched: CogVideoXDDIMScheduler,
    weighting: LossWeighting,
}

impl ToyModel {
    /// Builds the toy from a run's config (`[model]` read as [`ToyConfig`]), with weights
    /// seeded by `cfg.seed`.
    pub fn new(cfg: &TrainConfig, dev: &Device) -> Result<Self> {
        let file = Path::new("<config>");
        let tc: ToyConfig = serde_path_to_error::deserialize(cfg.model.clone()).map_err(|e| {
            Error::config(file, format!("model.{}", e.path()), e.inner().to_string())
        })?;
        if tc.channels == 0
            || tc.groups == 0
            || !tc.channels.is_multiple_of(tc.groups)
            || !tc.channels.is_multiple_of(2)
        {
            return Err(Error::config(
                file,
                "model.channels",
                format!(
                    "expected an even number divisible by groups ({}), found {}",
                    tc.groups, tc.channels
                ),
            ));
        }
        if tc.pool == 0 {
            return Err(Error::config(
                file,
                "model.pool",
                "expected at least 1, found 0",
            ));
        }
        for (i, b) in cfg.data.buckets.iter().enumerate() {
            if b.width % tc.pool != 0 || b.height % tc.pool != 0 {
                return Err(Error::config(
                    file,
                    format!("data.buckets[{i}]"),
                    format!(
                        "{}x{} is not divisible by model.pool = {}",
                        b.width, b.height, tc.pool
                    ),
                ));
            }
        }
        let vars = SeededVarMap::new(cfg.seed);
        let vb = vars.var_builder(DType::F32, dev);
        let c = tc.channels;
        let pair = |name: &str, w: &[usize]| -> Result<(Tensor, Tensor)> {
            let p = vb.pp(name);
            Ok((p.get(w, "weight")?, p.get(w[0], "bias")?))
        };
        let conv_in = pair("conv_in", &[c, 3, 3, 3, 3])?;
        let time_proj = pair("time_proj", &[c, c])?;
        let norm = pair("norm", &[c])?;
        let conv_out = pair("conv_out", &[3, c, 3, 3, 3])?;
        let sched = CogVideoXDDIMScheduler::with_file(
            cfg.diffusion.scheduler.clone(),
            "<config> diffusion.scheduler".into(),
        )?;
        Ok(Self {
            cfg: tc,
            vars,
            conv_in,
            time_proj,
            norm,
            conv_out,
            sched,
            weighting: cfg.diffusion.weighting,
        })
    }

    /// Pixels `[B, 3, F, H, W]` to toy latents `[B, F, 3, H/pool, W/pool]`.
    pub fn latents(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = pixels.dims5()?;
        let p = self.cfg.pool;
        // [B, 3, F, H, W] -> [B, F, 3, H, W] -> [B*F, 3, H, W]
        let x = pixels.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?;
        let x = x.avg_pool2d(p)?;
        // [B*F, 3, h, w] -> [B, F, 3, h, w]
        Ok(x.reshape((b, f, c, h / p, w / p))?.detach())
    }

    /// Sinusoidal features of the timesteps, `[B, C]` (sin half, cos half).
    fn time_features(&self, ts: &[usize], dev: &Device) -> Result<Tensor> {
        let half = self.cfg.channels / 2;
        let mut v = Vec::with_capacity(ts.len() * 2 * half);
        for &t in ts {
            let (mut s, mut c) = (Vec::with_capacity(half), Vec::with_capacity(half));
            for i in 0..half {
                let freq = (-(10000f64.ln()) * i as f64 / half as f64).exp();
                s.push((t as f64 * freq).sin() as f32);
                c.push((t as f64 * freq).cos() as f32);
            }
            v.extend(s);
            v.extend(c);
        }
        Ok(Tensor::from_vec(v, (ts.len(), 2 * half), dev)?)
    }

    /// The v-prediction for x_t `[B, F, 3, h, w]` at timesteps `ts`.
    pub fn forward(&self, xt: &Tensor, ts: &[usize]) -> Result<Tensor> {
        let b = xt.dim(0)?;
        let c = self.cfg.channels;
        // [B, F, 3, h, w] -> [B, 3, F, h, w]
        let x = xt.permute((0, 2, 1, 3, 4))?;
        let h = conv3d(&x, &self.conv_in.0, Some(&self.conv_in.1), 1, 1, 1, 1)?; // [B, C, F, h, w]
        let temb = linear(
            &self.time_features(ts, xt.device())?,
            &self.time_proj.0,
            Some(&self.time_proj.1),
        )?
        .reshape((b, c, 1, 1, 1))?;
        let h = h.broadcast_add(&temb)?;
        let h = silu(&group_norm(
            &h,
            self.cfg.groups,
            Some(&self.norm.0),
            Some(&self.norm.1),
            1e-6,
        )?)?;
        let out = conv3d(&h, &self.conv_out.0, Some(&self.conv_out.1), 1, 1, 1, 1)?; // [B, 3, F, h, w]
                                                                                     // [B, 3, F, h, w] -> [B, F, 3, h, w]
        Ok(out.permute((0, 2, 1, 3, 4))?.contiguous()?)
    }
}

impl Trainable for ToyModel {
    fn vars(&self) -> Vec<(String, Var)> {
        self.vars.vars()
    }

    fn loss(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<LossOutput> {
        let x0 = self.latents(&batch.pixels)?;
        let nb = sample_noised(&self.sched, &x0, rng)?;
        let pred = self.forward(&nb.noisy, &nb.timesteps)?;
        let loss = diffusion_loss(&self.sched, &pred, &nb, &x0, self.weighting, None)?;
        Ok(LossOutput::new(loss))
    }

    fn export(&self, dir: &Path, weights: &[(String, Tensor)]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::trainable::save_weights(&dir.join("toy.safetensors"), weights)?;
        let json = serde_json::to_vec_pretty(&self.cfg).map_err(|e| Error::Msg(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join("config.json"), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batches_for_step;
    use crate::gradcheck::assert_all_vars_get_grads;

    #[test]
    fn every_toy_var_gets_a_gradient() {
        let cfg = TrainConfig {
            model: serde_json::json!({"channels": 8, "groups": 2}),
            ..Default::default()
        };
        let dev = Device::Cpu;
        let m = ToyModel::new(&cfg, &dev).unwrap();
        let vars = m.vars();
        assert_eq!(vars.len(), 8);
        let b = &batches_for_step(&cfg.data, 0, 0, 2, 1, 0, &dev).unwrap()[0];
        let mut rng = crate::data::step_rng(0, "loss", 0);
        let out = m.loss(b, &mut rng).unwrap();
        assert_eq!(out.loss.rank(), 0);
        let g = out.loss.backward().unwrap();
        assert_all_vars_get_grads(&vars, &g).unwrap();
    }

    #[test]
    fn bad_model_settings_name_the_key() {
        let cfg = TrainConfig {
            model: serde_json::json!({"channels": 6, "groups": 4}),
            ..Default::default()
        };
        let e = ToyModel::new(&cfg, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("model.channels"), "{e}");
        let cfg = TrainConfig {
            model: serde_json::json!({"chanels": 8}),
            ..Default::default()
        };
        let e = ToyModel::new(&cfg, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("chanels"), "{e}");
        let cfg = TrainConfig {
            model: serde_json::json!({"pool": 5}),
            ..Default::default()
        };
        let e = ToyModel::new(&cfg, &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("data.buckets[0]") && e.contains("pool = 5"),
            "{e}"
        );
    }
}
