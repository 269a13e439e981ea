//! Image-to-video and video-to-video against diffusers' CogVideoXImageToVideoPipeline and
//! CogVideoXVideoToVideoPipeline on tiny random models (fixtures made by
//! tests/fixtures/make_i2v_fixtures.py): the image latents, per-step transformer outputs (1e-4)
//! and latents (1e-3), final latents (1e-3) and frames (2e-3). Every random draw of the reference
//! run (posterior sample, initial latents or forward noise, scheduler noise) is fed in.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::ops::ControlFlow;
use vdit_core::testing::{assert_close, fixture_dir, load_meta, load_tensors};
use vdit_pipeline::{
    CogVideoXPipeline, Event, GenerateRequest, ImageToVideoRequest, OutputKind, PromptInput,
    VideoToVideoRequest,
};
use vdit_schedulers::RecordedNoise;

mod common;

struct Case {
    name: &'static str,
    meta: serde_json::Value,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

/// The reference run of a fixture and its pipeline.
fn load(name: &'static str) -> (Case, CogVideoXPipeline) {
    let dir = fixture_dir(name);
    let case = Case {
        name,
        meta: load_meta(&dir).unwrap(),
        inputs: load_tensors(&dir.join("inputs.safetensors")).unwrap(),
        outputs: load_tensors(&dir.join("outputs.safetensors")).unwrap(),
    };
    let pipe = CogVideoXPipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    (case, pipe)
}

impl Case {
    fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap() as usize
    }

    fn list(&self, key: &str) -> Vec<f64> {
        self.meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }

    fn request(&self, with_latents: bool) -> GenerateRequest {
        let draws = self.usize("noise_draws");
        let noise: Vec<Tensor> = (0..draws)
            .map(|i| self.inputs[&format!("scheduler_noise_{i}")].clone())
            .collect();
        GenerateRequest {
            prompt: PromptInput::Embeds(self.inputs["prompt_embeds"].clone()),
            negative_prompt: Some(PromptInput::Embeds(
                self.inputs["negative_prompt_embeds"].clone(),
            )),
            num_frames: Some(self.usize("num_frames")),
            height: Some(self.usize("height")),
            width: Some(self.usize("width")),
            num_inference_steps: self.usize("steps"),
            guidance_scale: self.meta["guidance_scale"].as_f64().unwrap(),
            use_dynamic_cfg: self.meta["use_dynamic_cfg"].as_bool().unwrap(),
            latents: with_latents.then(|| self.inputs["latents"].clone()),
            scheduler_noise: Some(Box::new(RecordedNoise::new(noise))),
            output: OutputKind::Frames,
            ..Default::default()
        }
    }

    /// An observer checking every step against the reference; returns the number of steps seen.
    fn check_steps<'a>(
        &'a self,
        seen: &'a mut usize,
    ) -> impl FnMut(Event<'_>) -> ControlFlow<()> + 'a {
        let want_t = self.list("timesteps");
        let want_g = self.list("guidance_scale_per_step");
        move |e| {
            if let Event::Step {
                index,
                total,
                timestep,
                guidance_scale,
                model_output,
                latents,
            } = e
            {
                assert_eq!(total, want_t.len());
                assert_eq!(timestep as f64, want_t[index], "timestep of step {index}");
                assert!(
                    (guidance_scale - want_g[index]).abs() < 1e-6,
                    "guidance at step {index}: {guidance_scale} vs {}",
                    want_g[index]
                );
                assert_close(
                    &format!("{} step {index} transformer out", self.name),
                    model_output,
                    &self.outputs[&format!("step_{index}_transformer_out")],
                    1e-4,
                );
                assert_close(
                    &format!("{} step {index} latents", self.name),
                    latents,
                    &self.outputs[&format!("step_{index}_latents")],
                    1e-3,
                );
                *seen += 1;
            }
            ControlFlow::Continue(())
        }
    }
}

/// `[H, W, 3]` (or `[F, H, W, 3]`) bytes stored as f32 -> `[.., 3, H, W]` in [0, 1].
fn unit_chw(u8s: &Tensor) -> Tensor {
    let x = (u8s / 255.0).unwrap();
    match x.rank() {
        3 => x.permute((2, 0, 1)).unwrap().unsqueeze(0).unwrap(),
        4 => x.permute((0, 3, 1, 2)).unwrap().unsqueeze(0).unwrap(),
        r => panic!("rank {r}"),
    }
    .contiguous()
    .unwrap()
}

