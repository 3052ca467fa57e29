use std::path::PathBuf;

/// Everything that can go wrong with an adapter: each variant names the file, key, module or field.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
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
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("adapter config field `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    /// An error in a file, with the file's path (an `adapter_config.json` whose field is bad).
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<LoraError>,
    },
    #[error("{path}: tensor `{key}` is not finite: element {index} is {value}")]
    NonFinite {
        path: PathBuf,
        key: String,
        index: usize,
        value: f32,
    },
    #[error("target_modules {targets} select no linear weight of the model")]
    NoTargets { targets: String },
    #[error("{source_name}: adapter targets {modules:?}, which the model has no 2-D `weight` for")]
    UnknownModules {
        modules: Vec<String>,
        source_name: String,
    },
    #[error(
        "{source_name}: target_modules {targets} select {modules:?}, which the adapter has no weights for"
    )]
    MissingModules {
        modules: Vec<String>,
        targets: String,
        source_name: String,
    },
    #[error(
        "{source_name}: `{key}` has shape {found:?}; the model's `{module}.weight` is {base:?}, so it needs {expected:?}"
    )]
    ShapeMismatch {
        key: String,
        module: String,
        found: [usize; 2],
        expected: [usize; 2],
        base: [usize; 2],
        source_name: String,
    },
    #[error("{source_name}: unexpected tensor `{key}` ({reason})")]
    UnexpectedKey {
        key: String,
        reason: String,
        source_name: String,
    },
    #[error("refusing to save adapter to {path}: {reason}")]
    Incomplete { path: PathBuf, reason: String },
    #[error("no adapter named `{name}` (loaded: {loaded:?})")]
    UnknownAdapter { name: String, loaded: Vec<String> },
    #[error("an adapter named `{0}` already exists")]
    DuplicateAdapter(String),
    #[error("{0}")]
    State(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, LoraError>;
