//! The crate's error type: every failure a user can cause ends here as one clear line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Checkpoint(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("{0}")]
    Format(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// `bail!`-style early return with a formatted [`Error::Msg`] (internal).
#[doc(hidden)]
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
