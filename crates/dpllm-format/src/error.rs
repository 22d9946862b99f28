//! Errors that name the file and the problem.

use std::path::PathBuf;

/// Everything that can be wrong with a model directory or file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A required file is not there.
    #[error("{path} is missing: {what}")]
    Missing {
        /// The file that should exist.
        path: PathBuf,
        /// Why it is needed.
        what: String,
    },
    /// A file or directory could not be created, written or moved into place.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// dpllm refuses to write or replace an output (it is an input, or not dpllm's own).
    #[error("cannot write {path}: {reason}")]
    Refused {
        /// The output path.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A file exists but its content is malformed, truncated or inconsistent.
    #[error("{path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The config names an architecture this engine does not implement.
    #[error("{path}: unsupported architecture {name:?}; supported: {supported}")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture named there.
        name: String,
        /// The supported ones.
        supported: String,
    },
    /// A tensor the architecture needs is not in any shard.
    #[error("tensor {name:?} not found in the checkpoint at {dir}")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has the wrong shape or dtype for the config.
    #[error("tensor {name:?} in {path}: {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// Shard that holds it.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl FormatError {
    /// Shorthand for [`FormatError::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`FormatError::Io`] (a read that failed).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`FormatError::Write`] (a write, create or rename that failed).
    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Write {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`FormatError::Refused`].
    pub fn refused(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        FormatError::Refused {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
