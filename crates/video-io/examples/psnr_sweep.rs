//! Measures MP4 round-trip PSNR and size for H.264 settings on Shapes-World-like clips.
//! `cargo run -p vdit-video --example psnr_sweep`
#[path = "../tests/common/mod.rs"]
mod common;

use vdit_video::{read_video, video_psnr, write_video_with, H264Options};

fn main() {
    let dir = std::env::temp_dir().join("vdit-psnr-sweep");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("clip.mp4");
    for variant in 0..4 {
        let clip = common::shapes_clip(64, 64, 17, 8.0, variant);
        let ceil: Vec<Vec<u8>> = clip.frames.iter().map(|f| vdit_video::yuv420_roundtrip(f, 64, 64).unwrap()).collect();
        let c = vdit_video::Video { frames: ceil, ..clip.clone() };
        println!("ceiling v{variant}: {:.2} dB", video_psnr(&clip, &c));
    }
    for max_qp in [51u8, 30, 26, 24, 22, 20, 18, 16, 12, 8, 0] {
        let mut line = format!("max_qp {max_qp:2}:");
        for variant in 0..4 {
            let clip = common::shapes_clip(64, 64, 17, 8.0, variant);
            let opts = H264Options { min_qp: 0, max_qp, ..H264Options::default() };
            let t = std::time::Instant::now();
            write_video_with(&path, &clip, &opts).unwrap();
            let tw = t.elapsed();
            let size = std::fs::metadata(&path).unwrap().len();
            let t = std::time::Instant::now();
            let back = read_video(&path).unwrap();
            let tr = t.elapsed();
            let p = video_psnr(&clip, &back);
            line += &format!(
                "  v{variant} {p:5.2} dB {:5.1} kbit/s (w {:.1} ms r {:.1} ms)",
                size as f64 * 8.0 / (17.0 / 8.0) / 1000.0,
                tw.as_secs_f64() * 1e3,
                tr.as_secs_f64() * 1e3
            );
        }
        println!("{line}");
    }
}
