use std::path::PathBuf;

/// Everything that can go wrong while reading a model: each variant names the file, key or field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("missing tensor `{key}` (expected shape {expected:?}) in {source_name}")]
    MissingKey {
        key: String,
        expected: Vec<usize>,
        source_name: String,
    },
    #[error("tensor `{key}` has shape {found:?} in {source_name}, the model expects {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        source_name: String,
    },
    #[error(
        "tensor `{key}` in {source_name} has dtype {dtype}, which kiln cannot read (F32, F16, BF16, F64, I64, I32)"
    )]
    UnsupportedDtype {
        key: String,
        dtype: String,
        source_name: String,
    },
    #[error(
        "tensor `{key}` in {source_name} has integer dtype {dtype}: a weight must be F32, F16, BF16 or F64"
    )]
    NotFloat {
        key: String,
        dtype: String,
        source_name: String,
    },
    #[error(
        "tensor `{key}` in {source_name} is not finite: element {index} is {value} (a diverged or corrupted model)"
    )]
    NonFinite {
        key: String,
        index: usize,
        value: f32,
        source_name: String,
    },
    #[error("unexpected tensors in {source_name} that the model does not use: {keys:?}")]
    UnexpectedKeys {
        keys: Vec<String>,
        source_name: String,
    },
    #[error("generate: `{field}`: {reason}")]
    Generate { field: &'static str, reason: String },
    #[error("input: {0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
