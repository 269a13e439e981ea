//! AdamW over named vars, the learning-rate schedule, global-norm clipping and the weight EMA.
//!
//! Our own AdamW (candle_nn's hides its moments) so that a checkpoint holds its exact state:
//! the first and second moments of every var, by name, and the step count. The update is
//! torch.optim.AdamW's (Loshchilov & Hutter 2019, decoupled weight decay):
//! θ ← θ(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
//! θ ← θ − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε).
//! Vars are visited in name order, so every reduction (the gradient norm) is deterministic.

use crate::config::{EmaConfig, OptimConfig};
use candle_core::{DType, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use vdit_core::{Error, Result};

/// Named trainable vars, sorted by name.
pub type NamedVars = Vec<(String, Var)>;

/// The learning rate of step `step` (0-based) of a `total`-step run: linear warmup to `lr` over
/// `warmup_steps` (step k uses lr·(k+1)/warmup), then a half cosine from `lr` down to `min_lr`
/// ending at `decay_steps` (0: `total`), then `min_lr`.
pub fn lr_at(cfg: &OptimConfig, total: u64, step: u64) -> f64 {
    let warm = cfg.warmup_steps;
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let end = if cfg.decay_steps == 0 {
        total
    } else {
        cfg.decay_steps
    };
    if step >= end || end <= warm {
        return cfg.min_lr;
    }
    let progress = (step - warm) as f64 / (end - warm) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (when
/// `max_norm > 0`), as torch's `clip_grad_norm_` (coefficient max_norm / (norm + 1e-6)).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

/// The L2 norm over all gradients, accumulated in f64 in name order.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// AdamW's state: the moments of each var and the number of steps taken.
pub struct AdamW {
    cfg: OptimConfig,
    /// name -> (m, v, decay?)
    state: BTreeMap<String, Moments>,
    step: u64,
}

struct Moments {
    m: Tensor,
    v: Tensor,
    decay: bool,
    /// The factor on lr of this var (`cfg.lr_scale`).
    lr_scale: f64,
}

impl AdamW {
    /// Zero moments for `vars`; which vars decay follows `cfg.no_decay_1d` and `cfg.no_decay`,
    /// each var's factor on lr `cfg.lr_scale` (a key that matches no var is an error).
    pub fn new(cfg: &OptimConfig, vars: &NamedVars) -> Result<Self> {
        if let Some(key) = cfg
            .lr_scale
            .keys()
            .find(|k| !vars.iter().any(|(n, _)| n.starts_with(k.as_str())))
        {
            let roots: std::collections::BTreeSet<&str> = vars
                .iter()
                .map(|(n, _)| n.split('.').next().unwrap_or(n))
                .collect();
            return Err(Error::invalid(
                format!("optim.lr_scale.\"{key}\""),
                format!(
                    "matches no trainable var (their names start with: {})",
                    roots.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let mut state = BTreeMap::new();
        for (name, var) in vars {
            let t = var.as_tensor();
            let decay = !((cfg.no_decay_1d && t.rank() <= 1)
                || cfg.no_decay.iter().any(|p| name.contains(p.as_str())));
            let lr_scale = cfg
                .lr_scale
                .iter()
                .filter(|(k, _)| name.starts_with(k.as_str()))
                .max_by_key(|(k, _)| k.len())
                .map_or(1.0, |(_, v)| *v);
            state.insert(
                name.clone(),
                Moments {
                    m: t.zeros_like()?,
                    v: t.zeros_like()?,
                    decay,
                    lr_scale,
                },
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            state,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Whether weight decay applies to `name`.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.state.get(name).map(|s| s.decay)
    }

    /// One update of every var with a gradient in `grads` at learning rate `lr`. Vars without a
    /// gradient are left alone (their moments too), as in torch.
    pub fn step(
        &mut self,
        vars: &NamedVars,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let s = self
                .state
                .get_mut(name)
                .ok_or_else(|| Error::Msg(format!("AdamW: no state for var {name:?}")))?;
            let lr = lr * s.lr_scale;
            let step_size = lr / bc1;
            let g = g.to_dtype(s.m.dtype())?;
            s.m = (s.m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            s.v = (s.v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = s.v.sqrt()?.affine(1.0 / bc2_sqrt, self.cfg.eps)?;
            let update = (&s.m / denom)?.affine(step_size, 0.0)?;
            let theta = var.as_tensor().detach();
            let theta = if s.decay && self.cfg.weight_decay > 0.0 {
                theta.affine(1.0 - lr * self.cfg.weight_decay, 0.0)?
            } else {
                theta
            };
            var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// The state to checkpoint: `exp_avg.<name>` and `exp_avg_sq.<name>` tensors (torch's
    /// names) and the step count.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for (name, s) in &self.state {
            out.insert(format!("exp_avg.{name}"), s.m.clone());
            out.insert(format!("exp_avg_sq.{name}"), s.v.clone());
        }
        (out, self.step)
    }

    /// Restores what [`state_tensors`](Self::state_tensors) saved; every var must be there
    /// with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, s) in self.state.iter_mut() {
            for (key, slot) in [
                (format!("exp_avg.{name}"), &mut s.m),
                (format!("exp_avg_sq.{name}"), &mut s.v),
            ] {
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Weights(format!("optimiser state: missing tensor {key:?}"))
                })?;
                if t.dims() != slot.dims() {
                    return Err(Error::Weights(format!(
                        "optimiser state: {key:?} has shape {:?}, the var has {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                *slot = t.to_dtype(slot.dtype())?.to_device(slot.device())?;
            }
        }
        let expected = 2 * self.state.len();
        if tensors.len() != expected {
            return Err(Error::Weights(format!(
                "optimiser state: {} tensors, expected {expected} (2 per var): the model's vars changed",
                tensors.len()
            )));
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of the vars: shadow ← d·shadow + (1−d)·θ after each step.
pub struct Ema {
    decay: f64,
    warmup: bool,
    shadow: BTreeMap<String, Tensor>,
    updates: u64,
}

impl Ema {
    /// Starts from the vars' current values. `None` when `cfg.decay` is 0 (EMA off).
    pub fn new(cfg: &EmaConfig, vars: &NamedVars) -> Result<Option<Self>> {
        if cfg.decay == 0.0 {
            return Ok(None);
        }
        let mut shadow = BTreeMap::new();
        for (name, v) in vars {
            // A copy, not a view of the var's storage.
            shadow.insert(name.clone(), v.as_tensor().copy()?.detach());
        }
        Ok(Some(Self {
            decay: cfg.decay,
            warmup: cfg.warmup,
            shadow,
            updates: 0,
        }))
    }

    /// The decay of the next update: `decay`, or min(decay, (1+n)/(10+n)) with warmup.
    pub fn current_decay(&self) -> f64 {
        if self.warmup {
            let n = self.updates as f64;
            self.decay.min((1.0 + n) / (10.0 + n))
        } else {
            self.decay
        }
    }

    pub fn update(&mut self, vars: &NamedVars) -> Result<()> {
        let d = self.current_decay();
        for (name, v) in vars {
            let s = self
                .shadow
                .get_mut(name)
                .ok_or_else(|| Error::Msg(format!("EMA: no shadow for var {name:?}")))?;
            *s = (s.affine(d, 0.0)? + v.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
        }
        self.updates += 1;
        Ok(())
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The averaged weights by name.
    pub fn weights(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Restores the shadow weights and update count from a checkpoint.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        for (name, s) in self.shadow.iter_mut() {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Weights(format!("EMA weights: missing tensor {name:?}")))?;
            if t.dims() != s.dims() {
                return Err(Error::Weights(format!(
                    "EMA weights: {name:?} has shape {:?}, the var has {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
            *s = t.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        if tensors.len() != self.shadow.len() {
            return Err(Error::Weights(format!(
                "EMA weights: {} tensors, the model has {} vars",
                tensors.len(),
                self.shadow.len()
            )));
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 10,
            decay_steps: 0,
            ..Default::default()
        }
    }

    #[test]
    fn lr_schedule_warms_up_then_decays_to_the_floor() {
        let c = cfg();
        assert!((lr_at(&c, 110, 0) - 1e-3).abs() < 1e-15);
        assert!((lr_at(&c, 110, 9) - 1e-2).abs() < 1e-15);
        assert!((lr_at(&c, 110, 10) - 1e-2).abs() < 1e-15);
        // Half way through the cosine: the mean of peak and floor.
        assert!((lr_at(&c, 110, 60) - 5.5e-3).abs() < 1e-12);
        assert!(lr_at(&c, 110, 109) > 1e-3 && lr_at(&c, 110, 109) < 1.01e-3);
        assert_eq!(lr_at(&c, 110, 110), 1e-3);
        let mut prev = f64::INFINITY;
        for s in 10..110 {
            let l = lr_at(&c, 110, s);
            assert!(l <= prev);
            prev = l;
        }
        let c2 = OptimConfig {
            decay_steps: 50,
            ..cfg()
        };
        assert_eq!(lr_at(&c2, 1000, 50), 1e-3);
        assert_eq!(lr_at(&c2, 1000, 700), 1e-3);
        assert!((lr_at(&c2, 1000, 30) - 5.5e-3).abs() < 1e-12);
    }

    /// Three AdamW steps on known numbers, against the update written out in f64 (torch's
    /// AdamW arithmetic).
    #[test]
    fn adamw_matches_the_reference_update() {
        let dev = Device::Cpu;
        let c = OptimConfig {
            weight_decay: 0.1,
            no_decay_1d: false,
            ..cfg()
        };
        let w0 = [0.5f32, -1.0, 2.0];
        let b0 = [0.25f32];
        let vars: NamedVars = vec![
            ("b".into(), Var::new(&b0, &dev).unwrap()),
            ("w".into(), Var::new(&w0, &dev).unwrap()),
        ];
        let mut opt = AdamW::new(&c, &vars).unwrap();
        assert_eq!(opt.decays("w"), Some(true));
        assert_eq!(opt.decays("b"), Some(true));
        let grads_seq = [[0.1f32, -0.2, 0.3], [0.05, 0.0, -0.4], [1.0, 2.0, -3.0]];
        let mut want = w0.map(|x| x as f64);
        let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
        for (k, gs) in grads_seq.iter().enumerate() {
            let lr = 0.01 * (k + 1) as f64;
            let mut grads = BTreeMap::new();
            grads.insert("w".to_string(), Tensor::new(gs, &dev).unwrap());
            opt.step(&vars, &grads, lr).unwrap();
            let t = (k + 1) as i32;
            for i in 0..3 {
                let g = gs[i] as f64;
                want[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                want[i] -= lr / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got = vars[1].1.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
        // The var without gradients did not move.
        assert_eq!(vars[0].1.as_tensor().to_vec1::<f32>().unwrap(), b0);
        assert_eq!(opt.steps(), 3);
    }

    /// `lr_scale`: each var steps as AdamW alone at lr × its factor (weight decay too), the
    /// longest matching prefix wins, 0 keeps a var still, and a key that matches no var is an
    /// error naming it.
    #[test]
    fn lr_scale_gives_parts_their_own_learning_rate() {
        let dev = Device::Cpu;
        let base = OptimConfig {
            weight_decay: 0.1,
            no_decay_1d: false,
            ..cfg()
        };
        let c = OptimConfig {
            lr_scale: [("enc.".to_string(), 0.25), ("enc.frozen".to_string(), 0.0)].into(),
            ..base.clone()
        };
        let init = [[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75], [3.0, -2.0, 0.5]];
        let names = ["dec.w", "enc.w", "enc.frozen.w"];
        let make = || -> NamedVars {
            names
                .iter()
                .zip(&init)
                .map(|(n, w)| (n.to_string(), Var::new(w, &dev).unwrap()))
                .collect()
        };
        let vars = make();
        let mut opt = AdamW::new(&c, &vars).unwrap();
        // The reference: one plain AdamW per var, at lr × the factor it should get.
        let refs: Vec<NamedVars> = make().into_iter().map(|v| vec![v]).collect();
        let mut ref_opts: Vec<AdamW> = refs.iter().map(|v| AdamW::new(&base, v).unwrap()).collect();
        let grads_seq = [[0.1f32, -0.2, 0.3], [0.05, 0.0, -0.4], [1.0, 2.0, -3.0]];
        for (k, gs) in grads_seq.iter().enumerate() {
            let lr = 0.01 * (k + 1) as f64;
            let g = Tensor::new(gs, &dev).unwrap();
            let grads: BTreeMap<String, Tensor> =
                names.iter().map(|n| (n.to_string(), g.clone())).collect();
            opt.step(&vars, &grads, lr).unwrap();
            for ((r, o), f) in refs.iter().zip(&mut ref_opts).zip([1.0, 0.25, 0.0]) {
                o.step(r, &grads, lr * f).unwrap();
            }
        }
        for (i, (name, var)) in vars.iter().enumerate() {
            let got = var.as_tensor().to_vec1::<f32>().unwrap();
            let want = refs[i][0].1.as_tensor().to_vec1::<f32>().unwrap();
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(vars[2].1.as_tensor().to_vec1::<f32>().unwrap(), init[2]);
        assert_ne!(vars[1].1.as_tensor().to_vec1::<f32>().unwrap(), init[1]);

        let bad = OptimConfig {
            lr_scale: [("text_encoder.".to_string(), 0.5)].into(),
            ..base
        };
        let e = AdamW::new(&bad, &vars).err().unwrap().to_string();
        assert!(
            e.contains("optim.lr_scale") && e.contains("text_encoder.") && e.contains("dec, enc"),
            "{e}"
        );
    }

    #[test]
    fn no_decay_rules() {
        let dev = Device::Cpu;
        let c = OptimConfig {
            no_decay: vec!["embed".into()],
            ..cfg()
        };
        let vars: NamedVars = vec![
            (
                "norm.weight".into(),
                Var::zeros(4, DType::F32, &dev).unwrap(),
            ),
            (
                "proj.weight".into(),
                Var::zeros((4, 4), DType::F32, &dev).unwrap(),
            ),
            (
                "embed.weight".into(),
                Var::zeros((4, 4), DType::F32, &dev).unwrap(),
            ),
        ];
        let opt = AdamW::new(&c, &vars).unwrap();
        assert_eq!(opt.decays("norm.weight"), Some(false));
        assert_eq!(opt.decays("proj.weight"), Some(true));
        assert_eq!(opt.decays("embed.weight"), Some(false));
        // Decay alone (zero gradient) shrinks decayed vars by (1 - lr wd) exactly.
        let c = OptimConfig {
            weight_decay: 0.5,
            no_decay_1d: true,
            ..cfg()
        };
        let vars: NamedVars = vec![
            ("a".into(), Var::new(&[2f32], &dev).unwrap()),
            ("w".into(), Var::new(&[[2f32]], &dev).unwrap()),
        ];
        let mut opt = AdamW::new(&c, &vars).unwrap();
        let mut grads = BTreeMap::new();
        grads.insert("a".to_string(), Tensor::new(&[0f32], &dev).unwrap());
        grads.insert("w".to_string(), Tensor::new(&[[0f32]], &dev).unwrap());
        opt.step(&vars, &grads, 0.1).unwrap();
        assert_eq!(vars[0].1.as_tensor().to_vec1::<f32>().unwrap(), [2.0]);
        assert_eq!(vars[1].1.as_tensor().to_vec2::<f32>().unwrap(), [[1.9]]);
    }

    #[test]
    fn clipping_reports_the_pre_clip_norm() {
        let dev = Device::Cpu;
        let mut g = BTreeMap::new();
        g.insert("a".to_string(), Tensor::new(&[3f32], &dev).unwrap());
        g.insert("b".to_string(), Tensor::new(&[[4f32]], &dev).unwrap());
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        let after = global_norm(&g).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        assert!((g["a"].to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-6);
        // Below the threshold: untouched.
        let n = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n - after).abs() < 1e-12);
        assert!((global_norm(&g).unwrap() - after).abs() < 1e-12);
    }

    #[test]
    fn ema_with_and_without_warmup() {
        let dev = Device::Cpu;
        let vars: NamedVars = vec![("w".into(), Var::new(&[0f32], &dev).unwrap())];
        let mut ema = Ema::new(
            &EmaConfig {
                decay: 0.9,
                warmup: false,
            },
            &vars,
        )
        .unwrap()
        .unwrap();
        vars[0].1.set(&Tensor::new(&[1f32], &dev).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        ema.update(&vars).unwrap();
        // 0 -> 0.1 -> 0.19
        let s = ema.weights()["w"].to_vec1::<f32>().unwrap()[0];
        assert!((s - 0.19).abs() < 1e-6, "{s}");
        let mut ema = Ema::new(
            &EmaConfig {
                decay: 0.9,
                warmup: true,
            },
            &vars,
        )
        .unwrap()
        .unwrap();
        // Starts from the current value 1.0; decays 0.1, 2/11, 3/12, ...
        assert!((ema.current_decay() - 0.1).abs() < 1e-12);
        vars[0].1.set(&Tensor::new(&[0f32], &dev).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        assert!((ema.weights()["w"].to_vec1::<f32>().unwrap()[0] - 0.1).abs() < 1e-7);
        assert!((ema.current_decay() - 2.0 / 11.0).abs() < 1e-12);
        for _ in 0..200 {
            ema.update(&vars).unwrap();
        }
        assert_eq!(ema.current_decay(), 0.9);
        assert!(Ema::new(
            &EmaConfig {
                decay: 0.0,
                warmup: true
            },
            &vars
        )
        .unwrap()
        .is_none());
    }
}
