//! The crate's error type: every failure a user can cause ends here as one clear line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on `path`. The OS message is part of this line and deliberately NOT a
    /// `#[source]`: error reporters that print the chain (`anyhow`'s `{:#}`) would repeat it.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
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
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
}

/// `bail!`-style early return with a formatted [`Error::Msg`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Msg(format!($($arg)*))) };
}
