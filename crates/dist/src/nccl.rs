//! The `nccl` backend: one GPU per rank, NCCL through cudarc, ranks launched by `mpirun`.
//!
//! The NCCL unique id is created on rank 0 and broadcast over MPI; every collective's header is
//! exchanged and checked over MPI first (as in the `mpi` backend), then the payload is staged to
//! the GPU, reduced by NCCL and copied back. f16/bf16 are widened to f32 on the host before the
//! reduction so that every backend accumulates in f32. The host staging makes this a correctness
//! path; a device-resident path belongs with the GPU tensors that would feed it.

use crate::call::Call;
use crate::comm::{Backend, Communicator};
use crate::element::{DType, Element, ReduceOp};
use crate::env::RankEnv;
use crate::error::{DistError, Result};
use crate::mpi::{MpiBackend, narrow, widen};
use crate::shard::shard_size;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id};
use mpi::topology::Communicator as _;
use mpi::traits::*;
use std::sync::Arc;

pub(crate) struct NcclBackend {
    // Drops first: the NCCL communicator goes before MPI is finalized.
    comm: Comm,
    stream: Arc<CudaStream>,
    pub(crate) mpi: MpiBackend,
}

// SAFETY: a rank's calls never overlap (`Communicator` is `!Sync`); the NCCL communicator and the
// CUDA stream may be driven from any one thread at a time, and MPI is initialized Serialized.
unsafe impl Send for NcclBackend {}

impl Communicator {
    /// Initializes MPI, picks GPU `local_rank % device_count` and builds an NCCL communicator
    /// over all ranks. Fails with [`DistError::Unavailable`] when libcuda or libnccl is missing.
    pub fn nccl() -> Result<Communicator> {
        // SAFETY: these only try to dlopen the libraries.
        let present = unsafe {
            cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present()
        };
        if !present {
            return Err(DistError::Unavailable(
                "the nccl backend needs libcuda and libnccl, which were not found".into(),
            ));
        }
        let mpi = MpiBackend::init()?;
        let (rank, size) = (mpi.rank, mpi.size);
        let err = |reason: String| DistError::Nccl { rank, reason };
        let local = RankEnv::detect()?.map_or(rank, |e| e.local_rank);
        let devices = CudaContext::device_count().map_err(|e| err(format!("{e:?}")))?;
        let devices = usize::try_from(devices).unwrap_or(0);
        if devices == 0 {
            return Err(err("no CUDA device".into()));
        }
        let ctx = CudaContext::new(local % devices).map_err(|e| err(format!("{e:?}")))?;
        let stream = ctx.default_stream();

        let mut raw = [0 as std::ffi::c_char; 128];
        if rank == 0 {
            raw = *Id::new()
                .map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?
                .internal();
        }
        mpi.world.process_at_rank(0).broadcast_into(&mut raw[..]);
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(raw))
            .map_err(|e| err(format!("ncclCommInitRank: {e:?}")))?;
        let backend = NcclBackend { comm, stream, mpi };
        Ok(Communicator::new(Backend::Nccl(backend), rank, size))
    }
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::safe::ReduceOp {
    use cudarc::nccl::safe::ReduceOp as N;
    match op {
        // Avg is a sum divided on the host, as on the other backends.
        ReduceOp::Sum | ReduceOp::Avg => N::Sum,
        ReduceOp::Max => N::Max,
        ReduceOp::Min => N::Min,
    }
}

impl NcclBackend {
    fn err(&self, reason: String) -> DistError {
        DistError::Nccl {
            rank: self.mpi.rank,
            reason,
        }
    }

