//! `vdit generate --image / --video / --extend` end to end on the tiny image-to-video and
//! video-to-video parity pipelines: the CLI gives exactly what the library gives for the same
//! inputs and seed (the library itself is parity-tested against diffusers), fits inputs of
//! another size with a note, keeps an extended clip's frames, and rejects bad input with a
//! message naming the flag or the file.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{run_err, run_ok, tmpdir, vdit, Fixture, EMBEDS};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use vdit_core::testing::{assert_close, load_tensors};
use vdit_pipeline::{
    CogVideoXPipeline, GenerateRequest, ImageToVideoRequest, OutputKind, PromptInput,
    VideoToVideoRequest,
};

/// `[.., H, W, 3]` bytes stored as f32 in a fixture -> RGB8 frames.
fn rgb8_frames(u8s: &Tensor) -> Vec<Vec<u8>> {
    let dims = u8s.dims().to_vec();
    let per = dims[dims.len() - 3] * dims[dims.len() - 2] * 3;
    let data: Vec<u8> = u8s
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as u8)
        .collect();
    data.chunks(per).map(|c| c.to_vec()).collect()
}

/// Writes RGB8 frames as a PNG-frame directory (lossless) at 12 fps.
fn write_png_dir(dir: &Path, frames: Vec<Vec<u8>>, w: u32, h: u32) {
    let v = vdit_video::Video {
        width: w,
        height: h,
        fps: 12.0,
        frames,
    };
    vdit_video::write_video(dir, &v).unwrap();
}

/// A fixture's pipeline folder, its embeddings written as one-tensor files, and the common
/// arguments (2 steps unless overridden, guidance 6, quiet).
struct Setup {
    case: PathBuf,
    inputs: std::collections::HashMap<String, Tensor>,
    args: Vec<String>,
}

fn setup(case: &str, dir: &Path, steps: usize) -> Setup {
    let fixture = Fixture::load(case);
    let steps = steps.to_string();
    let rest = [
        "--num-inference-steps",
        &steps,
        "--guidance-scale",
        "6",
        "--quiet",
    ];
    let args = fixture.generate_args(dir, &EMBEDS, &rest);
    let Fixture { case, inputs } = fixture;
    Setup { case, inputs, args }
}

impl Setup {
    fn pipe(&self) -> CogVideoXPipeline {
        CogVideoXPipeline::load(&self.case.join("pipeline"), DType::F32, &Device::Cpu).unwrap()
    }

    fn request(&self, steps: usize) -> GenerateRequest {
        GenerateRequest {
            prompt: PromptInput::Embeds(self.inputs["prompt_embeds"].clone()),
            negative_prompt: Some(PromptInput::Embeds(
                self.inputs["negative_prompt_embeds"].clone(),
            )),
            num_inference_steps: steps,
            guidance_scale: 6.0,
            seed: 42,
            output: OutputKind::Latent,
            ..Default::default()
        }
    }

    fn cmd(&self) -> Command {
        let mut c = vdit();
        c.args(&self.args);
        c
    }
}

