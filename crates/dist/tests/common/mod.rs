//! Reference checks shared by the thread tests and the MPI check binary
//! (`examples/mpi_check.rs` includes this file by path).
//!
//! Every rank's input is a deterministic function of (rank, len, salt), so each rank can compute
//! the single-threaded reference of any collective on its own and compare with what it got.
#![allow(dead_code)]

use half::{bf16, f16};
use kiln_dist::{Communicator, DType, Element, ReduceOp, shard_of};

pub const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

/// Element types with a reference implementation independent of the crate's kernels.
pub trait Ref: Element {
    const FLOAT: bool;
    /// Unit roundoff of the type (0 for integers).
    const EPS: f64;
    fn make(h: u64) -> Self;
    fn to_f64(self) -> f64;
    fn from_f32(x: f32) -> Self;
    fn from_i64(x: i64) -> Self;
}

fn hash(rank: usize, len: usize, salt: u64, i: usize) -> u64 {
    let mut x = (rank as u64) << 48
        ^ (len as u64) << 20
        ^ salt << 8
        ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Values in [-8, 8) on a 1/256 grid: exact in every float type, varied enough for max/min.
fn gen_f32(h: u64) -> f32 {
    ((h % 4096) as f32 - 2048.0) / 256.0
}

impl Ref for f32 {
    const FLOAT: bool = true;
    const EPS: f64 = f32::EPSILON as f64;
    fn make(h: u64) -> Self {
        gen_f32(h) + ((h >> 20) % 1000) as f32 * 1e-6
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_i64(x: i64) -> Self {
        x as f32
    }
}

impl Ref for f16 {
    const FLOAT: bool = true;
    const EPS: f64 = 0.000_976_562_5;
    fn make(h: u64) -> Self {
        f16::from_f32(gen_f32(h))
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn from_i64(x: i64) -> Self {
        f16::from_f32(x as f32)
    }
}

impl Ref for bf16 {
    const FLOAT: bool = true;
    const EPS: f64 = 0.007_812_5;
    fn make(h: u64) -> Self {
        bf16::from_f32(gen_f32(h))
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn from_i64(x: i64) -> Self {
        bf16::from_f32(x as f32)
    }
}

impl Ref for i32 {
    const FLOAT: bool = false;
    const EPS: f64 = 0.0;
    fn make(h: u64) -> Self {
        (h % 2001) as i32 - 1000
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(x: f32) -> Self {
        x as i32
    }
    fn from_i64(x: i64) -> Self {
        x as i32
    }
}

impl Ref for i64 {
    const FLOAT: bool = false;
    const EPS: f64 = 0.0;
    fn make(h: u64) -> Self {
        // Beyond i32, to prove the full width travels.
        (h % 2001) as i64 - 1000 + (((h >> 40) % 3) as i64) * (1i64 << 40)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(x: f32) -> Self {
        x as i64
    }
    fn from_i64(x: i64) -> Self {
        x
    }
}

pub fn input<T: Ref>(rank: usize, len: usize, salt: u64) -> Vec<T> {
    (0..len)
        .map(|i| T::make(hash(rank, len, salt, i)))
        .collect()
}

/// Single-threaded reference: floats accumulate in f32 in rank order, integers in i64.
pub fn reference<T: Ref>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let n = inputs.len();
    let len = inputs.first().map_or(0, Vec::len);
    (0..len)
        .map(|i| {
            if T::FLOAT {
                let xs = inputs.iter().map(|v| v[i].to_f64() as f32);
                let r = match op {
                    ReduceOp::Sum => xs.fold(0.0f32, |a, b| a + b),
                    ReduceOp::Avg => xs.fold(0.0f32, |a, b| a + b) / n as f32,
                    ReduceOp::Max => xs.fold(f32::NEG_INFINITY, f32::max),
                    ReduceOp::Min => xs.fold(f32::INFINITY, f32::min),
                };
                T::from_f32(r)
            } else {
                let xs = inputs.iter().map(|v| v[i].to_f64() as i64);
                let r = match op {
                    ReduceOp::Sum => xs.sum(),
                    ReduceOp::Avg => xs.sum::<i64>() / n as i64,
                    ReduceOp::Max => xs.max().unwrap_or(0),
                    ReduceOp::Min => xs.min().unwrap_or(0),
                };
                T::from_i64(r)
            }
        })
        .collect()
}

/// Exact for integers, max and min; floats within a few roundings of f32 and one of T.
pub fn compare<T: Ref>(
    got: &[T],
    want: &[T],
    op: ReduceOp,
    world: usize,
    what: &str,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} != {}", got.len(), want.len()));
    }
    let exact = !T::FLOAT || matches!(op, ReduceOp::Max | ReduceOp::Min);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        let tol = if exact {
            0.0
        } else {
            // f32 reassociation of `world` terms of magnitude <= 8, then one rounding to T.
            2.0 * T::EPS * w.abs() + (world * world) as f64 * 8.0 * f32::EPSILON as f64
        };
        if (g - w).abs() > tol {
            return Err(format!("{what}: element {i}: got {g}, want {w}"));
        }
    }
    Ok(())
}

/// Runs every collective on `comm` for one dtype and length and checks it against the reference.
pub fn check_dtype<T: Ref>(comm: &Communicator, len: usize, salt: u64) -> Result<(), String> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let inputs: Vec<Vec<T>> = (0..world).map(|r| input::<T>(r, len, salt)).collect();
    let tag = |op: &str| format!("world {world} rank {rank} {:?} len {len} {op}", T::DTYPE);
    let e = |x: kiln_dist::DistError| x.to_string();
    let mine = shard_of(len, rank, world);
    for op in OPS {
        let want = reference(&inputs, op);

        let mut buf = inputs[rank].clone();
        comm.all_reduce(&mut buf, op).map_err(e)?;
        compare(&buf, &want, op, world, &tag(&format!("all_reduce {op}")))?;

        let shard = comm.reduce_scatter(&inputs[rank], op).map_err(e)?;
        compare(
            &shard,
            &want[mine.range()],
            op,
            world,
            &tag(&format!("reduce_scatter {op}")),
        )?;
    }

    let gathered: Vec<T> = (0..len)
        .map(|i| {
            let owner = (0..world).find(|&r| shard_of(len, r, world).range().contains(&i));
            inputs[owner.unwrap_or(0)][i]
        })
        .collect();
    let out = comm
        .all_gather(&inputs[rank][mine.range()], len)
        .map_err(e)?;
    compare(&out, &gathered, ReduceOp::Max, world, &tag("all_gather"))?;

    let root = (len + salt as usize) % world;
    let mut buf = inputs[rank].clone();
    comm.broadcast(&mut buf, root).map_err(e)?;
    compare(
        &buf,
        &inputs[root],
        ReduceOp::Max,
        world,
        &tag(&format!("broadcast root {root}")),
    )?;

    comm.barrier().map_err(e)
}

/// [`check_dtype`] over all five dtypes.
pub fn check_all_dtypes(comm: &Communicator, len: usize, salt: u64) -> Result<(), String> {
    check_dtype::<f32>(comm, len, salt)?;
    check_dtype::<f16>(comm, len, salt)?;
    check_dtype::<bf16>(comm, len, salt)?;
    check_dtype::<i32>(comm, len, salt)?;
    check_dtype::<i64>(comm, len, salt)
}

/// The lengths the issue asks for, for a world of `n`: 0, 1, N-1, N+1, odd primes.
pub fn lengths(n: usize) -> Vec<usize> {
    let mut v = vec![
        0,
        1,
        n.saturating_sub(1),
        n + 1,
        3,
        7,
        13,
        31,
        257,
        1021,
        4099,
    ];
    v.sort_unstable();
    v.dedup();
    v
}

pub const MILLION: usize = 1_000_003;

pub fn dtype_name(d: DType) -> String {
    d.to_string()
}