fn run_i2v(name: &'static str) {
    let (case, mut pipe) = load(name);
    let image = unit_chw(&case.inputs["image_u8"]); // [1, 3, H, W]
                                                    // The preprocessing: [0, 1] -> [-1, 1], as diffusers' VideoProcessor at the exact size.
    assert_close(
        &format!("{name} preprocessed image"),
        &image.affine(2.0, -1.0).unwrap(),
        &case.outputs["image_preprocessed"],
        1e-6,
    );
    // The image latents: posterior sample, (inverse) scaling, frame padding.
    let lf = case.outputs["image_latents"].dim(1).unwrap();
    let img_lat = pipe
        .image_latents(&image, &case.inputs["image_encode_noise"], lf)
        .unwrap();
    assert_close(
        &format!("{name} image latents"),
        &img_lat,
        &case.outputs["image_latents"],
        1e-4,
    );
    let (nf, _) = pipe.latent_frames(case.usize("num_frames"));
    assert_eq!(nf, lf, "padded latent frames");

    let req = ImageToVideoRequest {
        image_noise: Some(case.inputs["image_encode_noise"].clone()),
        ..ImageToVideoRequest::new(case.request(true), image)
    };
    let mut seen = 0;
    let steps = case.list("timesteps").len();
    let out = pipe
        .image_to_video(req, &mut case.check_steps(&mut seen))
        .unwrap();
    assert_eq!(seen, steps);
    assert_close(
        &format!("{name} latents"),
        &out.latents,
        &case.outputs["latents"],
        1e-3,
    );
    assert_close(
        &format!("{name} frames"),
        out.frames.as_ref().unwrap(),
        &case.outputs["frames"],
        2e-3,
    );
}

#[test]
fn i2v_5b_like_matches_diffusers() {
    run_i2v("pipeline_i2v_5b_like");
}

#[test]
fn i2v_v15_like_matches_diffusers() {
    run_i2v("pipeline_i2v_v15_like");
}

#[test]
fn v2v_matches_diffusers() {
    let name = "pipeline_v2v_like";
    let (case, mut pipe) = load(name);
    let video = unit_chw(&case.inputs["video_u8"]); // [1, F, 3, H, W]
                                                    // diffusers' preprocessed video is [B, 3, F, H, W] in [-1, 1]
    assert_close(
        &format!("{name} preprocessed video"),
        &video
            .affine(2.0, -1.0)
            .unwrap()
            .permute((0, 2, 1, 3, 4))
            .unwrap(),
        &case.outputs["video_preprocessed"],
        1e-6,
    );
    let req = VideoToVideoRequest {
        encode_noise: Some(case.inputs["video_encode_noise"].clone()),
        noise: Some(case.inputs["v2v_noise"].clone()),
        ..VideoToVideoRequest::new(
            case.request(false),
            video,
            case.meta["strength"].as_f64().unwrap(),
        )
    };
    let mut seen = 0;
    let out = pipe
        .video_to_video(req, &mut case.check_steps(&mut seen))
        .unwrap();
    assert_eq!(seen, case.list("timesteps").len());
    assert_close(
        &format!("{name} latents"),
        &out.latents,
        &case.outputs["latents"],
        1e-3,
    );
    assert_close(
        &format!("{name} frames"),
        out.frames.as_ref().unwrap(),
        &case.outputs["frames"],
        2e-3,
    );
}

