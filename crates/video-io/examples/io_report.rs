//! Measures round trips on 64x64, 17-frame, 8 fps Shapes-World-like clips: MP4 PSNR, bitrate
//! and timings per H.264 quantiser, the yuv420p ceiling (no H.264), and write/read times for
//! every format.
//!
//! `cargo run -p vdit-video --release --example io_report`
#[path = "../tests/common/mod.rs"]
mod common;

use vdit_video::{read_video, video_psnr, write_video_with, yuv420_roundtrip, H264Options, Video};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("vdit-mp4-quality");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("clip.mp4");
    let clips: Vec<Video> = (0..4)
        .map(|v| common::shapes_clip(64, 64, 17, 8.0, v))
        .collect();
    let mut line = "yuv420p only:".to_string();
    for clip in &clips {
        let frames = clip
            .frames
            .iter()
            .map(|f| yuv420_roundtrip(f, clip.width, clip.height).expect("even size"))
            .collect();
        let back = Video {
            frames,
            ..clip.clone()
        };
        line += &format!("  {:5.2} dB", video_psnr(clip, &back));
    }
    println!("{line}");
    for qp in [12u8, 16, 20, 24, 28] {
        let mut line = format!("qp {qp:2}:");
        for clip in &clips {
            let opts = H264Options {
                qp,
                ..H264Options::default()
            };
            let t = std::time::Instant::now();
            write_video_with(&path, clip, &opts)?;
            let write_ms = t.elapsed().as_secs_f64() * 1e3;
            let bytes = std::fs::metadata(&path)?.len();
            let t = std::time::Instant::now();
            let back = read_video(&path)?;
            let read_ms = t.elapsed().as_secs_f64() * 1e3;
            let seconds = clip.frames.len() as f64 / clip.fps as f64;
            line += &format!(
                "  {:5.2} dB {:4.1} kbit/s (write {write_ms:.1} ms, read {read_ms:.1} ms)",
                video_psnr(clip, &back),
                bytes as f64 * 8.0 / seconds / 1e3
            );
        }
        println!("{line}");
    }
    for name in ["clip.mp4", "clip.gif", "clip_png"] {
        let p = dir.join(name);
        let runs = 20;
        let (mut write_ms, mut read_ms) = (0.0, 0.0);
        for _ in 0..runs {
            let t = std::time::Instant::now();
            vdit_video::write_video(&p, &clips[0])?;
            write_ms += t.elapsed().as_secs_f64() * 1e3 / runs as f64;
            let t = std::time::Instant::now();
            read_video(&p)?;
            read_ms += t.elapsed().as_secs_f64() * 1e3 / runs as f64;
        }
        println!("{name:9}: write {write_ms:.2} ms, read {read_ms:.2} ms (mean of {runs})");
    }
    Ok(())
}
