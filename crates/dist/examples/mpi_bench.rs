//! Bus bandwidth of the MPI backend next to memcpy, as a table (rank 0 prints).
//!
//! ```sh
//! cargo build --profile bench -p kiln-dist --no-default-features --features mpi --example mpi_bench
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/release/examples/mpi_bench
//! ```
//!
//! Bus bandwidth follows nccl-tests: `size / time` times `2(N-1)/N` for all_reduce and `(N-1)/N`
//! for reduce_scatter and all_gather, where `size` is the full buffer.

use kiln_dist::{Communicator, ReduceOp, shard_of};
use std::time::Instant;

const SIZES: [usize; 5] = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];

fn iterations(bytes: usize) -> usize {
    ((256usize << 20) / bytes).clamp(5, 500)
}

fn memcpy_gbs(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    dst.copy_from_slice(&src);
    let iters = iterations(bytes);
    let t = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    bytes as f64 * iters as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() -> Result<(), kiln_dist::DistError> {
    let comm = Communicator::mpi()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    if rank == 0 {
        println!("| op | size | ranks | time | busbw GB/s | memcpy GB/s | busbw/memcpy |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
    }
    for bytes in SIZES {
        let n = bytes / 4;
        let mine = shard_of(n, rank, world);
        let mut full = vec![1f32; n];
        let mut shard = vec![1f32; mine.len];
        let memcpy = if rank == 0 { memcpy_gbs(bytes) } else { 0.0 };
        for op in ["all_reduce", "reduce_scatter", "all_gather"] {
            let mut run = || match op {
                "all_reduce" => comm.all_reduce(&mut full, ReduceOp::Sum),
                "reduce_scatter" => comm.reduce_scatter_into(&full, &mut shard, ReduceOp::Sum),
                _ => comm.all_gather_into(&shard, &mut full),
            };
            run()?;
            comm.barrier()?;
            let iters = iterations(bytes);
            let t = Instant::now();
            for _ in 0..iters {
                run()?;
            }
            comm.barrier()?;
            let secs = t.elapsed().as_secs_f64() / iters as f64;
            let factor =
                (world - 1) as f64 / world as f64 * if op == "all_reduce" { 2.0 } else { 1.0 };
            let busbw = bytes as f64 / secs * factor / 1e9;
            if rank == 0 {
                println!(
                    "| {op} | {} | {world} | {:.1} us | {busbw:.2} | {memcpy:.2} | {:.0}% |",
                    human(bytes),
                    secs * 1e6,
                    100.0 * busbw / memcpy
                );
            }
        }
    }
    Ok(())
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MB", bytes >> 20)
    } else {
        format!("{} KB", bytes >> 10)
    }
}