    /// Stages `send` to the device, runs the reduction, copies `recv.len()` elements back.
    fn reduce_acc<A: bytemuck::Pod>(
        &self,
        dtype: DType,
        send: &[A],
        recv: &mut [A],
        op: ReduceOp,
        scatter: bool,
    ) -> Result<()> {
        if recv.is_empty() {
            return Ok(());
        }
        let o = nccl_op(op);
        macro_rules! go {
            ($t:ty) => {{
                let s: &[$t] =
                    bytemuck::try_cast_slice(send).map_err(|e| self.err(e.to_string()))?;
                let r: &mut [$t] =
                    bytemuck::try_cast_slice_mut(recv).map_err(|e| self.err(e.to_string()))?;
                let d_send = self
                    .stream
                    .clone_htod(s)
                    .map_err(|e| self.err(format!("{e:?}")))?;
                let mut d_recv = self
                    .stream
                    .alloc_zeros::<$t>(r.len())
                    .map_err(|e| self.err(format!("{e:?}")))?;
                if scatter {
                    self.comm.reduce_scatter(&d_send, &mut d_recv, &o)
                } else {
                    self.comm.all_reduce(&d_send, &mut d_recv, &o)
                }
                .map_err(|e| self.err(format!("{e:?}")))?;
                self.stream
                    .memcpy_dtoh(&d_recv, r)
                    .map_err(|e| self.err(format!("{e:?}")))?;
                self.stream
                    .synchronize()
                    .map_err(|e| self.err(format!("{e:?}")))?;
            }};
        }
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => go!(f32),
            DType::I32 => go!(i32),
            DType::I64 => go!(i64),
        }
        Ok(())
    }

    /// Moves raw elements: all-gather (`gather`) or broadcast from `root`.
    fn move_raw<T: Element>(&self, send: &[T], recv: &mut [T], root: Option<usize>) -> Result<()> {
        if recv.is_empty() {
            return Ok(());
        }
        macro_rules! go {
            ($t:ty) => {{
                let s: &[$t] =
                    bytemuck::try_cast_slice(send).map_err(|e| self.err(e.to_string()))?;
                let r: &mut [$t] =
                    bytemuck::try_cast_slice_mut(recv).map_err(|e| self.err(e.to_string()))?;
                let d_send = self
                    .stream
                    .clone_htod(s)
                    .map_err(|e| self.err(format!("{e:?}")))?;
                let mut d_recv = self
                    .stream
                    .alloc_zeros::<$t>(r.len())
                    .map_err(|e| self.err(format!("{e:?}")))?;
                match root {
                    Some(root) => self.comm.broadcast(Some(&d_send), &mut d_recv, root as i32),
                    None => self.comm.all_gather(&d_send, &mut d_recv),
                }
                .map_err(|e| self.err(format!("{e:?}")))?;
                self.stream
                    .memcpy_dtoh(&d_recv, r)
                    .map_err(|e| self.err(format!("{e:?}")))?;
                self.stream
                    .synchronize()
                    .map_err(|e| self.err(format!("{e:?}")))?;
            }};
        }
        match T::DTYPE.size() {
            2 => go!(u8),
            4 => go!(u32),
            _ => go!(u64),
        }
        Ok(())
    }

    pub(crate) fn all_reduce<T: Element>(
        &self,
        call: &Call,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.mpi.exchange(call)?;
        let send = widen(buf);
        let mut recv = send.clone();
        self.reduce_acc(T::DTYPE, &send, &mut recv, op, false)?;
        narrow(&recv, buf, op, self.mpi.size);
        Ok(())
    }

    pub(crate) fn reduce_scatter<T: Element>(
        &self,
        call: &Call,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.mpi.exchange(call)?;
        let s = shard_size(input.len(), self.mpi.size);
        let mut send = widen(input);
        send.resize(s * self.mpi.size, T::Acc::default());
        let mut recv = vec![T::Acc::default(); s];
        self.reduce_acc(T::DTYPE, &send, &mut recv, op, true)?;
        narrow(&recv[..out.len()], out, op, self.mpi.size);
        Ok(())
    }

    pub(crate) fn all_gather<T: Element>(
        &self,
        call: &Call,
        shard: &[T],
        out: &mut [T],
    ) -> Result<()> {
        self.mpi.exchange(call)?;
        let s = shard_size(out.len(), self.mpi.size);
        let mut send = shard.to_vec();
        send.resize(s, <T as bytemuck::Zeroable>::zeroed());
        let mut recv = vec![<T as bytemuck::Zeroable>::zeroed(); s * self.mpi.size];
        self.move_raw(&send, &mut recv, None)?;
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
        self.mpi.exchange(call)?;
        let send = buf.to_vec();
        self.move_raw(&send, buf, Some(root))
    }
}
