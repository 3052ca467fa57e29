//! Collectives of the thread backend at 1 KB .. 64 MB on 2 and 4 ranks, next to a memcpy of the
//! same size in the same run.
//!
//! `cargo bench -p kiln-benches --bench dist`. Throughput is reported as *bus bandwidth*
//! (nccl-tests): bytes of the full buffer times `2(N-1)/N` for all_reduce and `(N-1)/N` for
//! reduce_scatter and all_gather, per second; memcpy reports bytes copied per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln_dist::{LocalWorld, ReduceOp, shard_of};
use std::time::{Duration, Instant};

const SIZES: [usize; 5] = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];

fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}MB", bytes >> 20)
    } else {
        format!("{}KB", bytes >> 10)
    }
}

/// Runs `iters` collectives on `world` thread ranks; returns rank 0's time between barriers.
fn time(op: &str, world: usize, bytes: usize, iters: u64) -> Duration {
    let n = bytes / 4;
    let times = LocalWorld::run(world, |comm| {
        let mine = shard_of(n, comm.rank(), world);
        let mut full = vec![1f32; n];
        let mut shard = vec![1f32; mine.len];
        let mut run = || match op {
            "all_reduce" => comm.all_reduce(&mut full, ReduceOp::Sum),
            "reduce_scatter" => comm.reduce_scatter_into(&full, &mut shard, ReduceOp::Sum),
            _ => comm.all_gather_into(&shard, &mut full),
        };
        run()?;
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            run()?;
        }
        comm.barrier()?;
        Ok::<_, kiln_dist::DistError>(t.elapsed())
    });
    match times {
        Ok(t) => t[0],
        Err(e) => panic!("bench collective failed: {e}"),
    }
}

fn collectives(c: &mut Criterion) {
    for bytes in SIZES {
        let mut g = c.benchmark_group(format!("dist/{}", label(bytes)));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(if bytes >= 16 << 20 { 3 } else { 1 }));

        g.throughput(Throughput::Bytes(bytes as u64));
        let src = vec![1u8; bytes];
        let mut dst = vec![0u8; bytes];
        g.bench_function("memcpy", |b| {
            b.iter(|| dst.copy_from_slice(std::hint::black_box(&src)))
        });

        for world in [2usize, 4] {
            let ring = (world - 1) as f64 / world as f64;
            for (op, factor) in [
                ("all_reduce", 2.0 * ring),
                ("reduce_scatter", ring),
                ("all_gather", ring),
            ] {
                g.throughput(Throughput::Bytes((bytes as f64 * factor) as u64));
                g.bench_function(BenchmarkId::new(op, format!("{world}ranks")), |b| {
                    b.iter_custom(|iters| time(op, world, bytes, iters))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, collectives);
criterion_main!(benches);
