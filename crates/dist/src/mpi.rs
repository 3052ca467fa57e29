//! The `mpi` backend: ranks are processes under `mpirun`, through Open MPI.
//!
//! Every collective first exchanges its header (`call::Call`, 7 words) so ranks can compare
//! sequence number, collective, length, dtype, reduce op and root; only then does the payload move.
//! The header exchange is non-blocking and polled against the timeout: a rank that never arrives
//! makes the others abort the job with a message naming it, instead of hanging. A panicking rank aborts the
//! job at once (panic hook → `MPI_Abort`); a rank that exits non-zero makes `mpirun` end the job.
//!
//! f16 and bf16 are reduced in f32 (widened before, rounded after, as on the local backend).
//! `Avg` is an MPI sum followed by a division. Uneven shards travel padded to `S = ceil(len/N)`.

use crate::call::{Call, validate};
use crate::comm::{Backend, Communicator};
use crate::element::{BLOCK, DType, Element, ReduceOp};
use crate::error::{DistError, Result};
use crate::local::DEFAULT_TIMEOUT;
use crate::shard::shard_size;
use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::{Duration, Instant};

pub(crate) struct MpiBackend {
    // Field order matters: the communicator handle drops before the universe finalizes MPI.
    pub(crate) world: SimpleCommunicator,
    _universe: Universe,
    pub(crate) rank: usize,
    pub(crate) size: usize,
    pub(crate) timeout: Duration,
}

// SAFETY: MPI is initialized with at least `Threading::Serialized`, so MPI may be called from any
// thread as long as calls do not overlap; `Communicator` is `!Sync` and takes `&self` per call, so
// one rank's calls never overlap.
unsafe impl Send for MpiBackend {}

impl Communicator {
    /// Initializes MPI and returns this process's communicator over `MPI_COMM_WORLD`.
    ///
    /// Call once per process (MPI cannot be initialized twice); MPI is finalized when the
    /// communicator drops. Installs a panic hook that aborts the whole job with a message naming
    /// the rank, so a panicking rank never leaves the others waiting.
    pub fn mpi() -> Result<Communicator> {
        let backend = MpiBackend::init()?;
        let (rank, size) = (backend.rank, backend.size);
        Ok(Communicator::new(Backend::Mpi(backend), rank, size))
    }
}

fn sys_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
}

