//! Test clips shaped like Shapes World (flat colours, hard edges, moving objects).
#![allow(dead_code)]

use vdit_video::Video;

/// Shapes World's palettes (crates/world/src/scene.rs), repeated here so these tests do not
/// depend on the world crate.
pub const OBJECTS: [[u8; 3]; 8] = [
    [220, 40, 40],
    [245, 140, 30],
    [240, 220, 50],
    [50, 190, 70],
    [40, 200, 210],
    [50, 90, 230],
    [160, 70, 200],
    [240, 240, 240],
];
pub const BACKGROUNDS: [[u8; 3]; 4] = [[10, 10, 10], [90, 90, 90], [20, 25, 75], [75, 45, 25]];

/// `frames` frames of a 3-object scene: a large circle moving right, a small square moving
/// down, a large triangle standing still; no anti-aliasing. `variant` picks colours.
pub fn shapes_clip(width: u32, height: u32, frames: usize, fps: f32, variant: usize) -> Video {
    let (w, h) = (width as usize, height as usize);
    let m = w.min(h) as f64;
    let bg = BACKGROUNDS[variant % 4];
    let colours = [
        OBJECTS[variant % 8],
        OBJECTS[(variant + 3) % 8],
        OBJECTS[(variant + 5) % 8],
    ];
    let frames = (0..frames)
        .map(|k| {
            let t = k as f64 / fps as f64;
            let mut f: Vec<u8> = bg.iter().copied().cycle().take(w * h * 3).collect();
            let mut put = |x: usize, y: usize, c: [u8; 3]| {
                f[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
            };
            // Circle, r = 0.14 m, moving right at 0.25 of the width per second.
            let (cx, cy, r) = ((0.25 + 0.25 * t) * w as f64, 0.3 * h as f64, 0.14 * m);
            // Square, half-extent 0.075 m, moving down.
            let (sx, sy, s) = (0.7 * w as f64, (0.2 + 0.2 * t) * h as f64, 0.075 * m);
            // Triangle (apex up), half-extent 0.14 m, still.
            let (tx, ty, tr) = (0.35 * w as f64, 0.72 * h as f64, 0.14 * m);
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                    if (px - cx).powi(2) + (py - cy).powi(2) <= r * r {
                        put(x, y, colours[0]);
                    }
                    if (px - sx).abs() <= s && (py - sy).abs() <= s {
                        put(x, y, colours[1]);
                    }
                    let dy = py - (ty - tr);
                    if (0.0..=2.0 * tr).contains(&dy) && (px - tx).abs() <= dy / 2.0 {
                        put(x, y, colours[2]);
                    }
                }
            }
            f
        })
        .collect();
    Video {
        width,
        height,
        fps,
        frames,
    }
}

/// A smooth gradient clip with many colours (> 256 per frame) and slow motion.
pub fn gradient_clip(width: u32, height: u32, frames: usize, fps: f32) -> Video {
    let (w, h) = (width as usize, height as usize);
    let frames = (0..frames)
        .map(|k| {
            let mut f = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    f.push(((x * 255) / w.max(2).saturating_sub(1)).min(255) as u8);
                    f.push(((y * 255) / h.max(2).saturating_sub(1)).min(255) as u8);
                    f.push(((x + y + 4 * k) * 3 % 256) as u8);
                }
            }
            f
        })
        .collect();
    Video {
        width,
        height,
        fps,
        frames,
    }
}

/// A fresh empty directory under the target dir for one test.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("vdit-video-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
