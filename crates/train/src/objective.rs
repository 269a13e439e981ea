//! The diffusion training objective, independent of any model (improved-diffusion's
//! `training_losses`, CogVideoX's fine-tuning loss).
//!
//! Given clean latents x₀ `[B, F, C, h, w]` (the transformer's layout): draw one timestep per
//! sample uniformly in [0, T) and ε ~ N(0, I), form x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with the
//! scheduler's `add_noise`, and the target the scheduler's prediction type asks for (v =
//! √ᾱ_t·ε − √(1−ᾱ_t)·x₀ from `velocity` for CogVideoX). The loss is the MSE between the model's
//! prediction and the target, or CogVideoX's form: x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ against x₀,
//! weighted by 1/(1−ᾱ_t) — which for v-prediction equals the v MSE in exact arithmetic
//! (x̂₀ − x₀ = −√(1−ᾱ_t)(v̂ − v)).

use crate::config::{LossWeighting, TimestepBias};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use vdit_core::{Error, Result};
use vdit_schedulers::{PredictionType, Scheduler};

/// A noised batch and its regression target.
#[derive(Debug, Clone)]
pub struct Noised {
    /// One training timestep per sample, in [0, T).
    pub timesteps: Vec<usize>,
    /// ᾱ at each sample's timestep.
    pub alphas_cumprod: Vec<f64>,
    /// ε, the shape of x₀.
    pub noise: Tensor,
    /// x_t, the model's input.
    pub noisy: Tensor,
    /// What the model should predict (v, ε or x₀ by the scheduler's prediction type).
    pub target: Tensor,
}

/// A standard-normal f32 tensor drawn from `rng` (ChaCha-stable across platforms).
pub fn randn<R: Rng + ?Sized>(shape: &[usize], rng: &mut R, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(data, shape, dev)?)
}

/// `n` timesteps uniform in [0, num_train).
pub fn sample_timesteps<R: Rng + ?Sized>(n: usize, num_train: usize, rng: &mut R) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..num_train)).collect()
}

/// `n` timesteps in `0..num_train` where each timestep in `bias.begin..bias.end` is
/// `bias.multiplier` times as likely as the others (diffusers' `--timestep_bias_strategy
/// range`); one uniform draw per timestep.
pub fn sample_timesteps_biased<R: Rng + ?Sized>(
    n: usize,
    num_train: usize,
    bias: &TimestepBias,
    rng: &mut R,
) -> Vec<usize> {
    let (begin, end) = (bias.begin.min(num_train), bias.end.min(num_train));
    let boosted = (end.saturating_sub(begin)) as f64 * bias.multiplier;
    let total = (num_train - (end.saturating_sub(begin))) as f64 + boosted;
    (0..n)
        .map(|_| {
            let u = rng.random::<f64>() * total;
            let t = if u < begin as f64 {
                u as usize
            } else if u < begin as f64 + boosted {
                begin + ((u - begin as f64) / bias.multiplier) as usize
            } else {
                end + (u - begin as f64 - boosted) as usize
            };
            t.min(num_train - 1)
        })
        .collect()
}

/// Draws timesteps and noise from `rng`, then [`noise_batch`].
pub fn sample_noised<R: Rng + ?Sized>(
    sched: &dyn Scheduler,
    x0: &Tensor,
    rng: &mut R,
) -> Result<Noised> {
    sample_noised_biased(sched, x0, None, rng)
}

/// [`sample_noised`] with the timesteps drawn by [`sample_timesteps_biased`] when `bias` is
/// given (`diffusion.timestep_bias`).
pub fn sample_noised_biased<R: Rng + ?Sized>(
    sched: &dyn Scheduler,
    x0: &Tensor,
    bias: Option<&TimestepBias>,
    rng: &mut R,
) -> Result<Noised> {
    let b = x0.dim(0)?;
    let timesteps = match bias {
        None => sample_timesteps(b, sched.num_train_timesteps(), rng),
        Some(bias) => sample_timesteps_biased(b, sched.num_train_timesteps(), bias, rng),
    };
    let noise = randn(x0.dims(), rng, x0.device())?.to_dtype(x0.dtype())?;
    noise_batch(sched, x0, &noise, &timesteps)
}