#[test]
fn image_to_video_matches_the_library_and_fits_other_sizes() {
    let dir = tmpdir("i2v");
    let s = setup("pipeline_i2v_5b_like", &dir, 2);
    let frames = rgb8_frames(&s.inputs["image_u8"]);
    let img_dir = dir.join("img");
    write_png_dir(&img_dir, frames.clone(), 32, 32);
    let png = img_dir.join("frame_000.png");

    let out = dir.join("i2v.safetensors");
    let err = run_ok(
        s.cmd()
            .arg("--image")
            .arg(&png)
            .args(["--output-type", "latent", "--output"])
            .arg(&out),
    );
    assert!(!err.contains("note:"), "no resize expected: {err}");
    let got = load_tensors(&out).unwrap();

    let image = vdit_pipeline::rgb8_to_frames(&frames, 32, 32, &Device::Cpu)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let want = s
        .pipe()
        .image_to_video(ImageToVideoRequest::new(s.request(2), image), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_close("cli i2v latents", &got["latents"], &want.latents, 1e-6);

    // A 48x40 image is scaled to cover 32x32 and centre-cropped, with a note; video written.
    let small = vdit_video::Image {
        width: 32,
        height: 32,
        data: frames[0].clone(),
    };
    let (big, _) = vdit_video::fit(&small, 48, 40);
    let big_dir = dir.join("big");
    write_png_dir(&big_dir, vec![big.data], 48, 40);
    let big_path = big_dir.join("frame_000.png");
    let gif = dir.join("i2v.gif");
    let err = run_ok(
        s.cmd()
            .arg("--image")
            .arg(&big_path)
            .arg("--output")
            .arg(&gif),
    );
    assert!(
        err.contains("note:") && err.contains("frame_000.png") && err.contains("48x40 to 32x32"),
        "{err}"
    );
    let v = vdit_video::read_video(&gif).unwrap();
    assert_eq!((v.frames.len(), v.width, v.height), (9, 32, 32));
}

#[test]
fn video_to_video_matches_the_library_and_trims_long_clips() {
    let dir = tmpdir("v2v");
    let s = setup("pipeline_v2v_like", &dir, 6);
    let frames = rgb8_frames(&s.inputs["video_u8"]); // 9 frames
                                                     // 12 frames: the model's 9 are used, with a note.
    let mut long = frames.clone();
    long.extend(frames[..3].iter().cloned());
    let clip = dir.join("clip");
    write_png_dir(&clip, long, 32, 32);

    let out = dir.join("v2v.safetensors");
    let err = run_ok(
        s.cmd()
            .arg("--video")
            .arg(&clip)
            .args(["--strength", "0.7", "--output-type", "latent", "--output"])
            .arg(&out),
    );
    assert!(err.contains("using the first 9 of 12 frames"), "{err}");
    let got = load_tensors(&out).unwrap();
    let video = vdit_pipeline::rgb8_to_frames(&frames, 32, 32, &Device::Cpu).unwrap();
    let want = s
        .pipe()
        .video_to_video(
            VideoToVideoRequest::new(s.request(6), video, 0.7),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_close("cli v2v latents", &got["latents"], &want.latents, 1e-6);

    // Decoded to a PNG directory at the input's frame rate.
    let outdir = dir.join("frames");
    run_ok(
        s.cmd()
            .arg("--video")
            .arg(&clip)
            .args(["--strength", "0.5", "--num-frames", "1", "--output"])
            .arg(&outdir),
    );
    let v = vdit_video::read_video(&outdir).unwrap();
    assert_eq!(
        (v.frames.len(), v.width, v.height, v.fps),
        (1, 32, 32, 12.0)
    );
    // A GIF input of another size: fitted with a note.
    let gif = dir.join("clip.gif");
    let (big, _) = vdit_video::fit_video(
        &vdit_video::Video {
            width: 32,
            height: 32,
            fps: 10.0,
            frames: frames.clone(),
        },
        40,
        32,
    );
    vdit_video::write_video(&gif, &big).unwrap();
    let err = run_ok(
        s.cmd()
            .arg("--video")
            .arg(&gif)
            .args(["--strength", "0.5", "--output"])
            .arg(dir.join("from_gif.mp4")),
    );
    assert!(
        err.contains("clip.gif") && err.contains("40x32 to 32x32"),
        "{err}"
    );
    let v = vdit_video::read_video(&dir.join("from_gif.mp4")).unwrap();
    assert_eq!((v.frames.len(), v.width, v.height), (9, 32, 32));
}

#[test]
fn extension_keeps_the_clip_in_both_directions() {
    let dir = tmpdir("extend");
    let s = setup("pipeline_v2v_like", &dir, 2);
    let frames = rgb8_frames(&s.inputs["video_u8"]);
    let clip = dir.join("clip");
    write_png_dir(&clip, frames.clone(), 32, 32);
    for (direction, keep_at) in [("forward", 0), ("backward", 8)] {
        let out = dir.join(format!("ext_{direction}"));
        let err = run_ok(
            s.cmd()
                .arg("--extend")
                .arg(&clip)
                .args(["--direction", direction, "--num-frames", "8", "--output"])
                .arg(&out),
        );
        assert!(err.contains("by 8 frames"), "{err}");
        let v = vdit_video::read_video(&out).unwrap();
        assert_eq!(v.frames.len(), 17, "{direction}");
        // PNG frames are lossless: the clip comes back bit for bit at its place.
        assert_eq!(v.frames[keep_at..keep_at + 9], frames[..], "{direction}");
    }
    // An H.264 MP4 input: its decoded frames are what is kept.
    let mp4 = dir.join("clip.mp4");
    let video = vdit_video::Video {
        width: 32,
        height: 32,
        fps: 8.0,
        frames: frames.clone(),
    };
    vdit_video::write_video(&mp4, &video).unwrap();
    let decoded = vdit_video::read_video(&mp4).unwrap();
    let out = dir.join("ext_mp4");
    run_ok(
        s.cmd()
            .arg("--extend")
            .arg(&mp4)
            .args(["--num-frames", "4", "--output"])
            .arg(&out),
    );
    let v = vdit_video::read_video(&out).unwrap();
    assert_eq!(v.frames.len(), 13);
    assert_eq!(v.frames[..9], decoded.frames[..]);
}

#[test]
fn text_to_video_models_take_an_image_by_latent_replacement() {
    let dir = tmpdir("t2v-image");
    let s = setup("pipeline_v2v_like", &dir, 2);
    let frames = rgb8_frames(&s.inputs["video_u8"]);
    let clip = dir.join("clip");
    write_png_dir(&clip, frames.clone(), 32, 32);
    let png = clip.join("frame_000.png");
    let out = dir.join("i2v.safetensors");
    let err = run_ok(
        s.cmd()
            .arg("--image")
            .arg(&png)
            .args(["--num-frames", "9", "--output-type", "latent", "--output"])
            .arg(&out),
    );
    assert!(err.contains("latent replacement"), "{err}");
    let got = load_tensors(&out).unwrap();
    // The same as the library call with the CLI's request.
    let image = vdit_pipeline::rgb8_to_frames(&frames[..1], 32, 32, &Device::Cpu)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let mut req = s.request(2);
    req.num_frames = Some(9);
    let want = s
        .pipe()
        .image_to_video_by_replacement(ImageToVideoRequest::new(req, image), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_close(
        "cli t2v+image latents",
        &got["latents"],
        &want.latents,
        1e-6,
    );
    // As a video: 9 frames at the model's size.
    let gif = dir.join("i2v.gif");
    run_ok(s.cmd().arg("--image").arg(&png).arg("--output").arg(&gif));
    let v = vdit_video::read_video(&gif).unwrap();
    assert_eq!((v.frames.len(), v.width, v.height), (9, 32, 32));
}

#[test]
fn bad_media_flags_give_clear_errors() {
    let dir = tmpdir("errors");
    let t2v = setup("pipeline_v2v_like", &dir, 2);
    let i2v = setup("pipeline_i2v_5b_like", &dir, 2);
    let frames = rgb8_frames(&t2v.inputs["video_u8"]);
    let clip = dir.join("clip");
    write_png_dir(&clip, frames.clone(), 32, 32);
    let png = clip.join("frame_000.png");
    let out = dir.join("x.gif");
    let garbage = dir.join("garbage.png");
    std::fs::write(&garbage, b"not an image at all").unwrap();
    let missing = dir.join("missing.png");

    let check = |mut c: Command, needles: &[&str]| {
        let e = run_err(c.arg("--output").arg(&out));
        for n in needles {
            assert!(e.contains(n), "error `{e}` should mention `{n}`");
        }
    };
    let with = |s: &Setup, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = s.cmd();
        for a in extra {
            c.arg(a);
        }
        c
    };
    // An image for a text-to-video model (latent replacement) at a frame count it cannot window.
    check(
        with(&t2v, &[&"--image", &png, &"--num-frames", &"13"]),
        &["window of 13 frames", "odd"],
    );
    // A text-to-video run on an image-to-video model.
    check(
        with(&i2v, &[]),
        &["image-to-video model", "conditioning image"],
    );
    // Missing and unreadable files name the path.
    check(
        with(&i2v, &[&"--image", &missing]),
        &["--image", "missing.png"],
    );
    check(
        with(&i2v, &[&"--image", &garbage]),
        &["garbage.png", "PNG or JPEG"],
    );
    check(
        with(&t2v, &[&"--video", &missing]),
        &["--video", "missing.png"],
    );
    check(
        with(&t2v, &[&"--extend", &garbage, &"--num-frames", &"4"]),
        &["--extend", "garbage.png"],
    );
    // Strength out of range, or without a video.
    check(
        with(&t2v, &[&"--video", &clip, &"--strength", &"1.5"]),
        &["--strength", "(0, 1]"],
    );
    check(with(&t2v, &[&"--strength", &"0.5"]), &["--video"]);
    // Frame counts: not 4k+1, more than the clip has, not a multiple of 4 to add, missing.
    check(
        with(&i2v, &[&"--image", &png, &"--num-frames", &"8"]),
        &["num_frames", "4k+1"],
    );
    check(
        with(&t2v, &[&"--video", &clip, &"--num-frames", &"13"]),
        &["--num-frames 13", "only 9 frames"],
    );
    check(
        with(&t2v, &[&"--video", &clip, &"--num-frames", &"7"]),
        &["num_frames", "4k+1"],
    );
    check(
        with(&t2v, &[&"--extend", &clip, &"--num-frames", &"6"]),
        &["num_frames", "multiple of 4"],
    );
    check(with(&t2v, &[&"--extend", &clip]), &["--num-frames"]);
    check(with(&t2v, &[&"--direction", &"backward"]), &["--extend"]);
    check(
        with(
            &t2v,
            &[
                &"--extend",
                &clip,
                &"--direction",
                &"sideways",
                &"--num-frames",
                &"4",
            ],
        ),
        &["sideways", "forward", "backward"],
    );
    // Two inputs at once.
    check(
        with(&i2v, &[&"--image", &png, &"--video", &clip]),
        &["--image", "--video"],
    );
}
