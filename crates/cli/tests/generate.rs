//! `vdit generate` end to end on the pipeline_2b_like fixture: the CLI with the fixture's
//! embeddings, initial latents and settings reproduces diffusers' latents (1e-3) and frames
//! (0.01 after 8-bit PNG quantisation), writes an MP4 that ffprobe reads correctly, and rejects
//! malformed folders and bad flags with a clear message and a non-zero exit.

mod common;

use candle_core::{Device, Tensor};
use common::{run_err, run_ok, tmpdir, vdit, Fixture, EMBEDS};
use std::path::Path;
use std::process::Command;
use vdit_core::testing::{assert_close, fixture_dir, load_tensors};

/// Writes the fixture's inputs as one-tensor safetensors files and returns the common arguments.
fn fixture_args(dir: &Path) -> Vec<String> {
    let tensors = [EMBEDS[0], EMBEDS[1], ("--latents", "latents")];
    Fixture::load("pipeline_2b_like").generate_args(
        dir,
        &tensors,
        &[
            "--num-frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--num-inference-steps",
            "2",
            "--guidance-scale",
            "6",
            "--quiet",
        ],
    )
}

#[test]
fn generate_latents_match_diffusers() {
    let dir = tmpdir("latent");
    let out = dir.join("out.safetensors");
    run_ok(
        vdit()
            .args(fixture_args(&dir))
            .args(["--output-type", "latent", "--output"])
            .arg(&out),
    );
    let got = load_tensors(&out).unwrap();
    let want = load_tensors(&fixture_dir("pipeline_2b_like").join("outputs.safetensors")).unwrap();
    assert_close("cli latents", &got["latents"], &want["latents"], 1e-3);
}

#[test]
fn generate_frames_match_diffusers() {
    let dir = tmpdir("frames");
    let out = dir.join("frames");
    run_ok(vdit().args(fixture_args(&dir)).arg("--output").arg(&out));
    let video = vdit_video::read_video(&out).unwrap();
    let want = load_tensors(&fixture_dir("pipeline_2b_like").join("outputs.safetensors")).unwrap();
    let want = &want["frames"]; // [1, F, 3, H, W] in [0, 1]
    let (_, f, _, h, w) = want.dims5().unwrap();
    assert_eq!(
        (
            video.frames.len(),
            video.height as usize,
            video.width as usize
        ),
        (f, h, w)
    );
    let data: Vec<f32> = video
        .frames
        .iter()
        .flatten()
        .map(|&b| b as f32 / 255.0)
        .collect();
    // [F, H, W, 3] -> [1, F, 3, H, W]
    let got = Tensor::from_vec(data, (f, h, w, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_close("cli frames (8-bit)", &got, want, 0.01);
}

#[test]
fn generate_mp4_reads_back_in_ffprobe() {
    let dir = tmpdir("mp4");
    let out = dir.join("out.mp4");
    run_ok(
        vdit()
            .args(fixture_args(&dir))
            .args(["--fps", "12", "--output"])
            .arg(&out),
    );
    let v = vdit_video::read_video(&out).unwrap();
    assert_eq!((v.frames.len(), v.width, v.height), (9, 48, 32));
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,pix_fmt,r_frame_rate,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(&out)
        .output();
    match probe {
        Err(_) => eprintln!("skipped: ffprobe not installed (apt-get install ffmpeg)"),
        Ok(p) => {
            let s = String::from_utf8_lossy(&p.stdout).trim().to_string();
            eprintln!("ffprobe: {s}");
            assert_eq!(s, "h264,48,32,yuv420p,12/1,9");
        }
    }
}

#[test]
fn bad_flags_and_folders_give_clear_errors() {
    let dir = tmpdir("errors");
    let base = fixture_args(&dir);
    let out = dir.join("x.gif");
    // The fixture's arguments with one flag's value replaced (or added).
    let with = |extra: &[&str]| {
        let mut args = base.clone();
        match args.iter().position(|a| a == extra[0]) {
            Some(i) => args[i + 1] = extra[1].to_string(),
            None => args.extend(extra.iter().map(|s| s.to_string())),
        }
        let mut c = vdit();
        c.args(&args).arg("--output").arg(&out);
        c
    };
    let e = run_err(&mut with(&["--num-frames", "8"]));
    assert!(e.contains("num_frames") && e.contains("4k+1"), "{e}");
    let e = run_err(&mut with(&["--height", "40"]));
    assert!(e.contains("height") && e.contains("16"), "{e}");
    let e = run_err(&mut with(&["--dtype", "f64"]));
    assert!(e.contains("dtype") && e.contains("f64"), "{e}");
    let e = run_err(&mut with(&["--fps", "0"]));
    assert!(e.contains("--fps"), "{e}");

    // A folder without model_index.json.
    let e = run_err(
        vdit()
            .args(["generate", "--prompt", "x", "--model"])
            .arg(&dir)
            .arg("--output")
            .arg(&out),
    );
    assert!(e.contains("model_index.json"), "{e}");

    // A copy of the pipeline whose transformer config has an invalid value.
    let bad = dir.join("bad_pipeline");
    copy_dir(&fixture_dir("pipeline_2b_like").join("pipeline"), &bad);
    let cfg = bad.join("transformer/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_layers\": 2", "\"num_layers\": \"two\"");
    std::fs::write(&cfg, text).unwrap();
    let mut args = base.clone();
    args[2] = bad.display().to_string();
    let e = run_err(vdit().args(&args).arg("--output").arg(&out));
    assert!(e.contains("config.json") && e.contains("num_layers"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
