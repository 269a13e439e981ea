//! The library error type. Messages are for people: they name the file, the key or the flag,
//! and say what was expected against what was found.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (`err` is not marked as the source so that `{:#}` chains do not print it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A config file that does not parse, or a field with a wrong type or value.
    #[error("{file}: {key}: {msg}")]
    Config {
        file: PathBuf,
        key: String,
        msg: String,
    },
    /// Problems with checkpoint tensors: missing, extra, mis-shaped, unreadable.
    #[error("{0}")]
    Weights(String),
    /// A bad argument from the caller (a CLI flag, an API field, a pipeline parameter).
    #[error("invalid {name}: {msg}")]
    InvalidArgument { name: String, msg: String },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    pub fn config(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            file: file.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn invalid(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            msg: msg.into(),
        }
    }
}

/// Candle errors raised inside a `VarBuilder` backend carry our message in `Msg`/`Wrapped`;
/// this recovers the plain text so the user sees it without candle's backtrace noise.
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_msg(inner))
        }
        other => other.to_string(),
    }
}
