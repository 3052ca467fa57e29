//! Errors of the engine: every failure is a value naming the stage, unit or rank.

use thiserror::Error;

/// What went wrong in kiln-zero.
#[derive(Debug, Error)]
pub enum ZeroError {
    #[error("communication failed: {0}")]
    Dist(#[from] kiln_dist::DistError),
    #[error("precision: {0}")]
    Precision(#[from] kiln_precision::PrecisionError),
    #[error("model: {0}")]
    Model(String),
    /// A batch the model cannot take (a token outside the vocabulary, ragged rows).
    #[error("{0}")]
    Input(String),
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        path: std::path::PathBuf,
        msg: String,
    },
    /// Master weights or optimizer state hold NaN or inf (a diverged run).
    #[error("{0}")]
    NonFinite(String),
    #[error("config field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
}

/// Result of kiln-zero.
pub type Result<T> = std::result::Result<T, ZeroError>;