impl MpiBackend {
    pub(crate) fn init() -> Result<MpiBackend> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                DistError::Unavailable("MPI is already initialized in this process".into())
            })?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(DistError::Unavailable(format!(
                "the MPI library offers only {threading:?} threading; kiln-dist needs Serialized"
            )));
        }
        let world = universe.world();
        let rank = usize::try_from(world.rank()).unwrap_or(0);
        let size = usize::try_from(world.size()).unwrap_or(1);
        install_abort_on_panic(rank, size);
        Ok(MpiBackend {
            world,
            _universe: universe,
            rank,
            size,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    fn err(&self, reason: impl Into<String>) -> DistError {
        DistError::Mpi {
            rank: self.rank,
            reason: reason.into(),
        }
    }

    fn abort(&self, msg: &str) -> ! {
        eprintln!(
            "kiln-dist: rank {} of {}: {msg}; aborting the MPI job",
            self.rank, self.size
        );
        self.world.abort(3)
    }

    /// Exchanges the headers with every other rank (point to point, so that a rank that never
    /// arrives can be named), then checks them. Messages between two ranks with one tag arrive in
    /// order, so the k-th header from a peer is its k-th collective.
    pub(crate) fn exchange(&self, call: &Call) -> Result<()> {
        const TAG: i32 = 0x6b64;
        let mine = call.encode();
        let mut all = vec![0u64; Call::WORDS * self.size];
        let me = self.rank * Call::WORDS;
        all[me..me + Call::WORDS].copy_from_slice(&mine);
        mpi::request::scope(|scope| {
            let mut sends = Vec::with_capacity(self.size);
            let mut recvs = Vec::with_capacity(self.size);
            for (q, chunk) in all.chunks_mut(Call::WORDS).enumerate() {
                if q == self.rank {
                    continue;
                }
                let peer = self.world.process_at_rank(q as i32);
                sends.push(Some(peer.immediate_send_with_tag(scope, &mine[..], TAG)));
                recvs.push((
                    q,
                    Some(peer.immediate_receive_into_with_tag(scope, chunk, TAG)),
                ));
            }
            let start = Instant::now();
            loop {
                for slot in sends.iter_mut() {
                    if let Some(req) = slot.take() {
                        *slot = req.test().err();
                    }
                }
                for (_, slot) in recvs.iter_mut() {
                    if let Some(req) = slot.take() {
                        *slot = req.test().err();
                    }
                }
                let missing: Vec<usize> = recvs
                    .iter()
                    .filter(|(_, r)| r.is_some())
                    .map(|(q, _)| *q)
                    .collect();
                if missing.is_empty() && sends.iter().all(Option::is_none) {
                    break;
                }
                let spent = start.elapsed();
                if spent > self.timeout {
                    self.abort(&format!(
                        "timed out after {:?} in {call}, waiting for rank(s) {missing:?}",
                        self.timeout
                    ));
                } else if spent < Duration::from_micros(50) {
                    std::hint::spin_loop();
                } else if spent < Duration::from_millis(2) {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        let calls = all
            .chunks(Call::WORDS)
            .map(Call::decode)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(format!("garbled collective header in {call}")))?;
        validate(&calls)
    }

    fn count(&self, n: usize) -> Result<i32> {
        i32::try_from(n).map_err(|_| {
            self.err(format!(
                "{n} elements exceed MPI's count limit of {}",
                i32::MAX
            ))
        })
    }

    /// MPI all-reduce of accumulator buffers (f32 for floats, the integer type otherwise).
    fn reduce_acc<A: bytemuck::Pod>(
        &self,
        dtype: DType,
        send: &[A],
        recv: &mut [A],
        op: ReduceOp,
        scatter: bool,
    ) -> Result<()> {
        self.count(send.len())?;
        let o = sys_op(op);
        macro_rules! go {
            ($t:ty) => {{
                let s: &[$t] =
                    bytemuck::try_cast_slice(send).map_err(|e| self.err(e.to_string()))?;
                let r: &mut [$t] =
                    bytemuck::try_cast_slice_mut(recv).map_err(|e| self.err(e.to_string()))?;
                if scatter {
                    if r.len() * self.size != s.len() {
                        return Err(self.err("padded reduce_scatter sizes disagree"));
                    }
                    self.world.reduce_scatter_block_into(s, r, o);
                } else {
                    self.world.all_reduce_into(s, r, o);
                }
            }};
        }
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => go!(f32),
            DType::I32 => go!(i32),
            DType::I64 => go!(i64),
        }
        Ok(())
    }

    pub(crate) fn all_reduce<T: Element>(
        &self,
        call: &Call,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.exchange(call)?;
        let send = widen(buf);
        let mut recv = vec![T::Acc::default(); buf.len()];
        self.reduce_acc(T::DTYPE, &send, &mut recv, op, false)?;
        narrow(&recv, buf, op, self.size);
        Ok(())
    }

    pub(crate) fn reduce_scatter<T: Element>(
        &self,
        call: &Call,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.exchange(call)?;
        let s = shard_size(input.len(), self.size);
        let mut send = widen(input);
        send.resize(s * self.size, T::Acc::default());
        let mut recv = vec![T::Acc::default(); s];
        self.reduce_acc(T::DTYPE, &send, &mut recv, op, true)?;
        narrow(&recv[..out.len()], out, op, self.size);
        Ok(())
    }

    pub(crate) fn all_gather<T: Element>(
        &self,
        call: &Call,
        shard: &[T],
        out: &mut [T],
    ) -> Result<()> {
        self.exchange(call)?;
        let s = shard_size(out.len(), self.size);
        self.count(s * self.size)?;
        let mut send = shard.to_vec();
        send.resize(s, <T as bytemuck::Zeroable>::zeroed());
        let mut recv = vec![<T as bytemuck::Zeroable>::zeroed(); s * self.size];
        macro_rules! go {
            ($t:ty) => {{
                let sb: &[$t] =
                    bytemuck::try_cast_slice(&send).map_err(|e| self.err(e.to_string()))?;
                let rb: &mut [$t] =
                    bytemuck::try_cast_slice_mut(&mut recv).map_err(|e| self.err(e.to_string()))?;
                self.world.all_gather_into(sb, rb);
            }};
        }
        match T::DTYPE.size() {
            2 => go!(u16),
            4 => go!(u32),
            _ => go!(u64),
        }
        // Shard q sits at q·S in both layouts; only the tail padding is dropped.
        let n = out.len();
        out.copy_from_slice(&recv[..n]);
        Ok(())
    }

    pub(crate) fn broadcast<T: Element>(
        &self,
        call: &Call,
        buf: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.exchange(call)?;
        self.count(buf.len())?;
        let root = self.world.process_at_rank(root as i32);
        macro_rules! go {
            ($t:ty) => {{
                let b: &mut [$t] =
                    bytemuck::try_cast_slice_mut(buf).map_err(|e| self.err(e.to_string()))?;
                root.broadcast_into(b);
            }};
        }
        match T::DTYPE.size() {
            2 => go!(u16),
            4 => go!(u32),
            _ => go!(u64),
        }
        Ok(())
    }

    /// The header exchange completes on a rank only once every rank has entered it.
    pub(crate) fn barrier(&self, call: &Call) -> Result<()> {
        self.exchange(call)
    }
}

/// The buffer in its accumulation type (f32 for f16/bf16, itself otherwise).
pub(crate) fn widen<T: Element>(src: &[T]) -> Vec<T::Acc> {
    let mut acc = vec![T::Acc::default(); src.len()];
    for (s, a) in src.chunks(BLOCK).zip(acc.chunks_mut(BLOCK)) {
        T::load(s, a);
    }
    acc
}

/// Back to the element type, dividing by `world` for `Avg`.
pub(crate) fn narrow<T: Element>(acc: &[T::Acc], dst: &mut [T], op: ReduceOp, world: usize) {
    for (a, d) in acc.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        T::store(a, d, op, world);
    }
}

fn install_abort_on_panic(rank: usize, size: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if mpi::is_initialized() && !mpi::is_finalized() {
            eprintln!("kiln-dist: rank {rank} of {size} panicked; aborting the MPI job");
            // SAFETY: MPI is initialized and not finalized; MPI_Abort does not return.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
            }
        }
    }));
}
