//! vdit-pipeline: where models and schedulers meet. A library type that the CLI and the server
//! share: the caller gives parameters and an observer (progress + cancellation), and gets latents
//! or frames back. Nothing here prints or draws progress bars.

pub mod defaults;
pub mod text_to_video;

pub use defaults::{GenerationDefaults, GENERATION_CONFIG};

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
