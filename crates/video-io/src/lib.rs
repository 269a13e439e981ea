//! vdit-video: frames in and out. MP4 (H.264, yuv420p, via openh264 + mp4, no system ffmpeg),
//! GIF, PNG-frame directories and still images; crates only.
//!
//! - [`write_video`] / [`read_video`] pick the format from the path: `*.mp4` (H.264 in MP4, see
//!   [`H264Options`]), `*.gif` (looping GIF), anything else a directory of
//!   `frame_000.png`, `frame_001.png`, ... with an `fps.txt`.
//! - [`read_image`] reads a PNG or JPEG still; [`fit`] / [`fit_video`] scale to cover a target
//!   size and centre-crop, for conditioning inputs.
//! - [`psnr`] / [`video_psnr`] measure fidelity (used by tests and the world scorer).
//!
//! All errors are [`VideoError`]s whose messages start with the path and say what was expected.

mod error;
mod fit;
mod gif;
mod image_io;
mod mp4;
mod pngdir;
mod yuv;

use std::path::Path;

pub use error::{DisplayPath, VideoError};
pub use fit::{fit, fit_video};
pub use gif::gif_delay_cs;
pub use image_io::Image;
pub use mp4::{H264Options, MIN_QP};
pub use pngdir::{frame_name, DEFAULT_FPS};

/// A clip of RGB8 frames.
#[derive(Debug, Clone, PartialEq)]
pub struct Video {
    pub width: u32,
    pub height: u32,
    /// Frames per second.
    pub fps: f32,
    /// Each frame is `width * height * 3` bytes, RGB, row-major, top row first.
    pub frames: Vec<Vec<u8>>,
}

/// The container a path stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    /// H.264 in MP4 (`.mp4`, case-insensitive).
    Mp4,
    /// Animated GIF (`.gif`).
    Gif,
    /// A directory of `frame_NNN.png` files.
    PngDir,
}

/// Extensions of formats we do not write, rejected rather than turned into a directory name.
const FOREIGN: &[&str] = &[
    "png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "apng", "avi", "mov", "mkv", "webm", "m4v",
    "mpg", "mpeg", "h264", "264", "y4m", "ogv", "flv", "wmv", "txt", "json",
];

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// The format [`write_video`] uses for `path`: `.mp4` and `.gif` files, a directory for a path
/// without an extension or with one that is not a known image/video/text format; a known
/// foreign extension (`.avi`, `.png`, `.webm`, ...) is an error, since writing a directory
/// called `out.avi/` is never what was meant.
pub fn output_format(path: &Path) -> Result<VideoFormat, VideoError> {
    match extension(path).as_deref() {
        Some("mp4") => Ok(VideoFormat::Mp4),
        Some("gif") => Ok(VideoFormat::Gif),
        Some(ext) if FOREIGN.contains(&ext) => Err(VideoError::Unsupported {
            path: DisplayPath::file(path),
            what: format!("cannot write .{ext} files"),
            expected: ".mp4, .gif, or a directory path (no extension) for PNG frames",
        }),
        _ => Ok(VideoFormat::PngDir),
    }
}

