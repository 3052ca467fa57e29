//! kiln-dist: collective communication for data-parallel training.
//!
//! Every rank owns a [`Communicator`] and issues the same collectives in the same order:
//! [`all_reduce`](Communicator::all_reduce), [`reduce_scatter`](Communicator::reduce_scatter),
//! [`all_gather`](Communicator::all_gather), [`broadcast`](Communicator::broadcast),
//! [`barrier`](Communicator::barrier), over flat host buffers of f32, f16, bf16, i32 or i64
//! (floats reduce in f32), or over 1-D burn tensors (feature `burn`, on by default).
//!
//! Backends:
//! - local (always): N ranks as threads over shared memory, [`LocalWorld::run`];
//! - `mpi` (feature): ranks are processes under `mpirun`, `Communicator::mpi()`;
//! - `nccl` (feature): GPU ranks under `mpirun`, NCCL id sent over MPI, `Communicator::nccl()`.
//!
//! ```
//! use kiln_dist::{LocalWorld, ReduceOp, shard_of};
//! let out = LocalWorld::run(3, |comm| {
//!     let grads = vec![1.0f32; 10];
//!     let shard = comm.reduce_scatter(&grads, ReduceOp::Avg)?; // this rank's part, averaged
//!     assert_eq!(shard.len(), shard_of(10, comm.rank(), 3).len);
//!     comm.all_gather(&shard, 10) // everyone gets the whole buffer back
//! })
//! .unwrap();
//! assert_eq!(out[2], vec![1.0; 10]);
//! ```
//!
//! Safety net: mismatched calls, a panicking rank, a rank that returns early and a rank that never
//! arrives all end in a [`DistError`] naming the rank on every rank, not a hang.

mod call;
mod comm;
mod element;
mod env;
mod error;
mod local;
mod shard;
mod threads;
pub mod traffic;
mod world;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "burn")]
mod tensor;

pub use call::{Collective, rank_list};
pub use comm::Communicator;
pub use element::{DType, Element, ReduceOp};
pub use env::{Launcher, RankEnv};
pub use error::{DistError, Result};
pub use local::DEFAULT_TIMEOUT;
pub use shard::{ShardInfo, shard_of, shard_size};
pub use threads::{THREADS_VAR, threads_per_rank, with_threads};
pub use traffic::{OpTraffic, Traffic};
pub use world::LocalWorld;
