//! The `local` backend: N ranks as threads of one process, over shared memory.
//!
//! A collective publishes each rank's buffer pointer, then runs in phases separated by barriers:
//!
//! - all_reduce: (A) publish; every rank reduces *its own shard* block by block, reading that
//!   block of all N buffers and writing the result straight back into all N buffers (a direct
//!   reduce-scatter fused with a push all-gather); (B) done. Memory traffic is the minimum, N·len
//!   read and N·len written, spread over N threads, and every written block is still in cache.
//! - reduce_scatter / all_gather / broadcast: (A) publish; read what is needed; (B) done.
//!
//! The first barrier also checks that every rank issued the same call (`call::validate`).
//!
//! Safety of the shared pointers: a rank only leaves a collective normally through the last
//! barrier, after every rank finished reading. A rank that leaves with an error (timeout, a dead
//! peer) first waits until no rank is still inside a read phase (`touching == 0`); read phases
//! never wait on anything, so that wait is short. Waits are bounded by the timeout, and a rank
//! whose communicator drops (return, `?`, panic) wakes the others at once with an error naming it.

use crate::call::{Call, barrier_call, validate};
use crate::element::{Element, ReduceOp, all_reduce_raw, reduce_into};
use crate::error::{DistError, Result};
use crate::shard::shard_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default time a rank waits for the others before failing the world.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Spin this long before yielding, and yield this long before sleeping on the condvar.
const SPIN: Duration = Duration::from_micros(5);
const YIELD: Duration = Duration::from_millis(1);

struct Slot {
    ptr: AtomicUsize,
    len: AtomicUsize,
}

struct State {
    generation: u64,
    count: usize,
    arrived: Vec<bool>,
    calls: Vec<Call>,
    failure: Option<DistError>,
    /// Ranks between a barrier after which they read peers' buffers and their next arrival.
    reading: Vec<bool>,
    touching: usize,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
    generation: AtomicU64,
    slots: Vec<Slot>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the guard rather than panic if it did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, st: &mut State, e: DistError) -> DistError {
        if st.failure.is_none() {
            st.failure = Some(e);
        }
        self.cv.notify_all();
        st.failure
            .clone()
            .unwrap_or_else(|| DistError::Unavailable("unreachable".into()))
    }

    fn stop_reading(&self, st: &mut State, rank: usize) {
        if st.reading[rank] {
            st.reading[rank] = false;
            st.touching -= 1;
            if st.touching == 0 && st.failure.is_some() {
                self.cv.notify_all();
            }
        }
    }
}

/// One rank's handle on the shared world.
pub(crate) struct LocalRank {
    shared: Arc<Shared>,
    rank: usize,
    pub(crate) timeout: Duration,
}