/// x_t and the target for given timesteps (one per sample along dim 0) and noise.
pub fn noise_batch(
    sched: &dyn Scheduler,
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
) -> Result<Noised> {
    let b = x0.dim(0)?;
    if timesteps.len() != b {
        return Err(Error::invalid(
            "timesteps",
            format!("{} timesteps for a batch of {b}", timesteps.len()),
        ));
    }
    if noise.dims() != x0.dims() {
        return Err(Error::invalid(
            "noise",
            format!("shape {:?} differs from x0's {:?}", noise.dims(), x0.dims()),
        ));
    }
    let x0 = x0.detach();
    let ac = sched.alphas_cumprod();
    let mut noisy = Vec::with_capacity(b);
    let mut target = Vec::with_capacity(b);
    for (i, &t) in timesteps.iter().enumerate() {
        let (x, e) = (x0.narrow(0, i, 1)?, noise.narrow(0, i, 1)?);
        noisy.push(sched.add_noise(&x, &e, t)?);
        target.push(match sched.prediction_type() {
            PredictionType::VPrediction => sched.velocity(&x, &e, t)?,
            PredictionType::Epsilon => e,
            PredictionType::Sample => x,
        });
    }
    Ok(Noised {
        alphas_cumprod: timesteps.iter().map(|&t| ac[t]).collect(),
        timesteps: timesteps.to_vec(),
        noise: noise.clone(),
        noisy: Tensor::cat(&noisy, 0)?,
        target: Tensor::cat(&target, 0)?,
    })
}

/// A per-sample scalar as a tensor broadcastable against `like` (`[B, 1, 1, ...]`).
fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = values.len();
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

/// The scalar loss of a prediction `[B, ...]` (shape of x₀) for a noised batch: the mean
/// squared error, weighted per `weighting`. With `elem_weight` (broadcastable against x₀, e.g.
/// [`crate::data::latent_object_weights`]) the mean is weighted: Σ w·err / Σ w over x₀'s
/// elements.
pub fn diffusion_loss(
    sched: &dyn Scheduler,
    pred: &Tensor,
    nb: &Noised,
    x0: &Tensor,
    weighting: LossWeighting,
    elem_weight: Option<&Tensor>,
) -> Result<Tensor> {
    if pred.dims() != nb.target.dims() {
        return Err(Error::invalid(
            "prediction",
            format!(
                "shape {:?} differs from the target's {:?}",
                pred.dims(),
                nb.target.dims()
            ),
        ));
    }
    let mean = |err: Tensor| -> Result<Tensor> {
        match elem_weight {
            None => Ok(err.mean_all()?),
            Some(w) => {
                let w = w.broadcast_as(err.dims())?.to_dtype(err.dtype())?;
                let total = w.sum_all()?;
                Ok((err * &w)?.sum_all()?.broadcast_div(&total)?)
            }
        }
    };
    match weighting {
        LossWeighting::None => mean((pred - &nb.target)?.sqr()?),
        LossWeighting::Cogvideox => {
            if sched.prediction_type() != PredictionType::VPrediction {
                return Err(Error::invalid(
                    "diffusion.weighting",
                    format!(
                        "\"cogvideox\" needs a v_prediction scheduler, this one predicts {:?}; use \"none\"",
                        sched.prediction_type()
                    ),
                ));
            }
            let w: Vec<f64> = nb.alphas_cumprod.iter().map(|a| 1.0 / (1.0 - a)).collect();
            let x0_hat = predicted_x0(sched, pred, nb)?;
            let err = (x0_hat - x0.detach())?
                .sqr()?
                .broadcast_mul(&per_sample(&w, pred)?)?;
            mean(err)
        }
    }
}

/// The model's estimate of x₀ from its prediction `pred` of the noised batch, per the
/// scheduler's prediction type: x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v̂ (v), (x_t − √(1−ᾱ)·ε̂)/√ᾱ (ε), or the
/// prediction itself (sample). Differentiable in `pred`.
pub fn predicted_x0(sched: &dyn Scheduler, pred: &Tensor, nb: &Noised) -> Result<Tensor> {
    let sa: Vec<f64> = nb.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let s1a: Vec<f64> = nb.alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();
    Ok(match sched.prediction_type() {
        PredictionType::VPrediction => {
            (nb.noisy.broadcast_mul(&per_sample(&sa, pred)?)?
                - pred.broadcast_mul(&per_sample(&s1a, pred)?)?)?
        }
        PredictionType::Epsilon => {
            let inv: Vec<f64> = sa.iter().map(|a| 1.0 / a.max(1e-8)).collect();
            (nb.noisy.detach() - pred.broadcast_mul(&per_sample(&s1a, pred)?)?)?
                .broadcast_mul(&per_sample(&inv, pred)?)?
        }
        PredictionType::Sample => pred.clone(),
    })
}

