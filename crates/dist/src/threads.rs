//! How ranks share the machine's cores: each rank computes on its own rayon pool.
//!
//! The kernels (and the gemm under them) split their work over the threads of the current rayon
//! pool. One rank gets every core; N ranks on one machine (threads of one process, or processes
//! started by `mpirun`) get an equal share each, so that they never fight over cores or wait in
//! one shared queue. `KILN_THREADS` sets the threads per rank explicitly.

use crate::error::{DistError, Result};

/// The environment variable that sets the compute threads of each rank.
pub const THREADS_VAR: &str = "KILN_THREADS";

/// Compute threads for one of `ranks_here` ranks on this machine: `KILN_THREADS` when set, else
/// the cores the process may use divided equally among the ranks (at least 1).
pub fn threads_per_rank(ranks_here: usize) -> Result<usize> {
    if let Ok(v) = std::env::var(THREADS_VAR) {
        return match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(DistError::Env {
                var: THREADS_VAR.into(),
                value: v,
                reason: "expected a number of threads, at least 1".into(),
            }),
        };
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let here = ranks_here.max(1) * processes_here();
    Ok((cores / here).max(1))
}

/// Processes of this job on this machine, from the launcher (1 when not launched).
fn processes_here() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "LOCAL_WORLD_SIZE",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
    .filter(|&n| n > 0)
    .unwrap_or(1)
}

/// Runs `f` with a pool of `threads` compute threads as the current rayon pool (`f` itself runs
/// on one of them).
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("kiln-compute-{i}"))
        .build()
        .map_err(|e| DistError::Env {
            var: THREADS_VAR.into(),
            value: threads.to_string(),
            reason: format!("could not start the compute threads: {e}"),
        })?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_share_the_cores() {
        if std::env::var(THREADS_VAR).is_ok() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(threads_per_rank(1).unwrap(), cores / processes_here());
        assert_eq!(threads_per_rank(cores * 4).unwrap(), 1);
        let n = with_threads(3, rayon::current_num_threads).unwrap();
        assert_eq!(n, 3);
    }
}
