//! The thread backend against single-threaded references, and its failure behaviour.

mod common;

use common::{MILLION, check_all_dtypes, check_dtype, lengths};
use half::bf16;
use kiln_dist::{Collective, DistError, LocalWorld, ReduceOp, shard_of};
use std::time::{Duration, Instant};

/// Mismatches are found without waiting, so the timeout only bounds a broken test.
fn short(world: usize) -> LocalWorld {
    LocalWorld::new(world).timeout(Duration::from_secs(20))
}

#[test]
fn every_collective_equals_the_single_thread_reference_for_worlds_1_to_8() {
    for world in 1..=8 {
        LocalWorld::run(world, |comm| {
            for (salt, len) in lengths(world).into_iter().enumerate() {
                check_all_dtypes(&comm, len, salt as u64)?;
            }
            Ok::<_, String>(())
        })
        .unwrap_or_else(|e| panic!("world {world}: {e}"));
    }
}

#[test]
fn every_collective_equals_the_reference_at_a_million_elements() {
    for world in 1..=8 {
        LocalWorld::run(world, |comm| {
            check_dtype::<f32>(&comm, MILLION, 1)?;
            if world % 3 == 2 {
                check_dtype::<bf16>(&comm, MILLION, 2)?;
                check_dtype::<i64>(&comm, MILLION, 3)?;
            }
            Ok::<_, String>(())
        })
        .unwrap_or_else(|e| panic!("world {world}: {e}"));
    }
}

#[test]
fn all_reduce_leaves_every_rank_bit_identical() {
    let outs = LocalWorld::run(5, |comm| {
        let mut x = common::input::<f32>(comm.rank(), 10_007, 9);
        comm.all_reduce(&mut x, ReduceOp::Sum)?;
        Ok::<_, DistError>(x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    })
    .unwrap();
    assert!(outs.iter().all(|o| o == &outs[0]));
}

#[test]
fn mismatched_collectives_fail_every_rank_naming_what_each_called() {
    let handles: Vec<_> = short(3)
        .communicators()
        .unwrap()
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || {
                let x = vec![1.0f32; 6];
                match comm.rank() {
                    0 => comm.all_gather(&x[..2], 6).map(|_| ()),
                    1 => comm.reduce_scatter(&x, ReduceOp::Sum).map(|_| ()),
                    _ => comm.all_reduce(&mut x.clone(), ReduceOp::Sum),
                }
                .unwrap_err()
                .to_string()
            })
        })
        .collect();
    let errs: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for e in &errs {
        assert!(e.contains("collective #0 disagrees"), "{e}");
        assert!(
            e.contains("rank 0 called all_gather #0 (len 6, f32, shard 2)"),
            "{e}"
        );
        assert!(
            e.contains("rank 1 called reduce_scatter #0 (len 6, f32, sum)"),
            "{e}"
        );
        assert!(
            e.contains("rank 2 called all_reduce #0 (len 6, f32, sum)"),
            "{e}"
        );
    }
}

#[test]
fn mismatched_lengths_dtypes_and_ops_fail_every_rank() {
    for case in 0..4 {
        let res = short(2).launch(|comm| {
            let r = comm.rank();
            match (case, r) {
                (0, 0) => comm.all_reduce(&mut [0f32; 4], ReduceOp::Sum),
                (0, _) => comm.all_reduce(&mut [0f32; 5], ReduceOp::Sum),
                (1, 0) => comm.all_reduce(&mut [0f32; 4], ReduceOp::Sum),
                (1, _) => comm.all_reduce(&mut [bf16::ZERO; 4], ReduceOp::Sum),
                (2, 0) => comm.all_reduce(&mut [0i32; 4], ReduceOp::Max),
                (2, _) => comm.all_reduce(&mut [0i32; 4], ReduceOp::Min),
                (_, 0) => comm.broadcast(&mut [0i64; 4], 0),
                (_, _) => comm.broadcast(&mut [0i64; 4], 1),
            }
        });
        let e = res.unwrap_err().to_string();
        let want = [
            "rank 1 called all_reduce #0 (len 5, f32, sum)",
            "rank 1 called all_reduce #0 (len 4, bf16, sum)",
            "rank 1 called all_reduce #0 (len 4, i32, min)",
            "rank 1 called broadcast #0 (len 4, i64, root 1)",
        ][case];
        assert!(e.contains(want), "case {case}: {e}");
    }
}

