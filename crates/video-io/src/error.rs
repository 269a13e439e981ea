//! The crate's error type. Every message starts with the path it concerns and says what was
//! expected, so a user can fix the input without reading the source.

use std::fmt;
use std::path::{Path, PathBuf};

/// A path as shown in messages: directories get a trailing `/` so "clip/: no frame_000.png"
/// reads as a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayPath(pub PathBuf, pub bool);

impl DisplayPath {
    pub fn file(path: &Path) -> Self {
        DisplayPath(path.to_path_buf(), false)
    }
    pub fn dir(path: &Path) -> Self {
        DisplayPath(path.to_path_buf(), true)
    }
}

impl fmt::Display for DisplayPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.display().to_string();
        if self.1 && !s.ends_with('/') {
            write!(f, "{s}/")
        } else {
            write!(f, "{s}")
        }
    }
}

/// Everything that can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// The operating system refused a read or write. (`err` is deliberately not the error's
    /// `source()`: the message already says it, and `{:#}` chains would print it twice.)
    #[error("{path}: cannot {action}: {err}")]
    Io {
        path: DisplayPath,
        action: &'static str,
        err: std::io::Error,
    },

    /// MP4/H.264 yuv420p needs even dimensions; we never crop or pad silently.
    #[error(
        "{path}: {axis} {value} is odd; H.264 yuv420p needs even width and height \
         (resize with vdit_video::fit to e.g. {suggest_w}x{suggest_h} first)"
    )]
    OddSize {
        path: DisplayPath,
        axis: &'static str,
        value: u32,
        suggest_w: u32,
        suggest_h: u32,
    },

    /// The video to write has no frames.
    #[error("{path}: the video has no frames; expected at least one")]
    NoFrames { path: DisplayPath },

    /// A frame's byte count or decoded size does not match the clip's size.
    #[error("{path}: frame {index} is {found}, expected {expected}")]
    FrameMismatch {
        path: DisplayPath,
        index: usize,
        found: String,
        expected: String,
    },

    /// A PNG-frame directory lacks a frame it needs.
    #[error("{path}: no {name}{detail}")]
    MissingFrame {
        path: DisplayPath,
        name: String,
        detail: String,
    },

    /// The path's form is not one this crate reads or writes.
    #[error("{path}: {what}; expected {expected}")]
    Unsupported {
        path: DisplayPath,
        what: String,
        expected: &'static str,
    },

    /// A value in the input (or in the `Video` to write) is out of range.
    #[error("{path}: {message}")]
    Invalid { path: DisplayPath, message: String },

    /// A container or image codec (MP4, GIF, PNG, JPEG) rejected the bytes.
    #[error("{path}: invalid {format}: {message}")]
    Format {
        path: DisplayPath,
        format: &'static str,
        message: String,
    },

    /// The H.264 encoder or decoder failed.
    #[error("{path}: H.264 {stage} failed{at}: {message}")]
    Codec {
        path: DisplayPath,
        stage: &'static str,
        at: String,
        message: String,
    },
}

impl VideoError {
    pub(crate) fn io(path: &Path, action: &'static str, err: std::io::Error) -> Self {
        VideoError::Io {
            path: DisplayPath::file(path),
            action,
            err,
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        VideoError::Invalid {
            path: DisplayPath::file(path),
            message: message.into(),
        }
    }

    pub(crate) fn format(path: &Path, format: &'static str, message: impl fmt::Display) -> Self {
        VideoError::Format {
            path: DisplayPath::file(path),
            format,
            message: message.to_string(),
        }
    }

    pub(crate) fn codec(
        path: &Path,
        stage: &'static str,
        frame: Option<usize>,
        message: impl fmt::Display,
    ) -> Self {
        VideoError::Codec {
            path: DisplayPath::file(path),
            stage,
            at: frame.map(|i| format!(" at frame {i}")).unwrap_or_default(),
            message: message.to_string(),
        }
    }
}
