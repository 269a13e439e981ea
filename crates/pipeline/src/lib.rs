//! vdit-pipeline: where models and schedulers meet. A library type that the CLI and the server
//! share: the caller gives parameters and an observer (progress + cancellation), and gets latents
//! or frames back. Nothing here prints or draws progress bars.
//!
//! One loaded [`CogVideoXPipeline`] runs every mode; each is diffusers' pipeline of the same name,
//! step for step, and shares its setup, denoising loop and decode with the others (the private
//! `common` module), keeping only what is its own:
//! - [`CogVideoXPipeline::generate`]: text-to-video ([`text_to_video`]);
//! - [`CogVideoXPipeline::image_to_video`]: image-to-video for I2V checkpoints ([`image_to_video`]);
//! - [`CogVideoXPipeline::video_to_video`]: SDEdit-style video-to-video ([`video_to_video`]);
//! - [`CogVideoXPipeline::extend`]: a clip extended forwards or backwards by latent replacement,
//!   with any text-to-video checkpoint ([`extend`]).

mod common;
pub mod defaults;
pub mod extend;
pub mod image_condition;
pub mod image_to_video;
pub mod text_to_video;
pub mod video_to_video;

pub use common::rescale_guidance;
pub use defaults::{GenerationDefaults, GENERATION_CONFIG};

pub use extend::{Direction, ExtendChunk, ExtendOutput, ExtendRequest};
pub use image_to_video::ImageToVideoRequest;
pub use video_to_video::{strength_timesteps, VideoToVideoRequest};

pub use text_to_video::{
    CogVideoXPipeline, Event, GenerateOutput, GenerateRequest, OutputKind, PromptInput,
    TextEncoderPolicy,
};

use candle_core::Tensor;

/// Converts frames `[B, F, 3, H, W]` in `[0, 1]` to RGB8 frames per video, as diffusers'
/// `numpy_to_pil` does: `round(x * 255)`.
pub fn frames_to_rgb8(frames: &Tensor) -> vdit_core::Result<Vec<Vec<Vec<u8>>>> {
    let (b, f, c, h, w) = frames.dims5()?;
    if c != 3 {
        return Err(vdit_core::Error::Msg(format!(
            "expected 3 colour channels, found {c}"
        )));
    }
    // [B, F, 3, H, W] -> [B, F, H, W, 3]
    let x = frames
        .to_dtype(candle_core::DType::F32)?
        .permute((0, 1, 3, 4, 2))?
        .affine(255.0, 0.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .to_dtype(candle_core::DType::U8)?
        .contiguous()?;
    let data = x.flatten_all()?.to_vec1::<u8>()?;
    let per_frame = h * w * 3;
    Ok((0..b)
        .map(|bi| {
            (0..f)
                .map(|fi| {
                    let o = (bi * f + fi) * per_frame;
                    data[o..o + per_frame].to_vec()
                })
                .collect()
        })
        .collect())
}

/// RGB8 frames (each `width * height * 3` bytes, row-major) to a tensor `[1, F, 3, H, W]` in
/// `[0, 1]`: the inverse of [`frames_to_rgb8`] (up to rounding), for conditioning inputs.
pub fn rgb8_to_frames(
    frames: &[Vec<u8>],
    width: usize,
    height: usize,
    device: &candle_core::Device,
) -> vdit_core::Result<Tensor> {
    let n = width * height * 3;
    if frames.is_empty() {
        return Err(vdit_core::Error::invalid("video", "no frames"));
    }
    let mut data = Vec::with_capacity(frames.len() * n);
    for (i, f) in frames.iter().enumerate() {
        if f.len() != n {
            return Err(vdit_core::Error::invalid(
                "video",
                format!(
                    "frame {i} has {} bytes, expected {n} ({width}x{height} RGB8)",
                    f.len()
                ),
            ));
        }
        data.extend(f.iter().map(|&b| b as f32 / 255.0));
    }
    // [F, H, W, 3] -> [1, F, 3, H, W]
    Ok(
        Tensor::from_vec(data, (frames.len(), height, width, 3), device)?
            .permute((0, 3, 1, 2))?
            .unsqueeze(0)?
            .contiguous()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_frames_round_trip_exactly() {
        let (w, h) = (5, 3);
        let frames: Vec<Vec<u8>> = (0..2)
            .map(|f| {
                (0..w * h * 3)
                    .map(|i| ((i * 7 + f * 91) % 256) as u8)
                    .collect()
            })
            .collect();
        let t = rgb8_to_frames(&frames, w, h, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 2, 3, h, w]);
        // channel 1 of pixel (y=1, x=2) of frame 1
        let v = t
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(1)
            .unwrap()
            .get(1)
            .unwrap();
        let v = v.get(2).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(v, frames[1][(w + 2) * 3 + 1] as f32 / 255.0);
        assert_eq!(frames_to_rgb8(&t).unwrap(), vec![frames.clone()]);
        let e = rgb8_to_frames(&[vec![0; 4]], w, h, &candle_core::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame 0 has 4 bytes, expected 45"), "{e}");
    }
}
