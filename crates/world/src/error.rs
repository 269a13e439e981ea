//! The crate's error type. Messages name the caption word, file, line or argument at fault and
//! say what was expected against what was found.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caption word that is not in the Shapes World vocabulary at all.
    #[error("caption {caption:?}: word {position} {word:?} is not in the Shapes World grammar (expected {expected})")]
    UnknownWord {
        caption: String,
        word: String,
        /// 1-based word position.
        position: usize,
        expected: String,
    },
    /// A vocabulary word in a place the grammar does not allow.
    #[error("caption {caption:?}: word {position} {word:?} is out of place (expected {expected})")]
    UnexpectedWord {
        caption: String,
        word: String,
        position: usize,
        expected: String,
    },
    /// The caption stops before the grammar is satisfied.
    #[error("caption {caption:?}: ends too early (expected {expected})")]
    UnexpectedEnd { caption: String, expected: String },
    /// A bad argument from the caller (a CLI flag, an API field).
    #[error("invalid {name}: {msg}")]
    InvalidArgument { name: String, msg: String },
    /// A file-system error (the message already includes the OS error, so it is not repeated
    /// as a source).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A malformed line of a `captions.jsonl` file.
    #[error("{path}: line {line}: {msg}")]
    Record {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A video that cannot be read or written, or does not match what the caption file says.
    #[error("{path}: {msg}")]
    Video { path: PathBuf, msg: String },
}

impl Error {
    pub fn invalid(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    pub fn video(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Video {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
