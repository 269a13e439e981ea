//! Gradient checks: candle's autograd against central finite differences in f64, and the check
//! that every trainable var receives a gradient (STACK.md's trap: fast ops drop gradients
//! silently).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use vdit_core::{Error, Result};

/// Elements checked per input at most (evenly spread when the input is larger).
pub const MAX_CHECKED_PER_INPUT: usize = 384;

/// How close autograd came to the finite differences.
#[derive(Debug, Clone)]
pub struct GradReport {
    /// Max |autograd − fd| over the checked elements.
    pub max_abs_err: f64,
    /// Max |autograd − fd| / max(1, |fd|): the quantity compared with `tol`.
    pub max_scaled_err: f64,
    /// Elements checked over all inputs.
    pub checked: usize,
    /// Largest |fd| seen (a check on all-zero gradients proves little).
    pub max_abs_grad: f64,
}

/// Compares the gradient of `f` at `inputs` by candle's autograd with central differences
/// (f(x + eps·e_i) − f(x − eps·e_i)) / 2eps, all in f64. A non-scalar output is reduced to
/// Σ out·r with fixed pseudo-random weights r, so every output element matters. Fails (with
/// the input, element, both values) when |autograd − fd| > tol·max(1, |fd|), or when an
/// input gets no gradient from autograd but a non-zero one from the differences.
pub fn check_grad<F>(f: F, inputs: &[Tensor], eps: f64, tol: f64) -> Result<GradReport>
where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(&x.to_dtype(DType::F64)?.detach()))
        .collect::<candle_core::Result<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs)?;
    let proj = if out.rank() == 0 {
        None
    } else {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
        let r = crate::objective::randn(out.dims(), &mut rng, out.device())?;
        Some(r.to_dtype(DType::F64)?)
    };
    let scalar = |o: Tensor| -> Result<f64> {
        let o = o.to_dtype(DType::F64)?;
        let s = match &proj {
            Some(p) => (o * p)?.sum_all()?,
            None => o,
        };
        Ok(s.to_scalar::<f64>()?)
    };
    let s = match &proj {
        Some(p) => (out.to_dtype(DType::F64)? * p)?.sum_all()?,
        None => out.to_dtype(DType::F64)?,
    };
    let grads = s.backward()?;
    let mut report = GradReport {
        max_abs_err: 0.0,
        max_scaled_err: 0.0,
        checked: 0,
        max_abs_grad: 0.0,
    };
    for (i, v) in vars.iter().enumerate() {
        let auto: Option<Vec<f64>> = match grads.get(v.as_tensor()) {
            Some(g) => Some(g.flatten_all()?.to_vec1::<f64>()?),
            None => None,
        };
        let base: Vec<f64> = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let n = base.len();
        let picks: Vec<usize> = if n <= MAX_CHECKED_PER_INPUT {
            (0..n).collect()
        } else {
            (0..MAX_CHECKED_PER_INPUT)
                .map(|k| k * n / MAX_CHECKED_PER_INPUT)
                .collect()
        };
        for j in picks {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let t = Tensor::from_vec(p, v.dims(), &Device::Cpu)?.to_device(v.device())?;
                let mut args = xs.clone();
                args[i] = t;
                scalar(f(&args)?)
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let ad = match &auto {
                Some(a) => a[j],
                None if fd.abs() > tol => {
                    return Err(Error::Msg(format!(
                        "input {i} received no gradient from autograd, but its finite-difference \
                         gradient at element {j} is {fd:.6e} (an op that drops gradients?)"
                    )))
                }
                None => 0.0,
            };
            let err = (ad - fd).abs();
            let scaled = err / fd.abs().max(1.0);
            report.max_abs_err = report.max_abs_err.max(err);
            report.max_scaled_err = report.max_scaled_err.max(scaled);
            report.max_abs_grad = report.max_abs_grad.max(fd.abs());
            report.checked += 1;
            if scaled.is_nan() || scaled > tol {
                return Err(Error::Msg(format!(
                    "gradient mismatch at input {i} (shape {:?}) element {j}: autograd {ad:.9e}, \
                     finite differences {fd:.9e} (error {err:.3e} > tol {tol:.1e})",
                    v.dims()
                )));
            }
        }
    }
    Ok(report)
}

/// The names of `vars` that got no gradient, or an all-zero one, in `grads`.
pub fn vars_without_grad(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, v) in vars {
        let ok = match grads.get(v.as_tensor()) {
            Some(g) => {
                g.to_dtype(DType::F64)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?
                    > 0.0
            }
            None => false,
        };
        if !ok {
            out.push(name.clone());
        }
    }
    Ok(out)
}

/// Errors, naming them, if any of `vars` got no (or an all-zero) gradient: the test helper for
/// the fast-op trap. Use it in a model's test after one `loss(..).backward()`.
pub fn assert_all_vars_get_grads(vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
    let missing = vars_without_grad(vars, grads)?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "{} of {} trainable vars received no gradient: {} (a fast op that drops gradients, \
             e.g. ops::layer_norm / softmax_last_dim / rms_norm / rope, or an unused var)",
            missing.len(),
            vars.len(),
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_grad_accepts_a_correct_gradient_and_rejects_a_wrong_one() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.3f64, -1.2, 2.0], &dev).unwrap();
        let r = check_grad(
            |v| v[0].sqr()?.sum_all(),
            std::slice::from_ref(&x),
            1e-5,
            1e-7,
        )
        .unwrap();
        assert_eq!(r.checked, 3);
        assert!(r.max_abs_grad > 3.9);
        // A custom op whose "gradient" is wrong: detach part of the graph.
        let e = check_grad(
            |v| (v[0].sqr()? + v[0].detach().exp()?)?.sum_all(),
            std::slice::from_ref(&x),
            1e-5,
            1e-6,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gradient mismatch at input 0"), "{e}");
        // Fully detached: no gradient at all.
        let e = check_grad(|v| v[0].detach().sqr()?.sum_all(), &[x], 1e-5, 1e-6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no gradient"), "{e}");
    }

    #[test]
    fn all_vars_helper_names_the_cut_vars() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.0, 3.0, 4.0], &dev).unwrap();
        let b = Var::new(&[0.5f32, 0.5, 0.5, 0.5], &dev).unwrap();
        let x = Tensor::new(&[[1f32, -2.0, 0.5, 3.0]], &dev).unwrap();
        let vars = vec![
            ("ln.weight".to_string(), w.clone()),
            ("ln.bias".to_string(), b.clone()),
        ];
        // The fast layer norm (STACK.md): its output is cut from the graph.
        let y = candle_nn::ops::layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let e = assert_all_vars_get_grads(&vars, &g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 of 2") && e.contains("ln.weight"), "{e}");
        // The differentiable form reaches both.
        let y =
            crate::diffops::layer_norm(&x, Some(w.as_tensor()), Some(b.as_tensor()), 1e-5).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_all_vars_get_grads(&vars, &g).unwrap();
    }
}
