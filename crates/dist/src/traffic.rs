//! Per-rank traffic counters.
//!
//! Counters hold the *algorithmic* volume: what a ring algorithm moves per rank, computed from the
//! call's arguments alone, identically on every backend (threads copy through shared memory,
//! MPI and NCCL pick their own algorithms, so physical bytes are neither comparable nor visible).
//! With `B` the buffer's bytes and `b_r` the bytes of this rank's shard (`shard_of`):
//!
//! | collective | sent = received |
//! | --- | --- |
//! | reduce_scatter | `B - b_r` (= `(N-1)/N · B` when N divides the length) |
//! | all_gather | `B - b_r` (B is the gathered buffer) |
//! | all_reduce | `2 · (B - b_r)` (reduce-scatter then all-gather) |
//! | broadcast | root sends `B`, every other rank receives `B` |
//! | barrier | 0 |
//!
//! Only collectives that complete are counted; with one rank everything is 0 bytes.

use crate::call::{Call, Collective};
use crate::shard::shard_of;
use serde::Serialize;

/// Calls and bytes of one collective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpTraffic {
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl OpTraffic {
    fn add(&mut self, sent: u64, received: u64) {
        self.calls += 1;
        self.bytes_sent += sent;
        self.bytes_received += received;
    }
}

/// Counters of one rank, per collective. See the module docs for what a byte means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub all_reduce: OpTraffic,
    pub reduce_scatter: OpTraffic,
    pub all_gather: OpTraffic,
    pub broadcast: OpTraffic,
    pub barrier: OpTraffic,
}

impl Traffic {
    /// The counters of one collective.
    pub fn of(&self, op: Collective) -> OpTraffic {
        match op {
            Collective::AllReduce => self.all_reduce,
            Collective::ReduceScatter => self.reduce_scatter,
            Collective::AllGather => self.all_gather,
            Collective::Broadcast => self.broadcast,
            Collective::Barrier => self.barrier,
        }
    }

    /// Sum over all collectives.
    pub fn total(&self) -> OpTraffic {
        let all = [
            self.all_reduce,
            self.reduce_scatter,
            self.all_gather,
            self.broadcast,
            self.barrier,
        ];
        all.iter().fold(OpTraffic::default(), |mut t, o| {
            t.calls += o.calls;
            t.bytes_sent += o.bytes_sent;
            t.bytes_received += o.bytes_received;
            t
        })
    }

    pub(crate) fn record(&mut self, call: &Call, rank: usize, world: usize) {
        let b = call.bytes();
        let esize = call.dtype.map_or(0, |d| d.size()) as u64;
        let own = shard_of(call.len, rank, world).len as u64 * esize;
        let ring = b - own;
        match call.op {
            Collective::AllReduce => self.all_reduce.add(2 * ring, 2 * ring),
            Collective::ReduceScatter => self.reduce_scatter.add(ring, ring),
            Collective::AllGather => self.all_gather.add(ring, ring),
            Collective::Broadcast if world == 1 => self.broadcast.add(0, 0),
            Collective::Broadcast if rank == call.root => self.broadcast.add(b, 0),
            Collective::Broadcast => self.broadcast.add(0, b),
            Collective::Barrier => self.barrier.add(0, 0),
        }
    }
}
