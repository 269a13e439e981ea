//! vdit-video: frames in and out. MP4 (H.264, yuv420p, via openh264 + mp4, no system ffmpeg),
//! GIF, PNG-frame directories and still images; crates only.
//!
//! (in progress)

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