/// Per-sample mean squared error `[B]` in f64 (for logging loss by timestep).
pub fn per_sample_mse(pred: &Tensor, target: &Tensor) -> Result<Vec<f64>> {
    let b = pred.dim(0)?;
    let d = (pred.detach() - target.detach())?
        .to_dtype(DType::F64)?
        .sqr()?
        .reshape((b, ()))?
        .mean(1)?;
    Ok(d.to_vec1::<f64>()?)
}

/// A sample of the diagonal Gaussian posterior N(mean, exp(logvar)) by reparameterisation,
/// mean + exp(logvar/2)·ε with ε from `rng` (diffusers' `DiagonalGaussianDistribution.sample`,
/// logvar clamped to [-30, 20] as there). Differentiable in `mean` and `logvar`.
pub fn posterior_sample<R: Rng + ?Sized>(
    mean: &Tensor,
    logvar: &Tensor,
    rng: &mut R,
) -> Result<Tensor> {
    let eps = randn(mean.dims(), rng, mean.device())?.to_dtype(mean.dtype())?;
    let std = (logvar.clamp(-30.0, 20.0)? * 0.5)?.exp()?;
    Ok((mean + std.mul(&eps)?)?)
}

/// KL(N(mean, exp(logvar)) ‖ N(0, I)) per sample, `[B]`: 0.5·Σ(mean² + var − 1 − logvar) over
/// every dim but the first (diffusers' `DiagonalGaussianDistribution.kl()` sums over C, H, W;
/// here over all of them, frames included). logvar is clamped to [-30, 20] as there.
pub fn kl_diag_gaussian(mean: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let b = mean.dim(0)?;
    let lv = logvar.clamp(-30.0, 20.0)?;
    let kl = ((mean.sqr()? + lv.exp()?)? - 1.0)?.sub(&lv)?;
    Ok((kl.reshape((b, ()))?.sum(1)? * 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdit_schedulers::{CogVideoXDDIMScheduler, CogVideoXSchedulerConfig};

    fn sched() -> CogVideoXDDIMScheduler {
        CogVideoXDDIMScheduler::new(CogVideoXSchedulerConfig::cogvideox_2b()).unwrap()
    }

    fn t(v: &[f32], dev: &Device) -> Tensor {
        // [2, 1, 1, 1, 2]
        Tensor::from_slice(v, (2, 1, 1, 1, 2), dev).unwrap()
    }

    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Golden numbers from diffusers 0.42.1 (`CogVideoXDDIMScheduler` with CogVideoX-2b's
    /// settings: `add_noise`, `get_velocity`, and the loss of its CogVideoX fine-tuning script).
    #[test]
    fn noising_target_and_loss_match_diffusers() {
        let dev = Device::Cpu;
        let s = sched();
        let ac = s.alphas_cumprod();
        assert!((ac[250] - 0.38905370924329624).abs() < 1e-12);
        assert!((ac[500] - 0.09532810086292638).abs() < 1e-12);
        assert_eq!(ac[999], 0.0);
        let x0 = t(&[1.0, -0.5, 0.25, 2.0], &dev);
        let eps = t(&[0.3, 0.1, -1.0, 0.5], &dev);
        let nb = noise_batch(&s, &x0, &eps, &[250, 500]).unwrap();
        let want_xt = [0.8582308, -0.23370779, -0.8739543, 1.0930762];
        let want_v = [-0.594508, 0.45318943, -0.5465381, -1.7479086];
        for (g, w) in flat(&nb.noisy).iter().zip(want_xt) {
            assert!((g - w).abs() < 1e-6, "x_t {g} vs {w}");
        }
        for (g, w) in flat(&nb.target).iter().zip(want_v) {
            assert!((g - w).abs() < 1e-6, "v {g} vs {w}");
        }
        let pred = (nb.target.zeros_like().unwrap() + 0.1).unwrap();
        let plain = diffusion_loss(&s, &pred, &nb, &x0, LossWeighting::None, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let cog = diffusion_loss(&s, &pred, &nb, &x0, LossWeighting::Cogvideox, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - 1.109_965_6).abs() < 1e-6, "{plain}");
        assert!((cog - 1.109_965_5).abs() < 1e-5, "{cog}");
        // Element weights: sample 1 weighs 3, sample 0 weighs 1: Σ w·err / Σ w.
        let w = Tensor::from_slice(&[1f32, 3.0], (2, 1, 1, 1, 1), &dev).unwrap();
        let err: Vec<f64> = want_v.iter().map(|v| (0.1 - *v as f64).powi(2)).collect();
        let want = (err[0] + err[1] + 3.0 * (err[2] + err[3])) / 8.0;
        for weighting in [LossWeighting::None, LossWeighting::Cogvideox] {
            let got = diffusion_loss(&s, &pred, &nb, &x0, weighting, Some(&w))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!(
                (got - want).abs() < 1e-5 * want,
                "{weighting:?}: {got} vs {want}"
            );
        }
        // Uniform weights are the plain mean.
        let five = (w.ones_like().unwrap() * 5.0).unwrap();
        let got = diffusion_loss(&s, &pred, &nb, &x0, LossWeighting::None, Some(&five))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got - plain).abs() < 1e-6, "{got} vs {plain}");
    }

    /// At the zero-terminal-SNR timestep x_t is pure noise and v = −x₀.
    #[test]
    fn terminal_timestep_is_pure_noise() {
        let dev = Device::Cpu;
        let s = sched();
        let x0 = t(&[1.0, -0.5, 0.25, 2.0], &dev);
        let eps = t(&[0.3, 0.1, -1.0, 0.5], &dev);
        let nb = noise_batch(&s, &x0, &eps, &[999, 999]).unwrap();
        assert_eq!(flat(&nb.noisy), flat(&eps));
        assert_eq!(flat(&nb.target), vec![-1.0, 0.5, -0.25, -2.0]);
        // Predicting 0 costs mean(x0²) = (1 + 0.25 + 0.0625 + 4) / 4.
        let loss = diffusion_loss(
            &s,
            &x0.zeros_like().unwrap(),
            &nb,
            &x0,
            LossWeighting::None,
            None,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert!((loss - 1.328125).abs() < 1e-7);
        let mse = per_sample_mse(&x0.zeros_like().unwrap(), &nb.target).unwrap();
        assert_eq!(mse, vec![0.625, 2.03125]);
    }

    /// Timesteps in the biased range come `multiplier` times as often as the others, each
    /// range uniform within; the ends of the schedule are reached; without a bias the draws
    /// are the unbiased sampler's, so runs without the key reproduce.
    #[test]
    fn biased_timesteps_follow_the_multiplier() {
        let mut rng = crate::data::step_rng(0, "loss", 0);
        let bias = TimestepBias {
            begin: 100,
            end: 300,
            multiplier: 4.0,
        };
        let n = 200_000;
        let ts = sample_timesteps_biased(n, 1000, &bias, &mut rng);
        let frac = |lo: usize, hi: usize| {
            ts.iter().filter(|&&t| t >= lo && t < hi).count() as f64 / n as f64
        };
        // weights: 100 + 200*4 + 700 = 1600
        for (lo, hi, want) in [
            (0, 100, 100.0 / 1600.0),
            (100, 300, 800.0 / 1600.0),
            (300, 1000, 700.0 / 1600.0),
            (100, 200, 400.0 / 1600.0),
            (600, 700, 100.0 / 1600.0),
        ] {
            let got = frac(lo, hi);
            assert!((got - want).abs() < 0.006, "[{lo}, {hi}): {got} vs {want}");
        }
        assert_eq!(*ts.iter().min().unwrap(), 0);
        assert_eq!(*ts.iter().max().unwrap(), 999);
        let (mut a, mut b) = (
            crate::data::step_rng(1, "loss", 0),
            crate::data::step_rng(1, "loss", 0),
        );
        let (xa, xb) = (
            t(&[0.5, -0.5, 1.0, 2.0], &Device::Cpu)
                .reshape((2, 2))
                .unwrap(),
            t(&[0.5, -0.5, 1.0, 2.0], &Device::Cpu)
                .reshape((2, 2))
                .unwrap(),
        );
        let s = sched();
        let na = sample_noised(&s, &xa, &mut a).unwrap();
        let nb = sample_noised_biased(&s, &xb, None, &mut b).unwrap();
        assert_eq!(na.timesteps, nb.timesteps);
    }

    #[test]
    fn sampled_timesteps_and_noise_are_uniform_and_standard() {
        let dev = Device::Cpu;
        let s = sched();
        let mut rng = crate::data::step_rng(0, "loss", 0);
        let ts = sample_timesteps(20000, 1000, &mut rng);
        assert!(ts.iter().all(|&t| t < 1000));
        let mean = ts.iter().sum::<usize>() as f64 / ts.len() as f64;
        assert!((mean - 499.5).abs() < 8.0, "{mean}");
        assert!(ts.contains(&0) && ts.contains(&999));
        let x0 = Tensor::zeros((4, 3, 2, 8, 8), DType::F32, &dev).unwrap();
        let nb = sample_noised(&s, &x0, &mut rng).unwrap();
        assert_eq!(nb.noisy.dims(), x0.dims());
        let n = flat(&nb.noise);
        let m = n.iter().map(|&x| x as f64).sum::<f64>() / n.len() as f64;
        let v = n.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n.len() as f64;
        assert!(m.abs() < 0.08 && (v - 1.0).abs() < 0.1, "{m} {v}");
    }

    /// The CogVideoX weighting is differentiable and gives the same gradient as the v MSE.
    #[test]
    fn weightings_agree_in_value_and_gradient() {
        let dev = Device::Cpu;
        let s = sched();
        let mut rng = crate::data::step_rng(1, "loss", 0);
        let x0 = randn(&[3, 2, 4, 4, 4], &mut rng, &dev).unwrap();
        let nb = noise_batch(
            &s,
            &x0,
            &randn(&[3, 2, 4, 4, 4], &mut rng, &dev).unwrap(),
            &[10, 400, 990],
        )
        .unwrap();
        let p = candle_core::Var::from_tensor(&randn(&[3, 2, 4, 4, 4], &mut rng, &dev).unwrap())
            .unwrap();
        let a = diffusion_loss(&s, p.as_tensor(), &nb, &x0, LossWeighting::None, None).unwrap();
        let b =
            diffusion_loss(&s, p.as_tensor(), &nb, &x0, LossWeighting::Cogvideox, None).unwrap();
        let (va, vb) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((va - vb).abs() < 1e-4 * va, "{va} {vb}");
        let ga = a.backward().unwrap().get(p.as_tensor()).unwrap().clone();
        let gb = b.backward().unwrap().get(p.as_tensor()).unwrap().clone();
        let d = vdit_core::testing::max_abs_diff(&ga, &gb).unwrap();
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn vae_posterior_and_kl() {
        let dev = Device::Cpu;
        // KL of N(mean, var) against N(0, 1), summed: per element 0.5 (m² + v − 1 − ln v).
        let mean = Tensor::new(&[[0.5f64, -1.0], [0.0, 0.0]], &dev).unwrap();
        let logvar = Tensor::new(&[[0.0f64, 2f64.ln()], [0.0, 0.0]], &dev).unwrap();
        let kl = kl_diag_gaussian(&mean, &logvar)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let want0 = 0.5 * (0.25 + 1.0 - 1.0 - 0.0) + 0.5 * (1.0 + 2.0 - 1.0 - 2f64.ln());
        assert!((kl[0] - want0).abs() < 1e-12, "{kl:?}");
        assert_eq!(kl[1], 0.0);
        crate::gradcheck::check_grad(
            |v| kl_diag_gaussian(&v[0], &v[1]).map_err(|e| candle_core::Error::Msg(e.to_string())),
            &[mean.clone(), logvar.clone()],
            1e-6,
            1e-6,
        )
        .unwrap();
        // The sample: mean + exp(logvar / 2) ε, with ε the stream's normals.
        let mut r1 = crate::data::step_rng(3, "loss", 0);
        let mut r2 = crate::data::step_rng(3, "loss", 0);
        let z = posterior_sample(&mean, &logvar, &mut r1).unwrap();
        let eps = randn(&[2, 2], &mut r2, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let want = (&mean
            + (logvar.clone() * 0.5)
                .unwrap()
                .exp()
                .unwrap()
                .mul(&eps)
                .unwrap())
        .unwrap();
        assert!(vdit_core::testing::max_abs_diff(&z, &want).unwrap() < 1e-15);
        let r3 = crate::data::step_rng(3, "loss", 0);
        crate::gradcheck::check_grad(
            |v| {
                let mut r = r3.clone();
                posterior_sample(&v[0], &v[1], &mut r)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            &[mean, logvar],
            1e-6,
            1e-6,
        )
        .unwrap();
    }
}
