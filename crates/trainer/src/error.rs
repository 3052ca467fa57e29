//! `TrainerError`: every failure of the trainer's foundation modules, with the file, line, key or
//! field it concerns in its message.

use std::path::PathBuf;

/// Errors of `kiln-trainer`. Each message names what it is about (file, `file:line`, config field
/// or `--set` argument), so it can be printed as is.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Reading or writing a file or folder failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A TOML config file does not parse or does not match the schema; `reason` keeps the
    /// line and column and names the dotted field.
    #[error("config {}: {reason}", path.display())]
    ConfigFile { path: PathBuf, reason: String },
    /// The config (after `--set` overrides) does not match the schema: unknown field, wrong type.
    #[error("config: {reason}")]
    ConfigSchema { reason: String },
    /// A `--set key=value` argument is malformed or cannot be applied.
    #[error("--set {arg}: {reason}")]
    Override { arg: String, reason: String },
    /// A config value is out of range or inconsistent; `field` is the dotted path (`optim.lr`).
    #[error("config field {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A data file has a bad record; `line` is 1-based.
    #[error("{}:{line}: {reason}", path.display())]
    DataLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A data file (or the data as a whole) cannot be used.
    #[error("data {}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },
    /// A tokenizer cannot be loaded or used.
    #[error("tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    /// A caller passed an argument outside the function's contract (e.g. a micro-batch of 0 rows).
    #[error("{0}")]
    Argument(String),
    /// An error from `kiln-models` (model config).
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    /// An error from the ZeRO engine (collectives, checkpoints, shapes).
    #[error(transparent)]
    Zero(#[from] kiln_zero::ZeroError),
    /// An error from kiln-lora (adapter files, targets).
    #[error(transparent)]
    Lora(#[from] kiln_lora::LoraError),
    /// An error from kiln-dist (launch, rank environment).
    #[error(transparent)]
    Dist(#[from] kiln_dist::DistError),
    /// A checkpoint cannot be used by the trainer.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A rank failed; the message names it.
    #[error("{0}")]
    Run(String),
    /// The training diverged: a NaN or infinite loss, gradient or parameter.
    #[error("{0}")]
    NonFinite(String),
    /// Writing to stdout failed; `broken_pipe` when its reader went away (`kiln eval | head`),
    /// which ends the command quietly.
    #[error("stdout: {source}")]
    Stdout {
        source: std::io::Error,
        broken_pipe: bool,
    },
}

/// `Result` with [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;

impl TrainerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainerError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether this is a broken pipe on stdout (the reader went away): not worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(
            self,
            TrainerError::Stdout {
                broken_pipe: true,
                ..
            }
        )
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainerError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
