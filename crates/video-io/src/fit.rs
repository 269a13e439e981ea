//! Resizing conditioning inputs to the model's size: scale to cover, then centre-crop.
//!
//! The scale is `max(W / w, H / h)`, so the scaled source covers the target and only the longer
//! side overflows. The crop is taken in source pixels (the centred `round(W / scale) x
//! round(H / scale)` window, odd leftovers going to the right/bottom) and then resampled to
//! exactly `W x H` with a Lanczos-3 filter (diffusers' `VaeImageProcessor` default), which
//! averages properly when shrinking.

use image::imageops::{self, FilterType};
use image::RgbImage;

use crate::image_io::Image;
use crate::Video;

/// Where the crop window sits in the source and what the message says about it.
struct Plan {
    x: u32,
    y: u32,
    cw: u32,
    ch: u32,
    message: String,
}

fn plan(what: &str, w: u32, h: u32, tw: u32, th: u32) -> Plan {
    let scale = (tw as f64 / w as f64).max(th as f64 / h as f64);
    let cw = ((tw as f64 / scale).round() as u32).clamp(1, w);
    let ch = ((th as f64 / scale).round() as u32).clamp(1, h);
    let (x, y) = ((w - cw) / 2, (h - ch) / 2);
    let verb = if scale > 1.0 {
        "upscaled"
    } else {
        "downscaled"
    };
    let mut cuts = Vec::new();
    if cw < w {
        cuts.push(format!("{x} px left and {} px right", w - cw - x));
    }
    if ch < h {
        cuts.push(format!("{y} px top and {} px bottom", h - ch - y));
    }
    let crop = if cuts.is_empty() {
        "no crop needed (same aspect ratio)".to_string()
    } else {
        format!("centre-cropped the source by {}", cuts.join(" and "))
    };
    let scale_txt = if (scale - 1.0).abs() < 1e-9 {
        "kept the scale".to_string()
    } else {
        format!("{verb} by {scale:.3}")
    };
    Plan {
        x,
        y,
        cw,
        ch,
        message: format!("{what} resized from {w}x{h} to {tw}x{th}: {scale_txt} to cover, {crop}"),
    }
}

fn apply(plan: &Plan, w: u32, h: u32, data: &[u8], tw: u32, th: u32) -> Vec<u8> {
    let Some(src) = RgbImage::from_raw(w, h, data.to_vec()) else {
        return vec![0; (tw * th * 3) as usize];
    };
    let cropped = imageops::crop_imm(&src, plan.x, plan.y, plan.cw, plan.ch).to_image();
    if (plan.cw, plan.ch) == (tw, th) {
        return cropped.into_raw();
    }
    imageops::resize(&cropped, tw, th, FilterType::Lanczos3).into_raw()
}

/// Problems `fit` cannot fix; reported in the message alongside a black result.
fn degenerate(what: &str, w: u32, h: u32, bytes: usize, tw: u32, th: u32) -> Option<String> {
    if tw == 0 || th == 0 {
        return Some(format!(
            "{what}: target size {tw}x{th} is empty; returned an empty {what}"
        ));
    }
    let expected = w as usize * h as usize * 3;
    if w == 0 || h == 0 || bytes != expected {
        return Some(format!(
            "{what} {w}x{h} has {bytes} bytes, expected {expected} (RGB8); returned a black {tw}x{th} {what}"
        ));
    }
    None
}

/// Scales `image` to cover `width x height` and centre-crops the overflow. Returns the result
/// and a message describing what was done, or `None` when the size already matched (the image
/// is returned unchanged). Never panics: an empty target gives an empty image and malformed
/// input (data length not `width * height * 3`) a black one, both with a message saying so.
pub fn fit(image: &Image, width: u32, height: u32) -> (Image, Option<String>) {
    let (w, h) = (image.width, image.height);
    if let Some(msg) = degenerate("image", w, h, image.data.len(), width, height) {
        let data = vec![0; width as usize * height as usize * 3];
        return (
            Image {
                width,
                height,
                data,
            },
            Some(msg),
        );
    }
    if (w, h) == (width, height) {
        return (image.clone(), None);
    }
    let plan = plan("image", w, h, width, height);
    let data = apply(&plan, w, h, &image.data, width, height);
    (
        Image {
            width,
            height,
            data,
        },
        Some(plan.message),
    )
}

/// [`fit`] for every frame of a clip (the same crop for all frames); fps is kept.
pub fn fit_video(video: &Video, width: u32, height: u32) -> (Video, Option<String>) {
    let (w, h) = (video.width, video.height);
    let expected = w as usize * h as usize * 3;
    let bad = video.frames.iter().position(|f| f.len() != expected);
    let problem = match bad {
        Some(i) => degenerate("video", w, h, video.frames[i].len(), width, height)
            .map(|m| m.replacen("video", &format!("video frame {i}"), 1)),
        None => degenerate("video", w, h, expected, width, height),
    };
    if let Some(msg) = problem {
        let frames = vec![vec![0; width as usize * height as usize * 3]; video.frames.len()];
        return (
            Video {
                width,
                height,
                fps: video.fps,
                frames,
            },
            Some(msg),
        );
    }
    if (w, h) == (width, height) {
        return (video.clone(), None);
    }
    let plan = plan("video", w, h, width, height);
    let frames = video
        .frames
        .iter()
        .map(|f| apply(&plan, w, h, f, width, height))
        .collect();
    (
        Video {
            width,
            height,
            fps: video.fps,
            frames,
        },
        Some(plan.message),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_centres_the_crop() {
        let p = plan("image", 100, 50, 64, 64);
        assert_eq!((p.x, p.y, p.cw, p.ch), (25, 0, 50, 50));
        assert!(
            p.message.contains("25 px left and 25 px right"),
            "{}",
            p.message
        );
        let p = plan("image", 128, 128, 64, 64);
        assert_eq!((p.x, p.y, p.cw, p.ch), (0, 0, 128, 128));
        assert!(p.message.contains("downscaled by 0.500"), "{}", p.message);
        assert!(p.message.contains("no crop"), "{}", p.message);
        let p = plan("image", 64, 48, 64, 64);
        assert_eq!((p.x, p.y, p.cw, p.ch), (8, 0, 48, 48));
    }
}
