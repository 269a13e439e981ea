//! Image-to-video with a text-to-video model: the image as a conditioning frame.
//!
//! An image-to-video checkpoint (CogVideoX-5b-I2V: transformer `in_channels` = 2 x the VAE's
//! latent channels) takes the image on extra channels ([`CogVideoXPipeline::image_to_video`]).
//! A text-to-video model has no such channels, but the causal VAE gives the image a place of its
//! own: latent frame 0 encodes pixel frame 0 alone. So the image is a one-frame clip extended
//! forwards by latent replacement ([`crate::extend`]): latent 0 is held at the image's latent
//! (noised to each step's level) while the transformer generates the other latent frames with
//! full attention to it, and the whole window is decoded. Frame 0 of the result is the VAE's
//! reconstruction of the image; frames 1.. continue it as the prompt says.
//!
//! This is how vdit's default model (a text-to-video model) takes an image: one model, optional
//! conditioning frames. Limits: one image and one prompt per call; the frame count must be a
//! window the extension accepts (8k+1: 9, 17, 25, ...).

use std::ops::ControlFlow;

use vdit_core::{Error, Result};

use crate::common::with_batch_axis;
use crate::{
    CogVideoXPipeline, Direction, Event, ExtendRequest, GenerateOutput, ImageToVideoRequest,
    OutputKind,
};

impl CogVideoXPipeline {
    /// Image-to-video for a text-to-video model (see the module docs); reports to `observer` as
    /// [`Self::extend`] does. Returns the window's final `latents` and, for
    /// [`OutputKind::Frames`], the decoded window `frames` `[1, F, 3, H, W]` (frame 0: the image
    /// as the VAE reconstructs it).
    pub fn image_to_video_by_replacement(
        &mut self,
        req: ImageToVideoRequest,
        observer: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        if self.is_image_to_video() {
            return Err(Error::invalid(
                "image",
                "this model is an image-to-video checkpoint: use image_to_video (the image goes in on the transformer's image channels)",
            ));
        }
        let ImageToVideoRequest {
            mut request,
            image,
            image_noise,
            image_noise_sigma,
        } = req;
        if image_noise.is_some() || image_noise_sigma.is_some() {
            return Err(Error::invalid(
                "image_noise_sigma",
                "not used when a text-to-video model takes an image: the image's latent is its posterior mean, not a noised sample",
            ));
        }
        let image = with_batch_axis(image, 4, "image", "[1, 3, H, W]")?;
        let (b, c, h, w) = image.dims4()?;
        if b != 1 || c != 3 {
            return Err(Error::invalid(
                "image",
                format!(
                    "a text-to-video model takes one RGB image [1, 3, H, W] per call, found {:?}",
                    image.dims()
                ),
            ));
        }
        let (frames, _, _) = self.resolve_size(&request)?;
        if frames < 2 {
            return Err(Error::invalid(
                "num_frames",
                format!("image-to-video needs at least 2 frames, got {frames}"),
            ));
        }
        request.num_frames = Some(frames);
        let decoded = matches!(request.output, OutputKind::Frames);
        let out = self.extend(
            ExtendRequest {
                request,
                video: image.unsqueeze(1)?, // [1, 1, 3, H, W]
                direction: Direction::Forward,
                num_frames: frames - 1,
                context_latents: Some(1),
            },
            observer,
        )?;
        let chunk = out
            .chunks
            .last()
            .ok_or_else(|| Error::Msg("extension ran no window".into()))?;
        let window = out.last_window.dim(1)?;
        if window != frames {
            return Err(Error::Msg(format!(
                "the window decoded to {window} frames, expected {frames}"
            )));
        }
        Ok(GenerateOutput {
            latents: chunk.latents.clone(),
            frames: decoded.then_some(out.last_window),
            num_frames: frames,
            height: h,
            width: w,
        })
    }
}
