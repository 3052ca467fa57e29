//! `Communicator`: the one type every rank owns, whatever the backend.

use crate::call::{Call, Collective};
use crate::element::{Element, ReduceOp};
use crate::error::{DistError, Result};
use crate::local::LocalRank;
use crate::shard::shard_of;
use crate::traffic::Traffic;
use std::cell::{Cell, RefCell};
use std::time::Duration;

pub(crate) enum Backend {
    Local(LocalRank),
    #[cfg(feature = "mpi")]
    Mpi(crate::mpi::MpiBackend),
    #[cfg(feature = "nccl")]
    Nccl(crate::nccl::NcclBackend),
}

/// A rank's endpoint in a world of `world_size()` ranks.
///
/// Collectives follow NCCL's names and semantics and must be issued in the same order on every
/// rank. Each call carries a sequence number, its collective, length, dtype, reduce op and root;
/// ranks compare these before any data moves, and a disagreement fails every rank with an error
/// that lists what each rank called. After any failure the communicator stays failed.
///
/// Buffers are flat host slices of any length. `reduce_scatter` and `all_gather` use the layout
/// of [`shard_of`]: rank r owns `[r·S, min((r+1)·S, len))` with `S = ceil(len / N)`.
///
/// `Send` but not `Sync`: a rank's collectives are issued from one thread at a time.
pub struct Communicator {
    rank: usize,
    world: usize,
    seq: Cell<u64>,
    traffic: Cell<Traffic>,
    failed: RefCell<Option<DistError>>,
    backend: Backend,
}

impl Communicator {
    pub(crate) fn from_local(local: LocalRank, rank: usize, world: usize) -> Self {
        Self::new(Backend::Local(local), rank, world)
    }

    pub(crate) fn new(backend: Backend, rank: usize, world: usize) -> Self {
        Communicator {
            rank,
            world,
            seq: Cell::new(0),
            traffic: Cell::new(Traffic::default()),
            failed: RefCell::new(None),
            backend,
        }
    }

    /// This rank, in `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// `"local"`, `"mpi"` or `"nccl"`.
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            Backend::Local(_) => "local",
            #[cfg(feature = "mpi")]
            Backend::Mpi(_) => "mpi",
            #[cfg(feature = "nccl")]
            Backend::Nccl(_) => "nccl",
        }
    }

    /// How long this rank waits for the others before failing (local backend: every wait;
    /// MPI and NCCL: the header exchange, after which the job is aborted with a message).
    pub fn set_timeout(&mut self, timeout: Duration) {
        match &mut self.backend {
            Backend::Local(l) => l.timeout = timeout,
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.timeout = timeout,
            #[cfg(feature = "nccl")]
            Backend::Nccl(n) => n.mpi.timeout = timeout,
        }
    }

    /// Number of collectives issued so far (the next call's sequence number).
    pub fn seq(&self) -> u64 {
        self.seq.get()
    }

    /// Algorithmic traffic of this rank so far (see [`crate::traffic`]).
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    /// Zeroes the traffic counters.
    pub fn reset_traffic(&self) {
        self.traffic.set(Traffic::default());
    }

    fn call(
        &self,
        op: Collective,
        dtype: Option<crate::DType>,
        reduce: Option<ReduceOp>,
        len: usize,
        part: usize,
        root: usize,
    ) -> Result<Call> {
        if let Some(e) = self.failed.borrow().as_ref() {
            return Err(e.clone());
        }
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        Ok(Call {
            seq,
            op,
            dtype,
            reduce,
            len,
            part,
            root,
        })
    }

    fn finish(&self, call: &Call, r: Result<()>) -> Result<()> {
        match r {
            Ok(()) => {
                let mut t = self.traffic.get();
                t.record(call, self.rank, self.world);
                self.traffic.set(t);
                Ok(())
            }
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e.clone());
                Err(e)
            }
        }
    }

    /// In-place all-reduce: every rank ends with `op` over all ranks' `buf` (same length on all).
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let n = buf.len();
        let call = self.call(Collective::AllReduce, Some(T::DTYPE), Some(op), n, n, 0)?;
        let r = match &self.backend {
            Backend::Local(l) => l.all_reduce(&call, buf, op),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.all_reduce(&call, buf, op),
            #[cfg(feature = "nccl")]
            Backend::Nccl(m) => m.all_reduce(&call, buf, op),
        };
        self.finish(&call, r)
    }

    /// Reduce-scatter into a caller-owned shard: `out` receives this rank's shard
    /// (`shard_of(input.len(), rank, world)`) of `op` over all ranks' `input`.
    pub fn reduce_scatter_into<T: Element>(
        &self,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let call = self.call(
            Collective::ReduceScatter,
            Some(T::DTYPE),
            Some(op),
            input.len(),
            out.len(),
            0,
        )?;
        let r = match &self.backend {
            Backend::Local(l) => l.reduce_scatter(&call, input, out, op),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.reduce_scatter(&call, input, out, op),
            #[cfg(feature = "nccl")]
            Backend::Nccl(m) => m.reduce_scatter(&call, input, out, op),
        };
        self.finish(&call, r)
    }

    /// Reduce-scatter returning this rank's shard of the reduced buffer.
    pub fn reduce_scatter<T: Element>(&self, input: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let mut out = vec![
            <T as bytemuck::Zeroable>::zeroed();
            shard_of(input.len(), self.rank, self.world).len
        ];
        self.reduce_scatter_into(input, &mut out, op)?;
        Ok(out)
    }

    /// All-gather into a caller-owned buffer: `out` (the full length, same on all ranks) receives
    /// every rank's `shard` at its `shard_of(out.len(), r, world)` position. `shard.len()` must
    /// equal this rank's shard length.
    pub fn all_gather_into<T: Element>(&self, shard: &[T], out: &mut [T]) -> Result<()> {
        let call = self.call(
            Collective::AllGather,
            Some(T::DTYPE),
            None,
            out.len(),
            shard.len(),
            0,
        )?;
        let r = match &self.backend {
            Backend::Local(l) => l.all_gather(&call, shard, out),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.all_gather(&call, shard, out),
            #[cfg(feature = "nccl")]
            Backend::Nccl(m) => m.all_gather(&call, shard, out),
        };
        self.finish(&call, r)
    }

    /// All-gather returning the full buffer of `len` elements.
    pub fn all_gather<T: Element>(&self, shard: &[T], len: usize) -> Result<Vec<T>> {
        let mut out = vec![<T as bytemuck::Zeroable>::zeroed(); len];
        self.all_gather_into(shard, &mut out)?;
        Ok(out)
    }

    /// Copies `root`'s `buf` into every other rank's `buf` (same length on all).
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let n = buf.len();
        let call = self.call(Collective::Broadcast, Some(T::DTYPE), None, n, n, root)?;
        let r = match &self.backend {
            Backend::Local(l) => l.broadcast(&call, buf, root),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.broadcast(&call, buf, root),
            #[cfg(feature = "nccl")]
            Backend::Nccl(m) => m.broadcast(&call, buf, root),
        };
        self.finish(&call, r)
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&self) -> Result<()> {
        let call = self.call(Collective::Barrier, None, None, 0, 0, 0)?;
        let r = match &self.backend {
            Backend::Local(l) => l.barrier(&call),
            #[cfg(feature = "mpi")]
            Backend::Mpi(m) => m.barrier(&call),
            #[cfg(feature = "nccl")]
            Backend::Nccl(m) => m.mpi.barrier(&call),
        };
        self.finish(&call, r)
    }
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("backend", &self.backend())
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq.get())
            .finish()
    }
}