/// The format [`read_video`] uses for `path`: a directory is a PNG-frame directory; a file is
/// MP4 or GIF by extension, or by its first bytes (`GIF8`, or `ftyp` at offset 4) when the
/// extension says neither.
pub fn input_format(path: &Path) -> Result<VideoFormat, VideoError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            VideoError::Unsupported {
                path: DisplayPath::file(path),
                what: "does not exist".into(),
                expected: "an .mp4 or .gif file, or a directory of frame_NNN.png files",
            }
        } else {
            VideoError::io(path, "open", e)
        }
    })?;
    if meta.is_dir() {
        return Ok(VideoFormat::PngDir);
    }
    match extension(path).as_deref() {
        Some("mp4" | "m4v") => return Ok(VideoFormat::Mp4),
        Some("gif") => return Ok(VideoFormat::Gif),
        _ => {}
    }
    let mut head = [0u8; 12];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| VideoError::io(path, "open file", e))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(VideoError::io(path, "read file", e)),
            }
        }
        n
    };
    if n >= 4 && &head[..4] == b"GIF8" {
        return Ok(VideoFormat::Gif);
    }
    if n >= 8 && &head[4..8] == b"ftyp" {
        return Ok(VideoFormat::Mp4);
    }
    Err(VideoError::Unsupported {
        path: DisplayPath::file(path),
        what: match extension(path) {
            Some(ext) => {
                format!("unsupported video format .{ext} (neither MP4 nor GIF by content)")
            }
            None => "is neither MP4 nor GIF by content".to_string(),
        },
        expected: "an .mp4 or .gif file, or a directory of frame_NNN.png files",
    })
}

/// Frame rates this crate accepts (MP4 stores `round(fps * 1000)` ticks per second).
pub const FPS_RANGE: std::ops::RangeInclusive<f32> = 0.01..=1000.0;

pub(crate) fn check_fps(path: &Path, fps: f32) -> Result<(), VideoError> {
    if fps.is_finite() && FPS_RANGE.contains(&fps) {
        Ok(())
    } else {
        Err(VideoError::invalid(
            path,
            format!(
                "fps {fps} is out of range; expected {}..={} frames per second",
                FPS_RANGE.start(),
                FPS_RANGE.end()
            ),
        ))
    }
}

/// Checks the clip before any byte is written: frames present, sizes consistent, fps sane.
fn check_video(path: &Path, video: &Video) -> Result<(), VideoError> {
    if video.frames.is_empty() {
        return Err(VideoError::NoFrames {
            path: DisplayPath::file(path),
        });
    }
    if video.width == 0 || video.height == 0 {
        return Err(VideoError::invalid(
            path,
            format!(
                "size {}x{} is empty; expected width and height of at least 1",
                video.width, video.height
            ),
        ));
    }
    let expected = video.width as usize * video.height as usize * 3;
    for (index, frame) in video.frames.iter().enumerate() {
        if frame.len() != expected {
            return Err(VideoError::FrameMismatch {
                path: DisplayPath::file(path),
                index,
                found: format!("{} bytes", frame.len()),
                expected: format!("{expected} bytes ({}x{} RGB8)", video.width, video.height),
            });
        }
    }
    check_fps(path, video.fps)
}

/// Writes `video` to `path` in the format the path names (see [`output_format`]): H.264 MP4
/// with the default [`H264Options`], a looping GIF (frame delay `round(100 / fps)`
/// centiseconds, see [`gif_delay_cs`]: GIF delays are whole 1/100 s, so e.g. 8 fps is stored as
/// 13 cs and reads back as 7.69 fps), or a directory of PNG frames plus `fps.txt` (stale
/// `frame_*.png` files from an earlier clip are removed).
///
/// MP4 needs even width and height (yuv420p); an odd size is an error, never a silent crop.
pub fn write_video(path: &Path, video: &Video) -> Result<(), VideoError> {
    write_video_with(path, video, &H264Options::default())
}

/// [`write_video`] with explicit H.264 settings (ignored for GIF and PNG output).
pub fn write_video_with(path: &Path, video: &Video, h264: &H264Options) -> Result<(), VideoError> {
    let format = output_format(path)?;
    check_video(path, video)?;
    let t = std::time::Instant::now();
    match format {
        VideoFormat::Mp4 => mp4::write(path, video, h264)?,
        VideoFormat::Gif => gif::write(path, video)?,
        VideoFormat::PngDir => pngdir::write(path, video)?,
    }
    tracing::debug!(
        path = %path.display(),
        frames = video.frames.len(),
        ms = t.elapsed().as_secs_f64() * 1e3,
        "wrote video"
    );
    Ok(())
}