impl LocalRank {
    fn publish(&self, ptr: usize, len: usize) {
        let slot = &self.shared.slots[self.rank];
        slot.ptr.store(ptr, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
    }

    fn peer<T>(&self, q: usize) -> (*const T, usize) {
        let slot = &self.shared.slots[q];
        (
            slot.ptr.load(Ordering::Relaxed) as *const T,
            slot.len.load(Ordering::Relaxed),
        )
    }

    /// Arrives at the next barrier and waits for the others.
    ///
    /// `check`: this is a collective's first barrier; `call` is compared across ranks.
    /// `reads_follow`: after it, ranks touch (read, or write their own shard of) peers' buffers.
    fn arrive(&self, call: &Call, check: bool, reads_follow: bool) -> Result<()> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(e) = &st.failure {
            return Err(e.clone());
        }
        sh.stop_reading(&mut st, self.rank);
        if check {
            st.calls[self.rank] = *call;
        }
        st.arrived[self.rank] = true;
        st.count += 1;
        let generation = st.generation;
        if st.count == sh.world {
            if check && let Err(e) = validate(&st.calls) {
                return Err(sh.fail(&mut st, e));
            }
            st.count = 0;
            st.arrived.fill(false);
            if reads_follow {
                st.reading.fill(true);
                st.touching = sh.world;
            }
            st.generation += 1;
            sh.generation.store(st.generation, Ordering::Release);
            sh.cv.notify_all();
            return Ok(());
        }
        drop(st);

        let start = Instant::now();
        loop {
            if sh.generation.load(Ordering::Acquire) != generation {
                return Ok(());
            }
            let spent = start.elapsed();
            if spent < SPIN {
                std::hint::spin_loop();
            } else if spent < YIELD {
                std::thread::yield_now();
            } else {
                break;
            }
        }

        let deadline = start + self.timeout;
        let mut st = sh.lock();
        loop {
            if st.generation != generation {
                return Ok(());
            }
            if let Some(e) = &st.failure {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..sh.world).filter(|&r| !st.arrived[r]).collect();
                let e = DistError::Timeout {
                    rank: self.rank,
                    call: call.to_string(),
                    waited: self.timeout,
                    missing,
                };
                return Err(sh.fail(&mut st, e));
            }
            st = match sh.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// After an error: make sure no peer still reads our buffer before the caller gets it back.
    fn quiesce(&self) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        sh.stop_reading(&mut st, self.rank);
        while st.touching > 0 {
            st = match sh.cv.wait_timeout(st, Duration::from_millis(10)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn guarded(&self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            self.quiesce();
        }
        r
    }

    pub(crate) fn all_reduce<T: Element>(
        &self,
        call: &Call,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let r = self.all_reduce_inner(call, buf, op);
        self.guarded(r)
    }

    fn all_reduce_inner<T: Element>(&self, call: &Call, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let world = self.shared.world;
        let len = buf.len();
        self.publish(buf.as_mut_ptr() as usize, len);
        self.arrive(call, true, true)?;

        let mine = shard_of(len, self.rank, world);
        let bufs: Vec<*mut T> = (0..world)
            // SAFETY: every peer's buffer has `len` elements (validated), so the offset is in bounds.
            .map(|q| unsafe { self.peer::<T>(q).0.cast_mut().add(mine.offset) })
            .collect();
        // Alone, the buffer already holds the result of every op (a sum, max, min or mean of one).
        if world > 1 {
            // SAFETY: shard `mine` of every buffer is read and written by this rank only, and
            // the peers' buffers stay alive until the last barrier (or `quiesce`).
            unsafe { all_reduce_raw(&bufs, mine.len, op, world) };
        }
        self.arrive(call, false, false)
    }

    pub(crate) fn reduce_scatter<T: Element>(
        &self,
        call: &Call,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let r = self.reduce_scatter_inner(call, input, out, op);
        self.guarded(r)
    }

    fn reduce_scatter_inner<T: Element>(
        &self,
        call: &Call,
        input: &[T],
        out: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let world = self.shared.world;
        self.publish(input.as_ptr() as usize, input.len());
        self.arrive(call, true, true)?;
        let mine = shard_of(input.len(), self.rank, world);
        let srcs: Vec<&[T]> = (0..world)
            .map(|q| {
                let (p, _) = self.peer::<T>(q);
                // SAFETY: inputs are read-only for the whole collective and outlive it.
                unsafe { std::slice::from_raw_parts(p.add(mine.offset), mine.len) }
            })
            .collect();
        reduce_into(out, &srcs, op, world);
        self.arrive(call, false, false)
    }

    pub(crate) fn all_gather<T: Element>(
        &self,
        call: &Call,
        shard: &[T],
        out: &mut [T],
    ) -> Result<()> {
        let r = self.all_gather_inner(call, shard, out);
        self.guarded(r)
    }

    fn all_gather_inner<T: Element>(&self, call: &Call, shard: &[T], out: &mut [T]) -> Result<()> {
        let world = self.shared.world;
        self.publish(shard.as_ptr() as usize, shard.len());
        self.arrive(call, true, true)?;
        for q in 0..world {
            let s = shard_of(out.len(), q, world);
            let (p, n) = self.peer::<T>(q);
            if n != s.len {
                // Validated at the barrier; kept as an error rather than a panic.
                return Err(DistError::InvalidInput {
                    rank: q,
                    reason: format!("shard of {n} elements, expected {}", s.len),
                });
            }
            // SAFETY: shards are read-only for the whole collective and outlive it.
            let src = unsafe { std::slice::from_raw_parts(p, n) };
            out[s.range()].copy_from_slice(src);
        }
        self.arrive(call, false, false)
    }

    pub(crate) fn broadcast<T: Element>(
        &self,
        call: &Call,
        buf: &mut [T],
        root: usize,
    ) -> Result<()> {
        let r = self.broadcast_inner(call, buf, root);
        self.guarded(r)
    }

    fn broadcast_inner<T: Element>(&self, call: &Call, buf: &mut [T], root: usize) -> Result<()> {
        self.publish(buf.as_mut_ptr() as usize, buf.len());
        self.arrive(call, true, true)?;
        if self.rank != root {
            let (p, n) = self.peer::<T>(root);
            // SAFETY: the root's buffer has buf.len() elements (validated), is not written during
            // the collective and outlives it; ours is read by no one.
            let src = unsafe { std::slice::from_raw_parts(p, n.min(buf.len())) };
            buf[..src.len()].copy_from_slice(src);
        }
        self.arrive(call, false, false)
    }

    pub(crate) fn barrier(&self, call: &Call) -> Result<()> {
        let r = self.arrive(call, true, false);
        self.guarded(r)
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        sh.stop_reading(&mut st, self.rank);
        let reason = if std::thread::panicking() {
            "panicked".to_string()
        } else {
            "dropped its communicator (returned or failed) while other ranks still expected \
             collectives"
                .to_string()
        };
        sh.fail(
            &mut st,
            DistError::RankFailed {
                rank: self.rank,
                reason,
            },
        );
    }
}

/// The `n` ranks of a new local world, sharing one rendezvous state.
pub(crate) fn local_ranks(n: usize, timeout: Duration) -> Vec<LocalRank> {
    let shared = Arc::new(Shared {
        world: n,
        state: Mutex::new(State {
            generation: 0,
            count: 0,
            arrived: vec![false; n],
            calls: Vec::new(),
            failure: None,
            reading: vec![false; n],
            touching: 0,
        }),
        cv: Condvar::new(),
        generation: AtomicU64::new(0),
        slots: (0..n)
            .map(|_| Slot {
                ptr: AtomicUsize::new(0),
                len: AtomicUsize::new(0),
            })
            .collect(),
    });
    {
        let mut st = shared.lock();
        let dummy = barrier_call(0);
        st.calls = vec![dummy; n];
    }
    (0..n)
        .map(|rank| LocalRank {
            shared: shared.clone(),
            rank,
            timeout,
        })
        .collect()
}
