//! Rank discovery from the launcher's environment variables.

use crate::error::{DistError, Result};
use serde::Serialize;

/// Who launched this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Launcher {
    /// `mpirun` / `mpiexec` of Open MPI: `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`.
    OpenMpi,
    /// torchrun-style: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
    Torchrun,
    /// Slurm `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
    Slurm,
}

/// This process's place in a multi-process job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RankEnv {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node (picks the GPU); 0 when the launcher omits it.
    pub local_rank: usize,
    /// Rendezvous address (torchrun only).
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

impl RankEnv {
    /// Reads the process environment: Open MPI first, then torchrun, then Slurm.
    /// `Ok(None)` when no launcher variables are set (a single process).
    pub fn detect() -> Result<Option<RankEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`RankEnv::detect`], reading variables through `get` (for tests and embedding).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let schemes = [
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            (Launcher::Torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK"),
            (
                Launcher::Slurm,
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
            ),
        ];
        for (launcher, rank_var, size_var, local_var) in schemes {
            let (rank, size) = (get(rank_var), get(size_var));
            if rank.is_none() && size.is_none() {
                continue;
            }
            let rank = parse(rank_var, rank, size_var)?;
            let world_size = parse(size_var, size, rank_var)?;
            if world_size == 0 {
                return Err(env_err(size_var, "0", "a world needs at least one rank"));
            }
            if rank >= world_size {
                return Err(env_err(
                    rank_var,
                    &rank.to_string(),
                    &format!("rank must be below {size_var}={world_size}"),
                ));
            }
            let local_rank = match get(local_var) {
                Some(v) => number(local_var, &v)?,
                None => 0,
            };
            let (master_addr, master_port) = if launcher == Launcher::Torchrun {
                let port = match get("MASTER_PORT") {
                    Some(v) => Some(v.trim().parse::<u16>().map_err(|_| {
                        env_err("MASTER_PORT", &v, "expected a port number 0..=65535")
                    })?),
                    None => None,
                };
                (get("MASTER_ADDR"), port)
            } else {
                (None, None)
            };
            return Ok(Some(RankEnv {
                launcher,
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port,
            }));
        }
        Ok(None)
    }
}

fn env_err(var: &str, value: &str, reason: &str) -> DistError {
    DistError::Env {
        var: var.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn number(var: &str, v: &str) -> Result<usize> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| env_err(var, v, "expected a non-negative integer"))
}

fn parse(var: &str, value: Option<String>, other: &str) -> Result<usize> {
    match value {
        Some(v) => number(var, &v),
        None => Err(env_err(var, "", &format!("unset, but {other} is set"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)]) -> Result<Option<RankEnv>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn no_launcher_means_single_process() {
        assert_eq!(detect(&[]).unwrap(), None);
    }

    #[test]
    fn open_mpi_wins_over_slurm() {
        let e = detect(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("SLURM_PROCID", "7"),
            ("SLURM_NTASKS", "8"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.launcher, e.rank, e.world_size),
            (Launcher::OpenMpi, 2, 4)
        );
    }

    #[test]
    fn torchrun_reads_rendezvous() {
        let e = detect(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.local_rank, 1);
        assert_eq!(e.master_addr.as_deref(), Some("127.0.0.1"));
        assert_eq!(e.master_port, Some(29500));
    }

    #[test]
    fn slurm_without_localid_defaults_to_zero() {
        let e = detect(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4")])
            .unwrap()
            .unwrap();
        assert_eq!((e.launcher, e.rank, e.local_rank), (Launcher::Slurm, 3, 0));
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let cases: [&[(&str, &str)]; 5] = [
            &[("RANK", "x"), ("WORLD_SIZE", "2")],
            &[("RANK", "2"), ("WORLD_SIZE", "2")],
            &[("RANK", "0")],
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0")],
            &[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "99999")],
        ];
        let vars = ["RANK", "RANK", "WORLD_SIZE", "SLURM_NTASKS", "MASTER_PORT"];
        for (case, var) in cases.iter().zip(vars) {
            let e = detect(case).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
    }
}