/// Reads a clip (see [`input_format`]): MP4 (first H.264 track, any profile openh264 decodes,
/// B-frames included, returned in display order; converted with the same BT.601 limited-range
/// matrix the writer uses, chroma brought back to full resolution guided by luma, which keeps
/// colour edges sharp: 42-44 dB on Shapes-World-like clips where plain interpolation is capped
/// near 31 dB by yuv420p itself; fps = samples * timescale / track duration), GIF (frames composited as a browser shows them; fps = 100 /
/// mean delay), or a PNG-frame directory (frames sorted by number, which must run from 0
/// without gaps; fps from `fps.txt`, else [`DEFAULT_FPS`] = 8).
pub fn read_video(path: &Path) -> Result<Video, VideoError> {
    let t = std::time::Instant::now();
    let video = match input_format(path)? {
        VideoFormat::Mp4 => mp4::read(path)?,
        VideoFormat::Gif => gif::read(path)?,
        VideoFormat::PngDir => pngdir::read(path)?,
    };
    tracing::debug!(
        path = %path.display(),
        frames = video.frames.len(),
        ms = t.elapsed().as_secs_f64() * 1e3,
        "read video"
    );
    Ok(video)
}

/// Reads a PNG or JPEG (recognised by content, whatever the extension) as RGB8. Alpha is
/// dropped, grey replicated, 16-bit samples reduced to 8 bits.
pub fn read_image(path: &Path) -> Result<Image, VideoError> {
    image_io::decode_rgb(path, None)
}

/// Peak signal-to-noise ratio in dB between two RGB8 buffers (peak 255); `f64::INFINITY` when
/// identical, NaN when the lengths differ or the buffers are empty.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::NAN;
    }
    let se: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as i64 - y as i64;
            (d * d) as u64
        })
        .sum();
    mse_to_psnr(se as f64 / a.len() as f64)
}

/// PSNR over all frames of two clips (the mean squared error pooled over every sample);
/// NaN when sizes or frame counts differ.
pub fn video_psnr(a: &Video, b: &Video) -> f64 {
    if (a.width, a.height, a.frames.len()) != (b.width, b.height, b.frames.len())
        || a.frames.is_empty()
    {
        return f64::NAN;
    }
    let mut se = 0u64;
    let mut n = 0usize;
    for (fa, fb) in a.frames.iter().zip(&b.frames) {
        if fa.len() != fb.len() {
            return f64::NAN;
        }
        se += fa
            .iter()
            .zip(fb)
            .map(|(&x, &y)| ((x as i64 - y as i64) * (x as i64 - y as i64)) as u64)
            .sum::<u64>();
        n += fa.len();
    }
    if n == 0 {
        return f64::NAN;
    }
    mse_to_psnr(se as f64 / n as f64)
}

fn mse_to_psnr(mse: f64) -> f64 {
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// What yuv420p alone does to an RGB8 frame of even size: the conversion and 2x2 chroma
/// subsampling the MP4 writer applies, followed by the reader's reconstruction, without H.264.
/// This is the fidelity ceiling of an MP4 round trip. Returns `None` for odd sizes or a buffer
/// that is not `width * height * 3` bytes.
pub fn yuv420_roundtrip(frame: &[u8], width: u32, height: u32) -> Option<Vec<u8>> {
    let (w, h) = (width as usize, height as usize);
    if w % 2 == 1 || h % 2 == 1 || frame.len() != w * h * 3 {
        return None;
    }
    let buf = yuv::rgb_to_i420(frame, w, h);
    let (y, uv) = buf.split_at(w * h);
    let (u, v) = uv.split_at(w * h / 4);
    let mut out = Vec::with_capacity(w * h * 3);
    let pic = yuv::I420 {
        y,
        u,
        v,
        y_stride: w,
        uv_stride: w / 2,
    };
    yuv::i420_to_rgb(&pic, w, h, &mut out);
    Some(out)
}
