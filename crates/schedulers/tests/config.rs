//! Config loading and validation: bad input is a clear error naming the file, the key (or
//! argument) and what is accepted; plus trait-level behaviour that needs no reference numbers.

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use vdit_core::rng::NoiseRng;
use vdit_core::testing::fixture_dir;
use vdit_schedulers::{
    load_scheduler, CogVideoXDPMScheduler, CogVideoXSchedulerConfig, DDIMScheduler,
    DDIMSchedulerConfig, NoiseSource, PredictionType, RecordedNoise, Scheduler,
};

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vdit-schedulers-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the 2B fixture config with `patch` applied (a JSON object merged at the top level).
fn write_config(name: &str, patch: serde_json::Value) -> (TempDir, PathBuf) {
    let src = fixture_dir("scheduler_ddim_2b_n5").join("scheduler_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            cfg.as_object_mut().unwrap().remove(k);
        } else {
            cfg[k] = v.clone();
        }
    }
    let d = TempDir::new(name);
    let f = d.0.join("scheduler_config.json");
    std::fs::write(&f, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    (d, f)
}

fn load_err(path: &Path) -> String {
    match load_scheduler(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn loads_every_class_from_file_or_folder() {
    for (class, pt) in [
        ("CogVideoXDDIMScheduler", "v_prediction"),
        ("CogVideoXDPMScheduler", "v_prediction"),
        ("DDIMScheduler", "epsilon"),
        ("DDPMScheduler", "sample"),
    ] {
        let (_d, f) = write_config(
            &format!("class-{class}"),
            serde_json::json!({"_class_name": class, "prediction_type": pt}),
        );
        for p in [f.clone(), f.parent().unwrap().to_path_buf()] {
            let mut s = load_scheduler(&p).unwrap();
            let want = serde_json::from_value::<PredictionType>(pt.into()).unwrap();
            assert_eq!(s.prediction_type(), want, "{class}");
            assert_eq!(s.num_train_timesteps(), 1000);
            s.set_timesteps(10).unwrap();
            assert_eq!(s.timesteps().len(), 10, "{class}");
            assert_eq!(
                s.timesteps()[0],
                999,
                "{class}: trailing spacing starts at T-1"
            );
        }
    }
}

#[test]
fn unknown_class_names_the_accepted_ones() {
    let (_d, f) = write_config(
        "bad-class",
        serde_json::json!({"_class_name": "EulerDiscreteScheduler"}),
    );
    let msg = load_err(&f);
    assert_mentions(
        &msg,
        &[
            f.to_str().unwrap(),
            "_class_name",
            "EulerDiscreteScheduler",
            "CogVideoXDDIMScheduler",
            "DDPMScheduler",
        ],
    );
    let (_d, f) = write_config("no-class", serde_json::json!({"_class_name": null}));
    assert_mentions(
        &load_err(&f),
        &["_class_name", "missing", "CogVideoXDPMScheduler"],
    );
}

#[test]
fn unknown_enum_values_name_key_and_accepted_values() {
    for (key, bad, accepted) in [
        ("beta_schedule", "cosine", "squaredcos_cap_v2"),
        ("prediction_type", "flow", "v_prediction"),
        ("timestep_spacing", "karras", "trailing"),
    ] {
        let (_d, f) = write_config(&format!("bad-{key}"), serde_json::json!({ key: bad }));
        assert_mentions(&load_err(&f), &[f.to_str().unwrap(), key, bad, accepted]);
    }
    let (_d, f) = write_config(
        "bad-variance",
        serde_json::json!({"_class_name": "DDPMScheduler", "variance_type": "fixed"}),
    );
    assert_mentions(
        &load_err(&f),
        &["variance_type", "fixed_small_log", "learned_range"],
    );
}

#[test]
fn class_specific_restrictions() {
    let (_d, f) = write_config(
        "ddim-sigmoid",
        serde_json::json!({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}),
    );
    assert_mentions(
        &load_err(&f),
        &["beta_schedule", "DDIMScheduler", "sigmoid", "scaled_linear"],
    );
    let (_d, f) = write_config(
        "ddpm-large-log",
        serde_json::json!({"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}),
    );
    assert_mentions(&load_err(&f), &["variance_type", "fixed_large_log", "NaN"]);
    let (_d, f) = write_config(
        "short-trained",
        serde_json::json!({"trained_betas": [0.1, 0.2]}),
    );
    assert_mentions(&load_err(&f), &["trained_betas", "2 values", "1000"]);
    let (_d, f) = write_config("beta-range", serde_json::json!({"beta_end": 1.5}));
    assert_mentions(&load_err(&f), &["beta_start/beta_end", "outside [0, 1]"]);
    let (_d, f) = write_config("snr", serde_json::json!({"snr_shift_scale": 0.0}));
    assert_mentions(&load_err(&f), &["snr_shift_scale", "positive"]);
    let (_d, f) = write_config(
        "wrong-type",
        serde_json::json!({"num_train_timesteps": "many"}),
    );
    assert_mentions(&load_err(&f), &["num_train_timesteps"]);
}

#[test]
fn missing_file_and_pipeline_folder_hint() {
    let tmp = TempDir::new("pipeline-root");
    let d = &tmp.0;
    std::fs::create_dir_all(d.join("scheduler")).unwrap();
    assert_mentions(
        &load_err(d),
        &["scheduler_config.json", "pass", "scheduler"],
    );
    assert_mentions(&load_err(&d.join("nope.json")), &["nope.json"]);
}

#[test]
fn set_timesteps_rejects_zero_and_too_many() {
    let mut s = load_scheduler(&fixture_dir("scheduler_dpm_5b_n5")).unwrap();
    for n in [0, 1001] {
        let msg = s.set_timesteps(n).unwrap_err().to_string();
        assert_mentions(&msg, &["num_inference_steps", &n.to_string(), "1..=1000"]);
    }
    s.set_timesteps(1000).unwrap();
    assert_eq!(s.timesteps().len(), 1000);
    assert_eq!(s.timesteps()[999], 0);

    // leading spacing + steps_offset past the end is an error naming steps_offset.
    let cfg = DDIMSchedulerConfig {
        steps_offset: 1,
        ..Default::default()
    };
    let mut s = DDIMScheduler::new(cfg).unwrap();
    s.set_timesteps(999).unwrap();
    let msg = s.set_timesteps(1000).unwrap_err().to_string();
    assert_mentions(&msg, &["steps_offset", "1000"]);
}

#[test]
fn step_before_set_timesteps_and_bad_timestep_are_errors() {
    let mut s = CogVideoXDPMScheduler::new(CogVideoXSchedulerConfig::cogvideox_5b()).unwrap();
    let x = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let mut rng = NoiseRng::new(0);
    let msg = s.step(&x, 999, &x, &mut rng).unwrap_err().to_string();
    assert_mentions(&msg, &["set_timesteps"]);
    s.set_timesteps(5).unwrap();
    let msg = s.step(&x, 1000, &x, &mut rng).unwrap_err().to_string();
    assert_mentions(&msg, &["timestep", "1000"]);
    let y = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let msg = s.step(&y, 999, &x, &mut rng).unwrap_err().to_string();
    assert_mentions(&msg, &["model_output", "[1, 2, 4]"]);
}

#[test]
fn recorded_noise_exhausted_or_misshapen_is_an_error() {
    let dev = Device::Cpu;
    let z = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let mut rec = RecordedNoise::new([z.clone()]);
    let msg = rec.randn(&[3, 2], &dev).unwrap_err().to_string();
    assert_mentions(&msg, &["[2, 3]", "[3, 2]"]);
    let mut rec = RecordedNoise::new([z]);
    rec.randn(&[2, 3], &dev).unwrap();
    let msg = rec.randn(&[2, 3], &dev).unwrap_err().to_string();
    assert_mentions(&msg, &["exhausted", "draw 2", "only 1"]);

    // A DPM run with too few recorded draws fails cleanly on the second-order step.
    let mut s = CogVideoXDPMScheduler::new(CogVideoXSchedulerConfig::cogvideox_5b()).unwrap();
    s.set_timesteps(3).unwrap();
    let x = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
    let mut rec = RecordedNoise::new((0..2).map(|_| x.clone()));
    let ts = s.timesteps().to_vec();
    s.step(&x, ts[0], &x, &mut rec).unwrap();
    assert!(s
        .step(&x, ts[1], &x, &mut rec)
        .unwrap_err()
        .to_string()
        .contains("exhausted"));
}

/// DPM with a seeded generator: reproducible, and set_timesteps resets the multistep state.
#[test]
fn dpm_with_seeded_rng_is_reproducible() {
    let dev = Device::Cpu;
    let run = |s: &mut dyn Scheduler| -> Vec<f32> {
        s.set_timesteps(4).unwrap();
        let mut rng = NoiseRng::new(7);
        let mut x = rng.randn(&[1, 2, 4, 3], &dev).unwrap();
        for t in s.timesteps().to_vec() {
            let mo = x.affine(0.5, 0.1).unwrap(); // a stand-in model
            x = s.step(&mo, t, &x, &mut rng).unwrap();
        }
        x.flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut s = CogVideoXDPMScheduler::new(CogVideoXSchedulerConfig::cogvideox_5b()).unwrap();
    let a = run(&mut s);
    let b = run(&mut s);
    assert_eq!(a, b);
    assert!(a.iter().all(|v| v.is_finite()));
}

/// Zero terminal SNR: at t = 999, ᾱ = 0, so x_t is pure noise and v = −x₀, exactly.
#[test]
fn forward_process_at_zero_terminal_snr() {
    let dev = Device::Cpu;
    let s = load_scheduler(&fixture_dir("scheduler_ddim_2b_n5")).unwrap();
    assert_eq!(s.alphas_cumprod()[999], 0.0);
    let mut rng = NoiseRng::new(3);
    let x0 = rng.randn(&[2, 5], &dev).unwrap();
    let eps = rng.randn(&[2, 5], &dev).unwrap();
    let xt = s.add_noise(&x0, &eps, 999).unwrap();
    assert_eq!(xt.to_vec2::<f32>().unwrap(), eps.to_vec2::<f32>().unwrap());
    let v = s.velocity(&x0, &eps, 999).unwrap();
    assert_eq!(
        v.to_vec2::<f32>().unwrap(),
        x0.neg().unwrap().to_vec2::<f32>().unwrap()
    );
    let msg = s.add_noise(&x0, &eps, 1000).unwrap_err().to_string();
    assert_mentions(&msg, &["timestep", "1000"]);
    let bad = Tensor::zeros((5, 2), DType::F32, &dev).unwrap();
    assert!(s.add_noise(&x0, &bad, 10).is_err());
}

#[test]
fn configs_round_trip_through_serde() {
    let cfg = CogVideoXSchedulerConfig::cogvideox_2b();
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"prediction_type\":\"v_prediction\""));
    assert!(json.contains("\"timestep_spacing\":\"trailing\""));
    let back: CogVideoXSchedulerConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    // Omitted keys take diffusers' defaults.
    let d: DDIMSchedulerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(d, DDIMSchedulerConfig::default());
    assert_eq!(d.beta_start, 0.0001);
}

#[test]
fn eta_must_be_non_negative() {
    let s = DDIMScheduler::new(DDIMSchedulerConfig::default()).unwrap();
    let msg = s.with_eta(-1.0).unwrap_err().to_string();
    assert_mentions(&msg, &["eta", "-1"]);
}
