//! ZeRO stages Two and Three with ranks as processes: under `mpirun -np N`, each process trains its slice of
//! the global batch over the MPI communicator, then replays the same run with N thread ranks and
//! checks that its losses and parameters match; stage Three also with gradients reduced in bf16.
//! Run by `.ci/mpi-zero.sh`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;

use common::*;
use kiln_dist::{Communicator, LocalWorld};
use kiln_precision::{ParamGroup, Policy};
use kiln_zero::{Engine, Stage, ZeroConfig};

const STEPS: usize = 5;

type RankOut = (Vec<f32>, HashMap<String, Vec<f32>>);

fn train(
    comm: Communicator,
    stage: Stage,
    policy: Policy,
) -> kiln_zero::Result<(RankOut, Communicator)> {
    let config = tiny();
    let (rank, world) = (comm.rank(), comm.world_size());
    let zc = ZeroConfig {
        stage,
        policy,
        group: ParamGroup {
            lr: 1e-2,
            weight_decay: 0.1,
        },
        ..Default::default()
    };
    let mut engine = Engine::new(llama_units(&config), comm, zc, |_| true)?;
    let mut losses = vec![];
    for step in 0..STEPS {
        let batches = rank_batches(&config, step, rank, world, 1, policy.compute);
        losses.push(engine.step(&batches)?.loss);
    }
    let params = full_params_f32(&mut engine)?;
    Ok(((losses, params), engine.into_parts().1))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let comm = Communicator::mpi()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut comm = comm;
    let bf16_reduce = Policy {
        reduce: burn::tensor::DType::BF16,
        ..Policy::f32()
    };
    for (stage, policy) in [
        (Stage::Two, Policy::f32()),
        (Stage::Three, Policy::f32()),
        (Stage::Three, bf16_reduce),
    ] {
        let ((losses, params), back) = train(comm, stage, policy)?;
        comm = back;
        let threads = LocalWorld::run(world, |c| train(c, stage, policy).map(|r| r.0))?;
        let (want_losses, want_params) = &threads[rank];
        let mut worst = 0.0f32;
        for (a, b) in losses.iter().zip(want_losses) {
            worst = worst.max((a - b).abs() / b.abs());
        }
        for (path, want) in want_params {
            let got = params
                .get(path)
                .ok_or(format!("rank {rank}: no parameter {path}"))?;
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs() / w.abs().max(1e-2));
            }
        }
        if worst > 1e-5 {
            return Err(format!(
                "rank {rank}/{world}: {stage:?} (reduce {:?}): MPI and thread runs differ by {worst:e}",
                policy.reduce
            )
            .into());
        }
        println!(
            "kiln-zero mpi: rank {rank}/{world} stage {stage:?} (reduce {:?}) matches {world} thread ranks (worst relative difference {worst:e}); losses {losses:?}",
            policy.reduce
        );
    }
    Ok(())
}
