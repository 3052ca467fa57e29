//! The one error type of the crate. Every variant names the rank(s) involved.

use std::sync::Arc;
use std::time::Duration;

pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// A failed collective, launch or rank discovery.
///
/// After a collective fails, the communicator is unusable: every later call on every rank returns
/// the first failure again (the same rule as an aborted NCCL communicator).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DistError {
    /// Ranks issued different collectives, or the same one with different arguments.
    #[error("collective #{seq} disagrees across ranks: {detail}")]
    Mismatch { seq: u64, detail: String },

    /// A rank panicked, or dropped its communicator while the others still expected it.
    #[error("rank {rank} failed: {reason}")]
    RankFailed { rank: usize, reason: String },

    /// A rank waited longer than the timeout for the others.
    #[error("rank {rank} timed out after {waited:?} in {call}, waiting for rank(s) {missing:?}")]
    Timeout {
        rank: usize,
        call: String,
        waited: Duration,
        missing: Vec<usize>,
    },

    /// Arguments that cannot be right on any rank (lengths, root, sizes).
    #[error("invalid input on rank {rank}: {reason}")]
    InvalidInput { rank: usize, reason: String },

    /// A launcher variable that is present but malformed.
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },

    /// A rank's closure returned this error (from `LocalWorld::run`); the source is a
    /// `DistError` or the caller's own error type (downcast it).
    #[error("rank {rank}: {source}")]
    OnRank {
        rank: usize,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },

    /// An MPI call failed.
    #[error("MPI on rank {rank}: {reason}")]
    Mpi { rank: usize, reason: String },

    /// A CUDA or NCCL call failed.
    #[error("NCCL on rank {rank}: {reason}")]
    Nccl { rank: usize, reason: String },

    /// The backend cannot run here (library missing, MPI already initialized, ...).
    #[error("backend unavailable: {0}")]
    Unavailable(String),

    /// A tensor could not be read or has an unsupported dtype or rank.
    #[error("tensor on rank {rank}: {reason}")]
    Tensor { rank: usize, reason: String },
}
