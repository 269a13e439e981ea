//! A directory of PNG frames: `frame_000.png`, `frame_001.png`, ... plus `fps.txt`.
//!
//! Names use 3 digits, or as many as the last index needs (`frame_0000.png` ... for clips of
//! more than 1000 frames). Reading accepts any zero padding, sorts by the number, and requires
//! the numbers to run 0, 1, 2, ... without gaps, so a half-written or mixed directory is an
//! error rather than a silently shorter clip. The frame rate comes from `fps.txt` (one decimal
//! number, written by [`crate::write_video`]); without it the rate is [`DEFAULT_FPS`].

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{DisplayPath, VideoError};
use crate::Video;

/// The frame rate assumed for a PNG directory without `fps.txt` (CogVideoX's output rate).
pub const DEFAULT_FPS: f32 = 8.0;

/// The file name of frame `index` in a clip of `count` frames.
pub fn frame_name(index: usize, count: usize) -> String {
    let digits = count.saturating_sub(1).to_string().len().max(3);
    format!("frame_{index:0digits$}.png")
}

/// Parses `frame_<digits>.png` into its number.
fn frame_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("frame_")?.strip_suffix(".png")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists `(index, file name)` of the frame files in `dir`, unsorted.
fn list_frames(dir: &Path) -> Result<Vec<(usize, String)>, VideoError> {
    let entries = std::fs::read_dir(dir).map_err(|e| VideoError::Io {
        path: DisplayPath::dir(dir),
        action: "list directory",
        err: e,
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| VideoError::Io {
            path: DisplayPath::dir(dir),
            action: "list directory",
            err: e,
        })?;
        let name = entry.file_name();
        if let Some(index) = name.to_str().and_then(frame_index) {
            out.push((index, name.to_string_lossy().into_owned()));
        }
    }
    Ok(out)
}

pub(crate) fn write(dir: &Path, video: &Video) -> Result<(), VideoError> {
    std::fs::create_dir_all(dir).map_err(|e| VideoError::Io {
        path: DisplayPath::dir(dir),
        action: "create directory",
        err: e,
    })?;
    let n = video.frames.len();
    let names: Vec<String> = (0..n).map(|i| frame_name(i, n)).collect();
    // Remove frames of an earlier, different clip so reading back gives exactly this one.
    for (_, old) in list_frames(dir)? {
        if !names.contains(&old) {
            let p = dir.join(&old);
            std::fs::remove_file(&p).map_err(|e| VideoError::io(&p, "remove stale frame", e))?;
        }
    }
    for (frame, name) in video.frames.iter().zip(&names) {
        let p = dir.join(name);
        write_png(&p, video.width, video.height, frame)?;
    }
    let p = dir.join("fps.txt");
    std::fs::write(&p, format!("{}\n", video.fps)).map_err(|e| VideoError::io(&p, "write file", e))
}

fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<(), VideoError> {
    let file = File::create(path).map_err(|e| VideoError::io(path, "create file", e))?;
    let png_err = |e: png::EncodingError| VideoError::format(path, "PNG (while writing)", e);
    let mut encoder = png::Encoder::new(BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

pub(crate) fn read(dir: &Path) -> Result<Video, VideoError> {
    let mut found = list_frames(dir)?;
    found.sort();
    if found.is_empty() {
        return Err(VideoError::MissingFrame {
            path: DisplayPath::dir(dir),
            name: "frame_000.png".into(),
            detail: " (the directory has no frame_NNN.png files)".into(),
        });
    }
    for pair in found.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(VideoError::Invalid {
                path: DisplayPath::dir(dir),
                message: format!(
                    "{} and {} are both frame {}; expected one file per frame number",
                    pair[0].1, pair[1].1, pair[0].0
                ),
            });
        }
    }
    for (k, (index, _)) in found.iter().enumerate() {
        if *index != k {
            return Err(VideoError::MissingFrame {
                path: DisplayPath::dir(dir),
                name: frame_name(k, found.len()),
                detail: format!(
                    " (frames must be numbered 0, 1, 2, ... without gaps; found {} files up to {})",
                    found.len(),
                    found[found.len() - 1].1
                ),
            });
        }
    }
    let paths: Vec<PathBuf> = found.iter().map(|(_, name)| dir.join(name)).collect();
    let first = crate::image_io::decode_rgb(&paths[0], Some(image::ImageFormat::Png))?;
    let (w, h) = (first.width, first.height);
    let mut frames = Vec::with_capacity(paths.len());
    frames.push(first.data);
    for (i, p) in paths.iter().enumerate().skip(1) {
        let img = crate::image_io::decode_rgb(p, Some(image::ImageFormat::Png))?;
        if (img.width, img.height) != (w, h) {
            return Err(VideoError::FrameMismatch {
                path: DisplayPath::file(p),
                index: i,
                found: format!("{}x{}", img.width, img.height),
                expected: format!("{w}x{h} (the size of {})", found[0].1),
            });
        }
        frames.push(img.data);
    }
    Ok(Video {
        width: w,
        height: h,
        fps: read_fps(dir)?,
        frames,
    })
}

fn read_fps(dir: &Path) -> Result<f32, VideoError> {
    let p = dir.join("fps.txt");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DEFAULT_FPS),
        Err(e) => return Err(VideoError::io(&p, "read file", e)),
    };
    let fps: f32 = text.trim().parse().map_err(|_| {
        VideoError::invalid(
            &p,
            format!(
                "{:?} is not a number; expected the frame rate, e.g. 8",
                text.trim()
            ),
        )
    })?;
    crate::check_fps(&p, fps)?;
    Ok(fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pad_to_three_digits_or_more() {
        assert_eq!(frame_name(0, 17), "frame_000.png");
        assert_eq!(frame_name(999, 1000), "frame_999.png");
        assert_eq!(frame_name(7, 1001), "frame_0007.png");
        assert_eq!(frame_name(1000, 1001), "frame_1000.png");
        assert_eq!(frame_index("frame_0012.png"), Some(12));
        assert_eq!(frame_index("frame_.png"), None);
        assert_eq!(frame_index("frame_01a.png"), None);
        assert_eq!(frame_index("frame_001.jpg"), None);
    }
}
