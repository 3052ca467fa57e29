//! The launch: N thread ranks, or this process as one rank under `mpirun` (MPI) or NCCL.

#[cfg(any(feature = "mpi", feature = "nccl"))]
use kiln_dist::Communicator;
use kiln_dist::LocalWorld;

use super::run::{Resume, TrainSummary, rank_main};
use crate::config::{DistBackend, TrainConfig};
use crate::{Result, TrainerError};

/// Runs `config`, launching its ranks: N threads, or this process as one rank under `mpirun`.
pub fn train(config: &TrainConfig, resume: &Resume) -> Result<TrainSummary> {
    config.validate()?;
    let env = kiln_dist::RankEnv::detect()?;
    let backend = match (config.dist.backend, &env) {
        (DistBackend::Auto, Some(env)) if env.world_size > 1 => DistBackend::Mpi,
        (DistBackend::Auto, _) => DistBackend::Threads,
        (b, _) => b,
    };
    match backend {
        DistBackend::Threads | DistBackend::Auto => {
            let world = config.dist.world_size;
            let out = LocalWorld::run(world, |comm| {
                rank_main(comm, config, resume, DistBackend::Threads).map_err(|e| e.to_string())
            })
            .map_err(|e| TrainerError::Run(e.to_string()))?;
            Ok(out.into_iter().next().expect("rank 0"))
        }
        DistBackend::Mpi => {
            #[cfg(feature = "mpi")]
            {
                let comm = Communicator::mpi()?;
                let threads = kiln_dist::threads_per_rank(1)?;
                kiln_dist::with_threads(threads, || {
                    rank_main(comm, config, resume, DistBackend::Mpi)
                })?
            }
            #[cfg(not(feature = "mpi"))]
            Err(TrainerError::invalid(
                "dist.backend",
                "this kiln was built without the `mpi` feature (cargo build --features mpi)",
            ))
        }
        DistBackend::Nccl => {
            #[cfg(feature = "nccl")]
            {
                let comm = Communicator::nccl()?;
                rank_main(comm, config, resume, DistBackend::Nccl)
            }
            #[cfg(not(feature = "nccl"))]
            Err(TrainerError::invalid(
                "dist.backend",
                "this kiln was built without the `nccl` feature (cargo build --features nccl)",
            ))
        }
    }
}
