//! Parity with diffusers 0.42.1 (fixtures under tests/fixtures/parity): the shared CogVideoX cases
//! (scheduler_ddim_2b_n5/_n7, scheduler_dpm_5b_n5) and the plain DDIM/DDPM cases made by
//! tests/fixtures/make_extra_fixtures.py. Every step's output within 1e-4 (README tolerance), the
//! timesteps exactly equal, the ᾱ tables bit-exact.

use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;
use vdit_core::testing::{assert_close, fixture_dir, load_meta, load_tensors, max_abs_diff};
use vdit_schedulers::schedule::diffusers_timesteps;
use vdit_schedulers::{
    load_scheduler, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXSchedulerConfig,
    DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler, DDPMSchedulerConfig, NoiseSource,
    RecordedNoise, Scheduler, TimestepSpacing,
};

const TOL: f64 = 1e-4;

struct Case {
    name: String,
    dir: std::path::PathBuf,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Case {
    fn load(name: &str) -> Self {
        let dir = fixture_dir(name);
        Self {
            name: name.to_string(),
            inputs: load_tensors(&dir.join("inputs.safetensors")).unwrap(),
            outputs: load_tensors(&dir.join("outputs.safetensors")).unwrap(),
            meta: load_meta(&dir).unwrap(),
            dir,
        }
    }

    fn input(&self, k: &str) -> &Tensor {
        self.inputs
            .get(k)
            .unwrap_or_else(|| panic!("{}: no input {k}", self.name))
    }

    fn output(&self, k: &str) -> &Tensor {
        self.outputs
            .get(k)
            .unwrap_or_else(|| panic!("{}: no output {k}", self.name))
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.dir.join("scheduler_config.json")
    }

    fn n_steps(&self) -> usize {
        self.meta["num_inference_steps"].as_u64().unwrap() as usize
    }

    fn timesteps(&self) -> Vec<usize> {
        let ts = self.input("timesteps").to_dtype(DType::F64).unwrap();
        let ts: Vec<usize> = ts
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let from_meta: Vec<usize> = self.meta["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(ts, from_meta, "{}: fixture timesteps disagree", self.name);
        ts
    }

    /// Every recorded noise draw noise_{i}_{j}, in the order diffusers made them.
    fn recorded_noise(&self) -> (RecordedNoise, usize) {
        let mut draws = Vec::new();
        for i in 0..self.n_steps() {
            for j in 0.. {
                match self.inputs.get(&format!("noise_{i}_{j}")) {
                    Some(z) => draws.push(z.clone()),
                    None => break,
                }
            }
        }
        let n = draws.len();
        (RecordedNoise::new(draws), n)
    }

    /// The reference ᾱ table, widened to f64 (`alphas_cumprod_f64` or the float32 `alphas_cumprod`).
    fn alphas_cumprod(&self) -> Vec<f64> {
        let t = self
            .inputs
            .get("alphas_cumprod_f64")
            .or_else(|| self.inputs.get("alphas_cumprod"))
            .unwrap_or_else(|| panic!("{}: no alphas_cumprod", self.name));
        t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
    }
}

/// Compares ᾱ tables with the reference. Bit-exact, except where diffusers takes a square root
/// (the zero-terminal-SNR rescale): torch's CPU sqrt goes through MKL's vector math, which is not
/// correctly rounded (1 ulp off on a few entries), so there the bound is a couple of ulps of 1.0 in
/// the table's dtype. Returns the max absolute difference.
fn check_table(name: &str, got: &[f64], want: &[f64], exact: bool, f32_table: bool) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: table length");
    let mut worst = 0.0f64;
    let mut mismatches = 0;
    for (g, w) in got.iter().zip(want) {
        if g.to_bits() != w.to_bits() {
            mismatches += 1;
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!(
        "{name}: alphas_cumprod {mismatches} of {} entries differ (max {worst:.3e})",
        got.len()
    );
    if exact {
        assert_eq!(
            mismatches, 0,
            "{name}: alphas_cumprod differs (max {worst:.3e})"
        );
    } else {
        let tol = if f32_table { 2.5e-7 } else { 5e-16 };
        assert!(
            worst <= tol,
            "{name}: alphas_cumprod max diff {worst:.3e} > {tol:.0e}"
        );
    }
    worst
}

/// Runs every step, feeding each output back as the next sample (as a pipeline does), and checks
/// x_prev and x̂₀ against diffusers. Returns (max diff over prev samples, over x̂₀).
fn run_steps(
    case: &Case,
    mut step: impl FnMut(&Tensor, usize, &Tensor) -> (Tensor, Tensor),
) -> (f64, f64) {
    let ts = case.timesteps();
    let mut sample = case.input("sample_0").clone();
    let (mut d_prev, mut d_x0) = (0.0f64, 0.0f64);
    for (i, &t) in ts.iter().enumerate() {
        let mo = case.input(&format!("model_output_{i}"));
        let (prev, x0) = step(mo, t, &sample);
        let want_prev = case.output(&format!("prev_sample_{i}"));
        let want_x0 = case.output(&format!("pred_original_sample_{i}"));
        d_prev = d_prev.max(max_abs_diff(&prev, want_prev).unwrap());
        d_x0 = d_x0.max(max_abs_diff(&x0, want_x0).unwrap());
        assert_close(
            &format!("{} prev_sample_{i} (t={t})", case.name),
            &prev,
            want_prev,
            TOL,
        );
        assert_close(
            &format!("{} pred_original_sample_{i}", case.name),
            &x0,
            want_x0,
            TOL,
        );
        sample = prev;
    }
    eprintln!(
        "{}: max diff prev_sample {d_prev:.3e}, pred_original_sample {d_x0:.3e}",
        case.name
    );
    (d_prev, d_x0)
}

/// The same steps through `load_scheduler` and the trait only; the final sample must match.
fn run_trait(case: &Case, noise: &mut dyn NoiseSource) {
    let mut s = load_scheduler(&case.dir).unwrap();
    s.set_timesteps(case.n_steps()).unwrap();
    assert_eq!(
        s.timesteps(),
        case.timesteps().as_slice(),
        "{}: timesteps",
        case.name
    );
    let mut sample = case.input("sample_0").clone();
    for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
        let mo = case.input(&format!("model_output_{i}"));
        let x = s.scale_model_input(&sample, t).unwrap();
        sample = s.step(mo, t, &x, noise).unwrap();
    }
    let last = format!("prev_sample_{}", case.n_steps() - 1);
    assert_close(
        &format!("{} via trait, final", case.name),
        &sample,
        case.output(&last),
        TOL,
    );
}

/// add_noise / velocity at the recorded timesteps.
fn check_forward(case: &Case, s: &dyn Scheduler) {
    let (x0, noise) = (case.input("x0"), case.input("noise"));
    for t in case.meta["add_noise_timesteps"].as_array().unwrap() {
        let t = t.as_u64().unwrap() as usize;
        let got = s.add_noise(x0, &noise.clone(), t).unwrap();
        assert_close(
            &format!("{} add_noise t={t}", case.name),
            &got,
            case.output(&format!("add_noise_{t}")),
            1e-6,
        );
        let got = s.velocity(x0, noise, t).unwrap();
        assert_close(
            &format!("{} velocity t={t}", case.name),
            &got,
            case.output(&format!("velocity_{t}")),
            1e-6,
        );
    }
}

/// Checks `s`'s ᾱ table against the case's (bit-exact unless diffusers `rescaled` it to zero terminal
/// SNR) and sets the case's number of steps.
fn prepare(case: &Case, s: &mut dyn Scheduler, rescaled: bool, f32_table: bool) {
    let want = case.alphas_cumprod();
    check_table(&case.name, s.alphas_cumprod(), &want, !rescaled, f32_table);
    s.set_timesteps(case.n_steps()).unwrap();
}

/// [`run_steps`] with the case's recorded noise draws, every one of which must be consumed, in order.
fn run_recorded(
    case: &Case,
    mut step: impl FnMut(&Tensor, usize, &Tensor, &mut RecordedNoise) -> (Tensor, Tensor),
) {
    let (mut noise, n_draws) = case.recorded_noise();
    run_steps(case, |mo, t, x| step(mo, t, x, &mut noise));
    assert_eq!(
        (noise.used(), noise.remaining()),
        (n_draws, 0),
        "{}: every recorded draw is consumed, in order",
        case.name
    );
}

fn cog_ddim_case(name: &str) {
    let case = Case::load(name);
    let cfg = CogVideoXSchedulerConfig::load(&case.config_path()).unwrap();
    let mut s = CogVideoXDDIMScheduler::new(cfg).unwrap();
    let rescaled = s.config().rescale_betas_zero_snr;
    prepare(&case, &mut s, rescaled, false);
    assert_eq!(s.timesteps(), case.timesteps().as_slice());
    run_steps(&case, |mo, t, x| s.step_with_x0(mo, t, x).unwrap());
    // DDIM draws no noise: an empty recording must suffice.
    run_trait(&case, &mut RecordedNoise::default());
}

#[test]
fn cogvideox_ddim_2b_n5() {
    cog_ddim_case("scheduler_ddim_2b_n5");
}

#[test]
fn cogvideox_ddim_2b_n7_prev_timestep_quirk() {
    cog_ddim_case("scheduler_ddim_2b_n7");
}

#[test]
fn cogvideox_dpm_5b_n5() {
    let case = Case::load("scheduler_dpm_5b_n5");
    let cfg = CogVideoXSchedulerConfig::load(&case.config_path()).unwrap();
    let mut s = CogVideoXDPMScheduler::new(cfg).unwrap();
    let rescaled = s.config().rescale_betas_zero_snr;
    prepare(&case, &mut s, rescaled, false);
    // Draws per step: 1, 2, ..., 2, 1.
    let per_step: Vec<u64> = case.meta["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["noise_draws"].as_u64().unwrap())
        .collect();
    assert_eq!(per_step, [1, 2, 2, 2, 1]);
    run_recorded(&case, |mo, t, x, z| s.step_with_x0(mo, t, x, z).unwrap());

    // Through the trait, and again after set_timesteps resets the multistep state.
    let (mut noise, _) = case.recorded_noise();
    run_trait(&case, &mut noise);
    let (mut noise, _) = case.recorded_noise();
    run_trait(&case, &mut noise);
}

fn ddim_plain(name: &str) {
    let case = Case::load(name);
    let cfg = DDIMSchedulerConfig::load(&case.config_path()).unwrap();
    let eta = case.meta["eta"].as_f64().unwrap();
    let mut s = DDIMScheduler::new(cfg).unwrap().with_eta(eta).unwrap();
    let rescaled = s.config().rescale_betas_zero_snr;
    prepare(&case, &mut s, rescaled, true);
    run_recorded(&case, |mo, t, x, z| s.step_with_x0(mo, t, x, z).unwrap());
    check_forward(&case, &s);
    if eta == 0.0 {
        run_trait(&case, &mut RecordedNoise::default());
    }
}

#[test]
fn ddim_plain_epsilon_leading_offset_clip() {
    ddim_plain("scheduler_ddim_plain_eps_leading");
}

#[test]
fn ddim_plain_v_trailing_zero_snr_thresholding_eta() {
    ddim_plain("scheduler_ddim_plain_v_trailing_eta");
}

#[test]
fn ddim_plain_sample_linspace_cosine() {
    ddim_plain("scheduler_ddim_plain_sample_linspace");
}

fn ddpm(name: &str) {
    let case = Case::load(name);
    let cfg = DDPMSchedulerConfig::load(&case.config_path()).unwrap();
    let mut s = DDPMScheduler::new(cfg).unwrap();
    let want = case.alphas_cumprod();
    if s.config().beta_schedule == vdit_schedulers::BetaSchedule::Sigmoid {
        // torch.sigmoid's vectorised exp is not libm's: agree to float32 rounding, not bit for bit.
        let d = s
            .alphas_cumprod()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
            .fold(0.0f64, f64::max);
        eprintln!("{name}: alphas_cumprod max relative diff {d:.3e}");
        assert!(d < 1e-6, "{name}: alphas_cumprod relative diff {d:.3e}");
    } else {
        let rescaled = s.config().rescale_betas_zero_snr;
        check_table(name, s.alphas_cumprod(), &want, !rescaled, true);
    }
    s.set_timesteps(case.n_steps()).unwrap();
    run_recorded(&case, |mo, t, x, z| s.step_with_x0(mo, t, x, z).unwrap());
    check_forward(&case, &s);
    let (mut noise, _) = case.recorded_noise();
    run_trait(&case, &mut noise);
}

#[test]
fn ddpm_epsilon_fixed_small() {
    ddpm("scheduler_ddpm_eps_fixed_small");
}

#[test]
fn ddpm_v_fixed_small_log_trailing_zero_snr() {
    ddpm("scheduler_ddpm_v_small_log_trailing");
}

#[test]
fn ddpm_sample_fixed_large_sigmoid_thresholding() {
    ddpm("scheduler_ddpm_sample_fixed_large");
}

#[test]
fn ddpm_learned_range_laplace() {
    ddpm("scheduler_ddpm_learned_range");
}

fn fnv1a64(h: &mut u64, v: i64) {
    for b in v.to_le_bytes() {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100000001B3);
    }
}

/// diffusers' timesteps for every N = 1..=T, all spacings, against digests of numpy's output.
#[test]
fn timestep_spacings_match_diffusers_for_every_n() {
    let dir = fixture_dir("scheduler_ddpm_timestep_spacings");
    let meta = load_meta(&dir).unwrap();
    let digests = meta["digests"].as_object().unwrap();
    assert_eq!(digests.len(), 9);
    for (key, want) in digests {
        // key: T{T}_offset{o}_{spacing}
        let parts: Vec<&str> = key.split('_').collect();
        let t: usize = parts[0][1..].parse().unwrap();
        let offset: usize = parts[1]["offset".len()..].parse().unwrap();
        let spacing: TimestepSpacing =
            serde_json::from_value(serde_json::Value::String(parts[2].into())).unwrap();
        let mut h = 0xCBF29CE484222325u64;
        for n in 1..=t {
            let ts = diffusers_timesteps(spacing, t, n, offset);
            fnv1a64(&mut h, n as i64);
            fnv1a64(&mut h, ts.len() as i64);
            for v in &ts {
                fnv1a64(&mut h, *v);
            }
            if let Some(sample) = meta["samples"][key].get(n.to_string()) {
                let want: Vec<i64> = serde_json::from_value(sample.clone()).unwrap();
                assert_eq!(ts, want, "{key} N={n}");
            }
        }
        assert_eq!(&format!("{h:016x}"), want.as_str().unwrap(), "{key}");
    }
}

/// The trait's timesteps drop the spurious trailing -1 diffusers yields for e.g. N=61.
#[test]
fn trailing_spurious_minus_one_is_dropped() {
    let mut s = CogVideoXDDIMScheduler::new(CogVideoXSchedulerConfig::cogvideox_2b()).unwrap();
    s.set_timesteps(61).unwrap();
    assert_eq!(s.timesteps().len(), 61);
    assert_eq!(s.timesteps()[..2], [999, 983]);
    assert_eq!(*s.timesteps().last().unwrap(), 15);
    let raw = diffusers_timesteps(TimestepSpacing::Trailing, 1000, 61, 0);
    assert_eq!(raw.len(), 62);
    let kept: Vec<usize> = raw[..61].iter().map(|&v| v as usize).collect();
    assert_eq!(s.timesteps(), kept.as_slice());
}

/// The presets restate the fixtures' configs.
#[test]
fn presets_match_fixture_configs() {
    let c2 = CogVideoXSchedulerConfig::load(
        &fixture_dir("scheduler_ddim_2b_n5").join("scheduler_config.json"),
    )
    .unwrap();
    assert_eq!(c2, CogVideoXSchedulerConfig::cogvideox_2b());
    let c5 = CogVideoXSchedulerConfig::load(
        &fixture_dir("scheduler_dpm_5b_n5").join("scheduler_config.json"),
    )
    .unwrap();
    assert_eq!(c5, CogVideoXSchedulerConfig::cogvideox_5b());
}

/// The pipeline fixtures' scheduler folders load through `load_scheduler` with the right class.
#[test]
fn pipeline_scheduler_folders_load() {
    for (case, n) in [("pipeline_2b_like", 2), ("pipeline_5b_like", 3)] {
        let dir = fixture_dir(case).join("pipeline/scheduler");
        if !Path::new(&dir).is_dir() {
            panic!("{case}: missing {}", dir.display());
        }
        let mut s = load_scheduler(&dir).unwrap();
        s.set_timesteps(n).unwrap();
        let meta = load_meta(&fixture_dir(case)).unwrap();
        let want: Vec<usize> = serde_json::from_value(meta["timesteps"].clone()).unwrap();
        assert_eq!(s.timesteps(), want.as_slice(), "{case}");
    }
}
