//! Seeded, named trainable variables behind a candle `VarBuilder`.
//!
//! Models are built with `new(cfg, vb)` and `vb.pp("<checkpoint key>")`, so a var's name is its
//! diffusers key. [`SeededVarMap`] is the `VarBuilder` backend for training from scratch: every
//! tensor asked for becomes a `Var` whose initial values come from a ChaCha8 stream keyed by
//! (seed, name) — reproducible, and independent of the order layers are built in (candle's own
//! `VarMap` draws from an unseeded thread RNG). `vars()` lists them by name for the optimiser
//! and the checkpoint.
//!
//! Initialisation follows the hint the layer gives (`candle_nn::linear` asks for Kaiming
//! uniform, for example). `vb.get(shape, name)` gives no hint (candle's default is the constant
//! 0), so an unhinted zero request goes to a name rule instead, [`default_rule`]: biases 0,
//! rank-1 weights (norm scales) 1, embeddings N(0, 1), other weights torch's default
//! U(±1/√fan_in). A model that wants something else passes its own rule.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::Init;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use vdit_core::{Error, Result};

/// Chooses the initialisation of var `name` of `shape` given the layer's hint.
pub type InitRule = Arc<dyn Fn(&str, &[usize], Init) -> Init + Send + Sync>;

/// The rule used unless a model passes its own (see the module docs).
pub fn default_rule(name: &str, shape: &[usize], hint: Init) -> Init {
    match hint {
        Init::Const(0.0) => {}
        other => return other,
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.ends_with("bias") {
        return Init::Const(0.0);
    }
    if shape.len() <= 1 {
        return if last == "weight" || last == "scale" {
            Init::Const(1.0)
        } else {
            Init::Const(0.0)
        };
    }
    let lname = name.to_ascii_lowercase();
    if lname.contains("embed") || lname.contains("shared") {
        return Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
    }
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A `VarBuilder` backend that creates seeded, named `Var`s on first request and returns the
/// same var on later requests of the same name. Cloning shares the map.
#[derive(Clone)]
pub struct SeededVarMap {
    seed: u64,
    rule: InitRule,
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

/// FNV-1a, a stable hash of a var name.
fn name_hash(name: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self::with_rule(seed, Arc::new(default_rule))
    }

    pub fn with_rule(seed: u64, rule: InitRule) -> Self {
        Self {
            seed,
            rule,
            vars: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// A `VarBuilder` over this map (f32 unless `dtype` says otherwise).
    pub fn var_builder(&self, dtype: DType, dev: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, dev.clone())
    }

    /// Every var created so far, by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let m = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Sets vars from `tensors` (e.g. a checkpoint); every var must be present with its shape,
    /// and no tensor may be left over.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let m = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in m.iter() {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Weights(format!("{what}: missing tensor {name:?}")))?;
            if t.dims() != var.dims() {
                return Err(Error::Weights(format!(
                    "{what}: {name:?} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        if let Some(extra) = tensors.keys().find(|k| !m.contains_key(*k)) {
            return Err(Error::Weights(format!(
                "{what}: tensor {extra:?} matches no var of the model"
            )));
        }
        Ok(())
    }

    /// The initial values of var `name`, drawn from its own stream.
    fn sample(&self, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(name_hash(name));
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> f32 {
            let z: f64 = StandardNormal.sample(rng);
            (mean + std * z) as f32
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
            Init::Uniform { lo, up } => (0..n)
                .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
                .collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = match fan {
                    FanInOut::FanIn => FanInOut::FanIn.for_shape(shape),
                    FanInOut::FanOut => FanInOut::FanOut.for_shape(shape),
                };
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| (-b + 2.0 * b * rng.random::<f64>()) as f32)
                            .collect()
                    }
                    NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                }
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut m = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = m.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "var {name:?} requested with shape {s:?}, created earlier with {:?}",
                    v.shape()
                );
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let init = (self.rule)(name, s.dims(), h);
        let data = self.sample(name, &s, init);
        let t = Tensor::from_vec(data, s, dev)?.to_dtype(dtype)?;
        let v = Var::from_tensor(&t)?;
        m.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let m = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("var {name:?} has not been created (no shape known)"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let m = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        m.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Module;

    #[test]
    fn vars_are_seeded_by_name_not_by_order() {
        let dev = Device::Cpu;
        let a = SeededVarMap::new(7);
        let vb = a.var_builder(DType::F32, &dev);
        let x1 = vb.pp("proj").get((4, 3), "weight").unwrap();
        let y1 = vb.pp("norm").get(4, "weight").unwrap();
        let b = SeededVarMap::new(7);
        let vb = b.var_builder(DType::F32, &dev);
        let y2 = vb.pp("norm").get(4, "weight").unwrap();
        let x2 = vb.pp("proj").get((4, 3), "weight").unwrap();
        assert_eq!(x1.to_vec2::<f32>().unwrap(), x2.to_vec2::<f32>().unwrap());
        assert_eq!(y1.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert_eq!(y2.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        let names: Vec<String> = a.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["norm.weight", "proj.weight"]);
        // Other seed, other values; bound 1/sqrt(3).
        let c = SeededVarMap::new(8);
        let x3 = c
            .var_builder(DType::F32, &dev)
            .pp("proj")
            .get((4, 3), "weight")
            .unwrap();
        assert_ne!(x1.to_vec2::<f32>().unwrap(), x3.to_vec2::<f32>().unwrap());
        let v = x1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.abs() <= 1.0 / 3f32.sqrt()));
        assert!(v.iter().any(|x| *x != 0.0));
    }

    #[test]
    fn hints_are_honoured_and_vars_are_shared() {
        let dev = Device::Cpu;
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &dev);
        let lin = candle_nn::linear(16, 8, vb.pp("fc")).unwrap();
        let w = m.vars()[1]
            .1
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = m.vars()[0].1.as_tensor().to_vec1::<f32>().unwrap();
        // Weights: Kaiming normal (ReLU gain), std sqrt(2 / 16); biases U(±1/sqrt(16)).
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.3536).abs() < 0.06, "{std}");
        assert!(b.iter().all(|x| x.abs() <= 0.25) && b.iter().any(|x| *x != 0.0));
        // The layer holds the var itself: setting the var changes the layer's output.
        let x = Tensor::ones((1, 16), DType::F32, &dev).unwrap();
        let before = lin
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let (_, wv) = &m.vars()[1];
        wv.set(&wv.as_tensor().zeros_like().unwrap()).unwrap();
        let (_, bv) = &m.vars()[0];
        let after = lin
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let bias_sum = bv
            .as_tensor()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_ne!(before, after);
        assert!((after - bias_sum).abs() < 1e-6);
        // Asking again for an existing name with another shape is an error.
        assert!(vb.pp("fc").get((3, 3), "weight").is_err());
    }

    #[test]
    fn load_checks_names_and_shapes() {
        let dev = Device::Cpu;
        let m = SeededVarMap::new(0);
        let vb = m.var_builder(DType::F32, &dev);
        vb.get((2, 2), "a.weight").unwrap();
        let mut t = HashMap::new();
        t.insert(
            "a.weight".to_string(),
            Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
        );
        m.load(&t, "ckpt").unwrap();
        assert_eq!(
            m.vars()[0].1.as_tensor().to_vec2::<f32>().unwrap(),
            vec![vec![1.0; 2]; 2]
        );
        t.insert("b".to_string(), Tensor::ones(2, DType::F32, &dev).unwrap());
        let e = m.load(&t, "ckpt").unwrap_err().to_string();
        assert!(e.contains("\"b\""), "{e}");
        t.remove("b");
        t.insert(
            "a.weight".to_string(),
            Tensor::ones(4, DType::F32, &dev).unwrap(),
        );
        let e = m.load(&t, "ckpt").unwrap_err().to_string();
        assert!(e.contains("[4]") && e.contains("[2, 2]"), "{e}");
    }
}
