//! Still images (PNG, JPEG) decoded to RGB8 with the `image` crate.

use std::path::Path;

use image::ImageFormat;

use crate::error::{DisplayPath, VideoError};

/// An RGB8 still image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// `width * height * 3` bytes, RGB, row-major, top row first.
    pub data: Vec<u8>,
}

/// Decodes `path` as `format` (or PNG/JPEG sniffed from the bytes when `None`) into RGB8.
/// Alpha is dropped, grey is replicated, 16-bit samples are scaled to 8 bits.
pub(crate) fn decode_rgb(path: &Path, format: Option<ImageFormat>) -> Result<Image, VideoError> {
    let bytes = std::fs::read(path).map_err(|e| VideoError::io(path, "read file", e))?;
    let sniffed = image::guess_format(&bytes).ok();
    let format = match (format, sniffed) {
        (Some(f), _) => f,
        (None, Some(f @ (ImageFormat::Png | ImageFormat::Jpeg))) => f,
        (None, other) => {
            return Err(VideoError::Unsupported {
                path: DisplayPath::file(path),
                what: match other {
                    Some(f) => format!("is a {f:?} image"),
                    None => "is not a recognised image (unknown file signature)".to_string(),
                },
                expected: "a PNG or JPEG image",
            })
        }
    };
    let name = if format == ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    };
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| VideoError::format(path, name, e))?
        .into_rgb8();
    Ok(Image {
        width: img.width(),
        height: img.height(),
        data: img.into_raw(),
    })
}
