//! Errors of this crate: every message names the parameter path, buffer or config field at fault.

use burn::tensor::DType;

/// An error from the precision crate.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// A parameter path that the master weights don't know (frozen, or a typo).
    #[error("parameter `{0}` is not in the master weights layout (frozen or unknown)")]
    UnknownParam(String),
    /// The same path was given twice when building a layout.
    #[error("parameter `{0}` appears twice in the layout")]
    DuplicateParam(String),
    /// A tensor or slice has the wrong number of elements for its parameter.
    #[error("parameter `{path}`: expected {expected} elements, got {got}")]
    NumelMismatch {
        /// HF path of the parameter.
        path: String,
        /// Elements the layout says it has.
        expected: usize,
        /// Elements that were given.
        got: usize,
    },
    /// A flat buffer has the wrong length.
    #[error("buffer `{what}`: expected {expected} elements, got {got}")]
    LenMismatch {
        /// Which buffer.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A parameter is only partly inside this rank's shard, so it cannot be materialised here.
    #[error(
        "parameter `{path}` spans [{start}, {end}) but this shard owns [{shard_start}, {shard_end}): gather it first"
    )]
    NotInShard {
        /// HF path of the parameter.
        path: String,
        /// Start of the parameter in the flat buffer.
        start: usize,
        /// End of the parameter in the flat buffer.
        end: usize,
        /// Start of the owned shard.
        shard_start: usize,
        /// End of the owned shard.
        shard_end: usize,
    },
    /// A dtype that cannot be used where it was given.
    #[error("{what}: dtype {dtype:?} is not supported (use F32, F16 or BF16)")]
    UnsupportedDType {
        /// Where the dtype was used.
        what: String,
        /// The offending dtype.
        dtype: DType,
    },
    /// A parameter names a group index that does not exist.
    #[error("parameter `{path}`: parameter group {group} does not exist ({groups} groups)")]
    NoSuchGroup {
        /// HF path of the parameter.
        path: String,
        /// The group index.
        group: usize,
        /// Number of groups configured.
        groups: usize,
    },
    /// An invalid configuration value.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// Name of the field.
        field: &'static str,
        /// What is wrong with it.
        msg: String,
    },
    /// Reading a tensor's values back from burn failed.
    #[error("parameter `{path}`: reading tensor data failed: {msg}")]
    Data {
        /// HF path of the parameter.
        path: String,
        /// burn's message.
        msg: String,
    },
}

/// Result with a [`PrecisionError`].
pub type Result<T> = std::result::Result<T, PrecisionError>;

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(PrecisionError::LenMismatch {
            what,
            expected,
            got,
        })
    }
}
