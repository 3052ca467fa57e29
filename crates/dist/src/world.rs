//! [`LocalWorld`]: N thread ranks of this process, each with a [`Communicator`] over the local
//! backend, run side by side; the first failure of any rank is the world's error.

use std::sync::Arc;
use std::time::Duration;

use crate::comm::Communicator;
use crate::error::{DistError, Result};
use crate::local::{DEFAULT_TIMEOUT, local_ranks};

/// N ranks as threads of this process.
///
/// ```
/// use kiln_dist::{LocalWorld, ReduceOp};
/// let sums = LocalWorld::run(4, |comm| {
///     let mut x = vec![comm.rank() as f32; 3];
///     comm.all_reduce(&mut x, ReduceOp::Sum)?;
///     Ok::<_, kiln_dist::DistError>(x[0])
/// })
/// .unwrap();
/// assert_eq!(sums, vec![6.0; 4]);
/// ```
#[derive(Clone, Debug)]
pub struct LocalWorld {
    world: usize,
    timeout: Duration,
}

impl LocalWorld {
    /// A world of `world` thread ranks with the default timeout ([`DEFAULT_TIMEOUT`]).
    pub fn new(world: usize) -> Self {
        LocalWorld {
            world,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long a rank waits for the others inside a collective before failing every rank.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One communicator per rank, in rank order, for callers that manage their own threads.
    ///
    /// Dropping one of them fails the others' pending and future collectives.
    pub fn communicators(&self) -> Result<Vec<Communicator>> {
        if self.world == 0 {
            return Err(DistError::InvalidInput {
                rank: 0,
                reason: "a world needs at least one rank".into(),
            });
        }
        let n = self.world;
        Ok(local_ranks(n, self.timeout)
            .into_iter()
            .enumerate()
            .map(|(rank, local)| Communicator::from_local(local, rank, n))
            .collect())
    }

    /// Runs `f` on `world` thread ranks (default timeout) and returns the results in rank order.
    pub fn run<T, E, F>(world: usize, f: F) -> Result<Vec<T>>
    where
        T: Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: Fn(Communicator) -> std::result::Result<T, E> + Sync,
    {
        LocalWorld::new(world).launch(f)
    }

    /// Runs `f` on every rank, each in its own thread with its own compute pool (see
    /// [`threads_per_rank`](crate::threads_per_rank)), and joins them.
    ///
    /// A rank that panics or returns an error makes the others' collectives fail promptly. The
    /// returned error is the root cause: a panic (naming the rank and its message) first, then an
    /// error of the caller's own, then the lowest rank's error.
    pub fn launch<T, E, F>(&self, f: F) -> Result<Vec<T>>
    where
        T: Send,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        F: Fn(Communicator) -> std::result::Result<T, E> + Sync,
    {
        let comms = self.communicators()?;
        let threads = crate::threads::threads_per_rank(comms.len())?;
        let f = &f;
        let outcomes: Vec<Outcome<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    std::thread::Builder::new()
                        .name(format!("kiln-rank-{rank}"))
                        .spawn_scoped(s, move || {
                            // Each rank computes on its own pool: its share of the cores.
                            let run = || f(comm).map_err(Into::into);
                            match crate::threads::with_threads(threads, run) {
                                Ok(out) => out,
                                Err(e) => Err(e.into()),
                            }
                        })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| match h {
                    Err(e) => Outcome::Panic(format!("could not start its thread: {e}")),
                    Ok(h) => match h.join() {
                        Ok(Ok(v)) => Outcome::Ok(v),
                        Ok(Err(e)) => Outcome::Err(rank, e),
                        Err(payload) => Outcome::Panic(panic_message(payload.as_ref())),
                    },
                })
                .collect()
        });
        root_cause(outcomes)
    }
}

enum Outcome<T> {
    Ok(T),
    Err(usize, Box<dyn std::error::Error + Send + Sync>),
    Panic(String),
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

fn root_cause<T>(outcomes: Vec<Outcome<T>>) -> Result<Vec<T>> {
    let panic = outcomes.iter().enumerate().find_map(|(rank, o)| match o {
        Outcome::Panic(m) => Some(DistError::RankFailed {
            rank,
            reason: m.clone(),
        }),
        _ => None,
    });
    if let Some(e) = panic {
        return Err(e);
    }
    let mut own = None;
    let mut first = None;
    let mut values = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        match o {
            Outcome::Ok(v) => values.push(v),
            Outcome::Err(rank, e) => match e.downcast::<DistError>() {
                Ok(d) => {
                    first.get_or_insert(DistError::OnRank {
                        rank,
                        source: Arc::new(*d),
                    });
                }
                Err(e) => {
                    own.get_or_insert(DistError::OnRank {
                        rank,
                        source: Arc::from(e),
                    });
                }
            },
            Outcome::Panic(_) => {}
        }
    }
    match own.or(first) {
        Some(e) => Err(e),
        None => Ok(values),
    }
}