#[test]
fn image_noise_augmentation_is_off_by_default_and_checked() {
    let (case, mut pipe) = load("pipeline_i2v_5b_like");
    let image = unit_chw(&case.inputs["image_u8"]);
    let mut run = |sigma: Option<f64>, image: &Tensor| {
        let mut req = ImageToVideoRequest::new(case.request(true), image.clone());
        req.image_noise = Some(case.inputs["image_encode_noise"].clone());
        req.image_noise_sigma = sigma;
        req.request.output = OutputKind::Latent;
        pipe.image_to_video(req, &mut |_| ControlFlow::Continue(()))
    };
    let plain = run(None, &image).unwrap().latents;
    let zero = run(Some(0.0), &image).unwrap().latents;
    assert_close("sigma 0 = no augmentation", &zero, &plain, 0.0);
    let noisy = run(Some(0.5), &image).unwrap().latents;
    let d = vdit_core::testing::max_abs_diff(&noisy, &plain).unwrap();
    assert!(d > 1e-3, "augmentation changed nothing ({d})");
    let e = run(Some(-1.0), &image).unwrap_err().to_string();
    assert!(e.contains("image_noise_sigma"), "{e}");
    // Wrong sizes and ranges are named.
    let e = run(None, &image.narrow(3, 0, 16).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("image") && e.contains("[B, 3, 32, 32]"), "{e}");
    let e = run(None, &(&image * 255.0).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("image") && e.contains("[0, 1]"), "{e}");
    let two = Tensor::cat(&[&image, &image], 0).unwrap();
    let e = run(None, &two).unwrap_err().to_string();
    assert!(e.contains("2 images for 1 prompts"), "{e}");
    let small = image.narrow(2, 0, 24).unwrap().narrow(3, 0, 24).unwrap();
    let mut req = ImageToVideoRequest::new(case.request(true), small);
    (req.request.height, req.request.width, req.request.latents) = (Some(24), Some(24), None);
    let e = pipe
        .image_to_video(req, &mut |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("learned positional embeddings") && e.contains("24x24"),
        "{e}"
    );
}

#[test]
fn each_mode_rejects_the_other_kind_of_model() {
    let (t2v, mut t2v_pipe) = load("pipeline_v2v_like");
    let (i2v, mut i2v_pipe) = load("pipeline_i2v_5b_like");
    let image = unit_chw(&i2v.inputs["image_u8"]);
    let e = t2v_pipe
        .image_to_video(
            ImageToVideoRequest::new(t2v.request(false), image),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot take an image") && e.contains("in_channels 4"),
        "{e}"
    );
    let video = unit_chw(&t2v.inputs["video_u8"]);
    let e = i2v_pipe
        .video_to_video(
            VideoToVideoRequest::new(i2v.request(false), video, 0.5),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("image-to-video model"), "{e}");
    let e = i2v_pipe
        .generate(i2v.request(false), &mut |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image-to-video model") && e.contains("conditioning image"),
        "{e}"
    );
}

/// `guidance_max_timestep` with image-to-video: the steps above it run the conditional half
/// alone (one forward of B, with its image latents) and match a run without guidance step for
/// step; from the first step at or below it, guidance is back (2B, the scale, other latents);
/// a bound at or above every timestep changes nothing.
#[test]
fn guidance_applies_only_at_timesteps_up_to_guidance_max_timestep() {
    let (case, mut pipe) = load("pipeline_i2v_5b_like");
    let image = unit_chw(&case.inputs["image_u8"]);
    let mut run = |max_t: Option<usize>, guidance: Option<f64>| {
        let mut req = ImageToVideoRequest::new(case.request(true), image.clone());
        req.image_noise = Some(case.inputs["image_encode_noise"].clone());
        req.request.guidance_max_timestep = max_t;
        if let Some(g) = guidance {
            req.request.guidance_scale = g;
        }
        let mut steps = common::Steps::new();
        pipe.image_to_video(req, &mut common::record(&mut steps))
            .unwrap();
        steps
    };
    let full = run(None, None);
    let ts: Vec<usize> = full.iter().map(|s| s.0).collect();
    assert!(ts.len() >= 2, "{ts:?}");
    assert!(
        full.iter().all(|s| s.2 == 2),
        "the fixture guides one video"
    );
    let g = case.meta["guidance_scale"].as_f64().unwrap();
    assert!(g > 1.0);
    for (a, b) in run(Some(1000), None).iter().zip(&full) {
        assert_close("bound above every timestep", &a.3, &b.3, 0.0);
    }
    // Unguided for the first step.
    let m = ts[1];
    let cut = run(Some(m), None);
    let plain = run(None, Some(1.0));
    for (i, ((c, p), f)) in cut.iter().zip(&plain).zip(&full).enumerate() {
        if i < 1 {
            assert_eq!((c.1, c.2), (1.0, 1), "step {i} (t = {}) is not guided", c.0);
            assert_close(&format!("step {i} as unguided"), &c.3, &p.3, 0.0);
        } else {
            assert_eq!((c.1, c.2), (f.1, 2), "step {i} (t = {}) is guided", c.0);
            let d = vdit_core::testing::max_abs_diff(&c.3, &p.3).unwrap();
            assert!(d > 1e-4, "step {i}: guidance changed nothing ({d})");
        }
    }
}
