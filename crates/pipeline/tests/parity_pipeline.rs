//! The whole text-to-video pipeline against diffusers' CogVideoXPipeline on tiny random models:
//! per-step transformer outputs and latents, final latents (1e-3) and frames (2e-3).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::ops::ControlFlow;
use vdit_core::testing::{assert_close, fixture_dir, load_meta, load_tensors};
use vdit_pipeline::{CogVideoXPipeline, Event, GenerateRequest, OutputKind, PromptInput};
use vdit_schedulers::RecordedNoise;

mod common;

fn run_case(case: &str) {
    let dir = fixture_dir(case);
    let meta = load_meta(&dir).unwrap();
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let outputs = load_tensors(&dir.join("outputs.safetensors")).unwrap();
    let dev = Device::Cpu;
    let mut pipe = CogVideoXPipeline::load(&dir.join("pipeline"), DType::F32, &dev).unwrap();

    let draws = meta["noise_draws"].as_u64().unwrap_or(0) as usize;
    let noise: Vec<Tensor> = (0..draws)
        .map(|i| inputs[&format!("scheduler_noise_{i}")].clone())
        .collect();
    let want_t: Vec<usize> = meta["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let want_g: Vec<f64> = meta["guidance_scale_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let req = GenerateRequest {
        prompt: PromptInput::Embeds(inputs["prompt_embeds"].clone()),
        negative_prompt: Some(PromptInput::Embeds(
            inputs["negative_prompt_embeds"].clone(),
        )),
        num_frames: Some(meta["num_frames"].as_u64().unwrap() as usize),
        height: Some(meta["height"].as_u64().unwrap() as usize),
        width: Some(meta["width"].as_u64().unwrap() as usize),
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        use_dynamic_cfg: meta["use_dynamic_cfg"].as_bool().unwrap(),
        latents: Some(inputs["latents"].clone()),
        scheduler_noise: Some(Box::new(RecordedNoise::new(noise))),
        output: OutputKind::Frames,
        ..Default::default()
    };
    let mut seen_steps = 0;
    let out = pipe
        .generate(req, &mut |e| {
            if let Event::Step {
                index,
                timestep,
                guidance_scale,
                model_output,
                latents,
                ..
            } = e
            {
                assert_eq!(timestep, want_t[index], "timestep of step {index}");
                assert!(
                    (guidance_scale - want_g[index]).abs() < 1e-6,
                    "guidance at step {index}: {guidance_scale} vs {}",
                    want_g[index]
                );
                assert_close(
                    &format!("{case} step {index} transformer out"),
                    model_output,
                    &outputs[&format!("step_{index}_transformer_out")],
                    1e-4,
                );
                assert_close(
                    &format!("{case} step {index} latents"),
                    latents,
                    &outputs[&format!("step_{index}_latents")],
                    1e-3,
                );
                seen_steps += 1;
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(seen_steps, want_t.len());
    assert_close(
        &format!("{case} latents"),
        &out.latents,
        &outputs["latents"],
        1e-3,
    );
    assert_close(
        &format!("{case} frames"),
        out.frames.as_ref().unwrap(),
        &outputs["frames"],
        2e-3,
    );
}

/// The 2b-like fixture's inputs and its pipeline, loaded in f32 on the CPU.
fn fixture_2b_like() -> (HashMap<String, Tensor>, CogVideoXPipeline) {
    let dir = fixture_dir("pipeline_2b_like");
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let pipe = CogVideoXPipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    (inputs, pipe)
}

#[test]
fn pipeline_2b_like_matches_diffusers() {
    run_case("pipeline_2b_like");
}

#[test]
fn pipeline_5b_like_matches_diffusers() {
    run_case("pipeline_5b_like");
}

#[test]
fn cancellation_stops_the_run() {
    let (inputs, mut pipe) = fixture_2b_like();
    let req = GenerateRequest {
        num_inference_steps: 4,
        ..common::embeds_request(&inputs)
    };
    let mut steps = 0;
    let r = pipe.generate(req, &mut |e| {
        if let Event::Step { .. } = e {
            steps += 1;
            if steps == 2 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    assert!(matches!(r, Err(vdit_core::Error::Cancelled)), "{r:?}");
    assert_eq!(steps, 2);
}

#[test]
fn bad_sizes_are_rejected_by_name() {
    let (inputs, mut pipe) = fixture_2b_like();
    let base = || GenerateRequest {
        num_inference_steps: 2,
        ..common::embeds_request(&inputs)
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                num_frames: Some(8),
                ..base()
            },
            "num_frames",
        ),
        (
            GenerateRequest {
                height: Some(40),
                ..base()
            },
            "height",
        ),
        (
            GenerateRequest {
                width: Some(50),
                ..base()
            },
            "width",
        ),
        (
            GenerateRequest {
                num_inference_steps: 0,
                ..base()
            },
            "num_inference_steps",
        ),
        (
            GenerateRequest {
                guidance_scale: f64::NAN,
                ..base()
            },
            "guidance_scale",
        ),
        (
            GenerateRequest {
                latents: Some(Tensor::zeros((1, 2, 4, 4, 6), DType::F32, &Device::Cpu).unwrap()),
                ..base()
            },
            "latents",
        ),
        (
            GenerateRequest {
                prompt: PromptInput::Embeds(
                    Tensor::zeros((1, 15, 32), DType::F32, &Device::Cpu).unwrap(),
                ),
                ..base()
            },
            "prompt_embeds",
        ),
        (
            GenerateRequest {
                prompt: PromptInput::Text("a red circle".into()),
                ..base()
            },
            "tokenizer",
        ),
    ];
    for (req, needle) in cases {
        let err = pipe
            .generate(req, &mut |_| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(needle),
            "error `{err}` should mention `{needle}`"
        );
    }
}

/// `guidance_max_timestep` with text-to-video: the steps above it are those of a run without
/// guidance (one forward of B, scale 1), the later ones guided; a bound at or above every
/// timestep changes nothing.
#[test]
fn guidance_applies_only_at_timesteps_up_to_guidance_max_timestep() {
    let (inputs, mut pipe) = fixture_2b_like();
    let mut run = |max_t: Option<usize>, guidance: f64| {
        let req = GenerateRequest {
            num_inference_steps: 5,
            guidance_scale: guidance,
            guidance_max_timestep: max_t,
            latents: Some(inputs["latents"].clone()),
            output: OutputKind::Latent,
            ..common::embeds_request(&inputs)
        };
        let mut steps = common::Steps::new();
        let out = pipe.generate(req, &mut common::record(&mut steps)).unwrap();
        (steps, out.latents)
    };
    let (full, full_out) = run(None, 6.0);
    assert!(full.iter().all(|s| s.2 == 2 && s.1 == 6.0));
    let (_, same) = run(Some(1000), 6.0);
    assert_close("bound above every timestep", &same, &full_out, 0.0);
    let m = full[3].0;
    let (cut, cut_out) = run(Some(m), 6.0);
    let (plain, _) = run(None, 1.0);
    for (i, (c, p)) in cut.iter().zip(&plain).enumerate() {
        if i < 3 {
            assert_eq!((c.1, c.2), (1.0, 1), "step {i} (t = {}) is not guided", c.0);
            assert_close(&format!("step {i} as unguided"), &c.3, &p.3, 0.0);
        } else {
            assert_eq!((c.1, c.2), (6.0, 2), "step {i} (t = {}) is guided", c.0);
        }
    }
    let d = vdit_core::testing::max_abs_diff(&cut_out, &full_out).unwrap();
    assert!(d > 1e-4, "the unguided steps changed nothing ({d})");
}

/// `guidance_rescale`: with φ > 0 the first step is the scheduler's step on `rescale_guidance` of
/// the guided prediction (the wiring), and the run differs from φ = 0.
#[test]
fn guidance_rescale_steps_on_the_rescaled_prediction() {
    let (inputs, mut pipe) = fixture_2b_like();
    let latents = inputs["latents"].clone();
    let mut run = |phi: f64| {
        let req = GenerateRequest {
            num_inference_steps: 4,
            guidance_scale: 6.0,
            guidance_rescale: phi,
            latents: Some(latents.clone()),
            output: OutputKind::Latent,
            ..common::embeds_request(&inputs)
        };
        let mut first: Option<(usize, Tensor, Tensor)> = None;
        let out = pipe
            .generate(req, &mut |e| {
                if let Event::Step {
                    index: 0,
                    timestep,
                    model_output,
                    latents,
                    ..
                } = e
                {
                    first = Some((timestep, model_output.clone(), latents.clone()));
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        (first.unwrap(), out.latents)
    };
    // phi = 0 (the default) is the plain run, which matches diffusers (run_case above).
    let (_, plain) = run(0.0);
    let ((t0, out0, lat0), rescaled) = run(0.7);
    let b = out0.dim(0).unwrap() / 2;
    let (u, c) = (out0.narrow(0, 0, b).unwrap(), out0.narrow(0, b, b).unwrap());
    let guided = (&u + ((&c - &u).unwrap() * 6.0).unwrap()).unwrap();
    let pred = vdit_pipeline::rescale_guidance(&guided, &c, 0.7).unwrap();
    pipe.scheduler.set_timesteps(4).unwrap();
    let x = (&latents * pipe.scheduler.init_noise_sigma()).unwrap();
    let want = pipe
        .scheduler
        .step(&pred, t0, &x, &mut RecordedNoise::new(vec![]))
        .unwrap();
    assert_close("first step on the rescaled prediction", &lat0, &want, 1e-6);
    let d = vdit_core::testing::max_abs_diff(&rescaled, &plain).unwrap();
    assert!(d > 1e-4, "rescaling changed nothing ({d})");
}

/// A guidance_rescale outside [0, 1] is refused by name.
#[test]
fn guidance_rescale_out_of_range_is_named() {
    let (inputs, mut pipe) = fixture_2b_like();
    for phi in [-0.1, 1.5, f64::NAN] {
        let req = GenerateRequest {
            guidance_rescale: phi,
            output: OutputKind::Latent,
            ..common::embeds_request(&inputs)
        };
        let err = match pipe.generate(req, &mut |_| ControlFlow::Continue(())) {
            Ok(_) => panic!("guidance_rescale {phi} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("guidance_rescale") && err.contains("[0, 1]"),
            "{err}"
        );
    }
}
