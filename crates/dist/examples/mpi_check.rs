//! The thread tests' reference checks, run on MPI ranks (processes).
//!
//! ```sh
//! cargo build -p kiln-dist --features mpi --example mpi_check
//! mpirun --allow-run-as-root --oversubscribe -np 3 target/debug/examples/mpi_check check
//! mpirun ... -np 3 target/debug/examples/mpi_check panic   # must fail fast naming rank 1
//! mpirun ... -np 3 target/debug/examples/mpi_check exit    # must fail fast naming rank 1
//! mpirun ... -np 3 target/debug/examples/mpi_check hang    # must time out and abort
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use kiln_dist::{Communicator, DistError, ReduceOp, shard_of};
use std::process::ExitCode;
use std::time::Duration;

fn check(comm: &Communicator) -> Result<usize, String> {
    let n = comm.world_size();
    let mut lens = common::lengths(n);
    for (salt, &len) in lens.iter().enumerate() {
        common::check_all_dtypes(comm, len, salt as u64)?;
    }
    common::check_dtype::<f32>(comm, common::MILLION, 1)?;
    common::check_dtype::<half::bf16>(comm, common::MILLION, 2)?;
    lens.push(common::MILLION);

    // Traffic is counted as ring volume, as on the thread backend.
    comm.reset_traffic();
    let mut x = vec![0f32; 1000 * n];
    comm.all_reduce(&mut x, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let t = comm.traffic().all_reduce;
    let want = 2 * (n as u64 - 1) * 4000;
    if t.bytes_sent != want || t.bytes_received != want {
        return Err(format!(
            "all_reduce traffic {t:?}, want {want} bytes each way"
        ));
    }

    // Last: a deliberate mismatch must fail every rank with the full story (and no hang).
    let shard = shard_of(6, comm.rank(), n).len;
    let r = if comm.rank() == 0 {
        comm.all_gather(&vec![1f32; shard], 6).map(|_| ())
    } else {
        comm.reduce_scatter(&[1f32; 6], ReduceOp::Sum).map(|_| ())
    };
    // Ranks that called the same collective are told as one range.
    let others = match n {
        2 => "rank 1 called reduce_scatter".to_string(),
        _ => format!("ranks 1-{} called reduce_scatter", n - 1),
    };
    match r {
        Err(DistError::Mismatch { detail, .. })
            if detail.contains("rank 0 called all_gather") && detail.contains(&others) => {}
        other => {
            return Err(format!(
                "rank {}: mismatch not reported: {other:?}",
                comm.rank()
            ));
        }
    }
    if comm.barrier().is_ok() {
        return Err("a failed communicator accepted another collective".into());
    }
    Ok(lens.len())
}

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "check".into());
    let mut comm = match Communicator::mpi() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mpi_check: {e}");
            return ExitCode::from(2);
        }
    };
    let (rank, n) = (comm.rank(), comm.world_size());
    match mode.as_str() {
        "check" => match check(&comm) {
            Ok(lens) => {
                if rank == 0 {
                    println!(
                        "kiln-dist mpi check passed: {n} ranks, {lens} lengths x 5 dtypes x \
                         (all_reduce, reduce_scatter) x 4 ops + all_gather + broadcast, \
                         mismatch detected on every rank"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mpi_check FAILED on rank {rank}: {e}");
                ExitCode::FAILURE
            }
        },
        // Rank 1 dies in the middle of a run of collectives; the others must not hang.
        "panic" | "exit" | "hang" => {
            comm.set_timeout(Duration::from_secs(3));
            let mut x = vec![1f32; 1024];
            for step in 0..100 {
                if rank == 1 && step == 3 {
                    match mode.as_str() {
                        "panic" => panic!("rank 1 panics on purpose at step {step}"),
                        "exit" => {
                            eprintln!("rank 1 exits with status 7 on purpose at step {step}");
                            std::process::exit(7);
                        }
                        _ => {
                            eprintln!("rank 1 stops issuing collectives on purpose at step {step}");
                            std::thread::sleep(Duration::from_secs(60));
                        }
                    }
                }
                if let Err(e) = comm.all_reduce(&mut x, ReduceOp::Avg) {
                    eprintln!("rank {rank}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            eprintln!("rank {rank}: UNEXPECTED: all collectives completed");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("mpi_check: unknown mode {other:?} (check, panic, exit, hang)");
            ExitCode::from(2)
        }
    }
}
