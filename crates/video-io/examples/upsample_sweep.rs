#[path = "../tests/common/mod.rs"]
mod common;
use vdit_video::{video_psnr, yuv420_roundtrip_mode, Video};

fn main() {
    let mut clips: Vec<(String, Video)> = (0..4).map(|v| (format!("shapes v{v}"), common::shapes_clip(64, 64, 17, 8.0, v))).collect();
    clips.push(("gradient".into(), common::gradient_clip(64, 64, 5, 8.0)));
    clips.push(("shapes 128x96".into(), common::shapes_clip(128, 96, 5, 8.0, 1)));
    // Pseudo-natural: smooth noise.
    let mut seed = 12345u64;
    let mut noise = vec![0u8; 64 * 64 * 3];
    for p in noise.iter_mut() { seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); *p = (seed >> 56) as u8; }
    clips.push(("white noise".into(), Video { width: 64, height: 64, fps: 8.0, frames: vec![noise] }));
    for (name, clip) in &clips {
        let mut line = format!("{name:14}");
        for (mode, eps) in [("nearest", 0.0), ("bilinear", 0.0), ("guided", 1.0), ("guided", 4.0), ("guided", 16.0), ("guided", 64.0)] {
            let frames = clip.frames.iter().map(|f| yuv420_roundtrip_mode(f, clip.width, clip.height, mode, eps)).collect();
            let back = Video { frames, ..clip.clone() };
            line += &format!("  {mode}{eps}: {:.2}", video_psnr(clip, &back));
        }
        println!("{line}");
    }
}