#[test]
fn out_of_order_sequences_are_caught() {
    // Rank 1 skips a barrier: its all_reduce is call #0 while rank 0's is call #1.
    let e = short(2)
        .launch(|comm| {
            if comm.rank() == 0 {
                comm.barrier()?;
            }
            comm.all_reduce(&mut [1f32; 3], ReduceOp::Sum)
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 0 called barrier #0") && e.contains("rank 1 called all_reduce #0"),
        "{e}"
    );
}

#[test]
fn wrong_shard_lengths_are_reported_with_the_expected_size() {
    let e = short(4)
        .launch(|comm| {
            let n = if comm.rank() == 3 {
                2
            } else {
                shard_of(10, comm.rank(), 4).len
            };
            comm.all_gather(&vec![0f32; n], 10).map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 3 passed a shard of 2 elements, its shard of 10 is 1"),
        "{e}"
    );

    let e = short(2)
        .launch(|comm| comm.reduce_scatter_into(&[1f32; 4], &mut [0f32; 3], ReduceOp::Sum))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 0 passed a shard of 3 elements, its shard of 4 is 2"),
        "{e}"
    );

    let e = short(2)
        .launch(|comm| comm.broadcast(&mut [1f32; 4], 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("root 2 is not a rank"), "{e}");
}

#[test]
fn a_panicking_rank_fails_the_others_at_once_naming_it() {
    let start = Instant::now();
    let world = LocalWorld::new(4).timeout(Duration::from_secs(60));
    let others = std::sync::Mutex::new(Vec::new());
    let res = world.launch(|comm| {
        if comm.rank() == 2 {
            panic!("boom on purpose");
        }
        let r = comm.all_reduce(&mut [1f32; 1000], ReduceOp::Sum);
        others.lock().unwrap().push(r.unwrap_err().to_string());
        Ok::<_, DistError>(())
    });
    match res {
        Err(DistError::RankFailed { rank: 2, reason }) => {
            assert!(reason.contains("boom on purpose"))
        }
        other => panic!("{other:?}"),
    }
    for e in others.into_inner().unwrap() {
        assert!(e.contains("rank 2 failed: panicked"), "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "waited for the timeout"
    );
}

#[test]
fn a_rank_that_returns_early_fails_pending_and_later_calls() {
    let start = Instant::now();
    let res = LocalWorld::new(3)
        .timeout(Duration::from_secs(60))
        .launch(|comm| {
            if comm.rank() == 1 {
                return Err(DistError::Unavailable("rank 1 gives up".into()));
            }
            let first = comm.all_gather(&[1f32; 1], 3).unwrap_err().to_string();
            let later = comm.barrier().unwrap_err().to_string();
            assert!(
                first.contains("rank 1 failed: dropped its communicator"),
                "{first}"
            );
            assert_eq!(first, later);
            Ok(())
        });
    // The root cause is the error rank 1 returned, not its echo on the other ranks.
    let e = res.unwrap_err().to_string();
    assert!(e.contains("rank 1") && e.contains("gives up"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_rank_that_never_arrives_times_out_naming_it() {
    let start = Instant::now();
    let res = LocalWorld::new(3)
        .timeout(Duration::from_millis(200))
        .launch(|comm| {
            if comm.rank() == 2 {
                std::thread::sleep(Duration::from_millis(600));
                // By now the world has failed: rank 2 learns why instead of hanging.
                let e = comm.barrier().unwrap_err().to_string();
                assert!(e.contains("timed out"), "{e}");
                return Ok(());
            }
            let e = comm.all_reduce(&mut [1f32; 8], ReduceOp::Max).unwrap_err();
            match &e {
                DistError::Timeout { missing, call, .. } => {
                    assert_eq!(missing, &vec![2]);
                    assert!(call.starts_with("all_reduce #0"), "{call}");
                }
                other => panic!("{other}"),
            }
            Err(e)
        });
    assert!(
        res.unwrap_err()
            .to_string()
            .contains("waiting for rank(s) [2]")
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn traffic_counts_ring_equivalent_volume() {
    let t = LocalWorld::run(4, |comm| {
        let mut x = vec![0f32; 1000];
        comm.all_reduce(&mut x, ReduceOp::Sum)?;
        let s = comm.reduce_scatter(&x, ReduceOp::Sum)?;
        comm.all_gather(&s, 1000)?;
        comm.broadcast(&mut x, 1)?;
        comm.barrier()?;
        // Uneven: 10 bf16 over 4 ranks gives shards 3, 3, 3, 1.
        comm.reduce_scatter(&[bf16::ZERO; 10], ReduceOp::Sum)?;
        Ok::<_, DistError>(comm.traffic())
    })
    .unwrap();
    let b = 4000;
    for (rank, t) in t.iter().enumerate() {
        assert_eq!(t.all_reduce.bytes_sent, 2 * 3 * b / 4);
        assert_eq!(t.all_reduce.bytes_received, 2 * 3 * b / 4);
        assert_eq!(t.all_gather.bytes_received, 3 * b / 4);
        assert_eq!(
            t.of(Collective::Broadcast).bytes_sent,
            if rank == 1 { b } else { 0 }
        );
        assert_eq!(
            t.of(Collective::Broadcast).bytes_received,
            if rank == 1 { 0 } else { b }
        );
        assert_eq!(t.barrier.calls, 1);
        let own = shard_of(10, rank, 4).len as u64 * 2;
        assert_eq!(t.reduce_scatter.calls, 2);
        assert_eq!(t.reduce_scatter.bytes_sent, 3 * b / 4 + 20 - own);
        assert_eq!(t.total().calls, 6);
    }
    let json = serde_json::to_string(&t[0]).unwrap();
    assert!(json.contains("\"all_reduce\""), "{json}");
}

#[test]
fn a_world_of_one_is_the_identity_and_moves_no_bytes() {
    let t = LocalWorld::run(1, |comm| {
        let mut x = vec![3i32, -4];
        comm.all_reduce(&mut x, ReduceOp::Avg)?;
        assert_eq!(x, vec![3, -4]);
        Ok::<_, DistError>(comm.traffic().total())
    })
    .unwrap();
    assert_eq!((t[0].calls, t[0].bytes_sent), (1, 0));
}

#[test]
fn zero_ranks_is_an_error() {
    assert!(LocalWorld::new(0).communicators().is_err());
}

#[cfg(feature = "burn")]
#[test]
fn tensor_adapters_keep_dtype_and_device() {
    use burn::tensor::{DType, Device, Int, Tensor, TensorData};
    let out = LocalWorld::run(3, |comm| {
        let device = Device::flex();
        let r = comm.rank() as f32;
        let t = Tensor::<1>::from_data(TensorData::new(vec![r, 1.0, 2.0, 3.0, 4.0], [5]), &device)
            .cast(DType::BF16);
        let sum = comm.all_reduce_tensor(t.clone(), ReduceOp::Sum)?;
        let shard = comm.reduce_scatter_tensor(t, ReduceOp::Max)?;
        let full = comm.all_gather_tensor(shard, 5)?;
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new(vec![comm.rank() as i64; 2], [2]), &device);
        let ids = comm.broadcast_tensor(ids, 2)?;
        Ok::<_, DistError>((
            sum.dtype(),
            sum.into_data(),
            full.into_data(),
            ids.into_data(),
        ))
    })
    .unwrap();
    for (dtype, sum, full, ids) in out {
        assert_eq!(dtype, DType::BF16);
        assert_eq!(
            sum.convert::<f32>().try_to_vec::<f32>().unwrap(),
            vec![3.0, 3.0, 6.0, 9.0, 12.0]
        );
        assert_eq!(
            full.convert::<f32>().try_to_vec::<f32>().unwrap(),
            vec![2.0, 1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            ids.convert::<i64>().try_to_vec::<i64>().unwrap(),
            vec![2, 2]
        );
    }
}
