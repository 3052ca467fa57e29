//! Element types the collectives move, and the reduction kernels.
//!
//! Floats reduce in f32 (f16 and bf16 are widened, reduced, rounded once at the end).
//! Integers reduce in their own type with wrapping arithmetic, so an overflow never panics.
//! Sums run in rank order (`((x0 + x1) + x2) + ...`), so every rank gets bit-identical results.

use half::{bf16, f16};
use serde::Serialize;
use std::fmt;

/// Reduction operator, named as in NCCL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ReduceOp {
    /// Element-wise sum (wrapping for integers).
    Sum,
    /// Sum divided by the world size (truncating division for integers).
    Avg,
    /// Element-wise maximum; on the local backend a NaN anywhere gives NaN.
    Max,
    /// Element-wise minimum; on the local backend a NaN anywhere gives NaN.
    Min,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl ReduceOp {
    pub(crate) fn code(self) -> u64 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Avg => 2,
            ReduceOp::Max => 3,
            ReduceOp::Min => 4,
        }
    }

    pub(crate) fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => ReduceOp::Sum,
            2 => ReduceOp::Avg,
            3 => ReduceOp::Max,
            4 => ReduceOp::Min,
            _ => return None,
        })
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        })
    }
}

/// Element type of a flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn code(self) -> u64 {
        match self {
            DType::F32 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::I32 => 4,
            DType::I64 => 5,
        }
    }

    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => DType::F32,
            2 => DType::F16,
            3 => DType::BF16,
            4 => DType::I32,
            5 => DType::I64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Elements per block of a reduction: the accumulator lives on the stack and stays in L1.
pub(crate) const BLOCK: usize = 1024;

/// A type the collectives can carry: f32, f16, bf16, i32, i64.
///
/// The reduction works block by block: `load` the first rank's block into an accumulator,
/// `combine` every further rank's block into it, `store` it (dividing for `Avg`).
pub trait Element:
    bytemuck::Pod + Send + Sync + PartialEq + fmt::Debug + sealed::Sealed + 'static
{
    const DTYPE: DType;
    #[doc(hidden)]
    type Acc: bytemuck::Pod + Default;
    #[doc(hidden)]
    fn load(src: &[Self], acc: &mut [Self::Acc]);
    #[doc(hidden)]
    fn combine(acc: &mut [Self::Acc], src: &[Self], op: ReduceOp);
    #[doc(hidden)]
    fn store(acc: &[Self::Acc], dst: &mut [Self], op: ReduceOp, world: usize);
}

#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() { a } else { b }
}

#[inline(always)]
fn fmin(a: f32, b: f32) -> f32 {
    if a < b || a.is_nan() { a } else { b }
}

fn combine_f32(acc: &mut [f32], src: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(src).for_each(|(a, b)| *a += *b),
        ReduceOp::Max => acc.iter_mut().zip(src).for_each(|(a, b)| *a = fmax(*a, *b)),
        ReduceOp::Min => acc.iter_mut().zip(src).for_each(|(a, b)| *a = fmin(*a, *b)),
    }
}

fn finish_f32(acc: &mut [f32], op: ReduceOp, world: usize) {
    if op == ReduceOp::Avg {
        let n = world as f32;
        acc.iter_mut().for_each(|a| *a /= n);
    }
}

impl sealed::Sealed for f32 {}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
    type Acc = f32;
    fn load(src: &[f32], acc: &mut [f32]) {
        acc.copy_from_slice(src);
    }
    fn combine(acc: &mut [f32], src: &[f32], op: ReduceOp) {
        combine_f32(acc, src, op);
    }
    fn store(acc: &[f32], dst: &mut [f32], op: ReduceOp, world: usize) {
        dst.copy_from_slice(acc);
        finish_f32(dst, op, world);
    }
}

macro_rules! half_element {
    ($t:ty, $dt:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $dt;
            type Acc = f32;
            fn load(src: &[$t], acc: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(acc);
            }
            fn combine(acc: &mut [f32], src: &[$t], op: ReduceOp) {
                use half::slice::HalfFloatSliceExt;
                let mut wide = [0f32; BLOCK];
                let wide = &mut wide[..src.len()];
                src.convert_to_f32_slice(wide);
                combine_f32(acc, wide, op);
            }
            fn store(acc: &[f32], dst: &mut [$t], op: ReduceOp, world: usize) {
                use half::slice::HalfFloatSliceExt;
                let mut tmp = [0f32; BLOCK];
                let tmp = &mut tmp[..acc.len()];
                tmp.copy_from_slice(acc);
                finish_f32(tmp, op, world);
                dst.convert_from_f32_slice(tmp);
            }
        }
    };
}

half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);

macro_rules! int_element {
    ($t:ty, $dt:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $dt;
            type Acc = $t;
            fn load(src: &[$t], acc: &mut [$t]) {
                acc.copy_from_slice(src);
            }
            fn combine(acc: &mut [$t], src: &[$t], op: ReduceOp) {
                let it = acc.iter_mut().zip(src);
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => it.for_each(|(a, b)| *a = a.wrapping_add(*b)),
                    ReduceOp::Max => it.for_each(|(a, b)| *a = (*a).max(*b)),
                    ReduceOp::Min => it.for_each(|(a, b)| *a = (*a).min(*b)),
                }
            }
            fn store(acc: &[$t], dst: &mut [$t], op: ReduceOp, world: usize) {
                dst.copy_from_slice(acc);
                if op == ReduceOp::Avg {
                    // world >= 1 always; wrapping_div only overflows for MIN / -1.
                    let n = world as $t;
                    dst.iter_mut().for_each(|a| *a = a.wrapping_div(n));
                }
            }
        }
    };
}

int_element!(i32, DType::I32);
int_element!(i64, DType::I64);

/// `dst[i] = op(srcs[0][i], srcs[1][i], ...)`, combined in slice order.
///
/// `srcs` is non-empty and every slice has `dst.len()` elements (checked by the callers).
pub(crate) fn reduce_into<T: Element>(dst: &mut [T], srcs: &[&[T]], op: ReduceOp, world: usize) {
    let mut acc = [T::Acc::default(); BLOCK];
    let mut start = 0;
    while start < dst.len() {
        let end = (start + BLOCK).min(dst.len());
        let acc = &mut acc[..end - start];
        let mut rest = srcs.iter();
        if let Some(first) = rest.next() {
            T::load(&first[start..end], acc);
        }
        for src in rest {
            T::combine(acc, &src[start..end], op);
        }
        T::store(acc, &mut dst[start..end], op, world);
        start = end;
    }
}

/// In-place all-reduce of one range across buffers: reads `len` elements at every `bufs[i]`,
/// reduces them block by block and writes the result back to every `bufs[i]`.
///
/// Each block is read from all buffers before it is written to any, so the writes never clobber
/// an unread input; every written block was just read and is still in cache.
///
/// # Safety
/// Every `bufs[i]` is valid for `len` reads and writes, and no other thread reads or writes these
/// ranges during the call.
pub(crate) unsafe fn all_reduce_raw<T: Element>(
    bufs: &[*mut T],
    len: usize,
    op: ReduceOp,
    world: usize,
) {
    let mut acc = [T::Acc::default(); BLOCK];
    let mut out = [<T as bytemuck::Zeroable>::zeroed(); BLOCK];
    let mut start = 0;
    while start < len {
        let n = BLOCK.min(len - start);
        let acc = &mut acc[..n];
        for (i, buf) in bufs.iter().enumerate() {
            // SAFETY: by the contract, buf[start..start + n] is readable and ours alone.
            let block = unsafe { std::slice::from_raw_parts(buf.add(start), n) };
            if i == 0 {
                T::load(block, acc);
            } else {
                T::combine(acc, block, op);
            }
        }
        T::store(acc, &mut out[..n], op, world);
        for buf in bufs {
            // SAFETY: the source blocks above are dead; buf[start..start + n] is ours to write.
            unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), buf.add(start), n) };
        }
        start += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avg_of_halves_rounds_once_from_f32() {
        let a = [f16::from_f32(1.0), f16::from_f32(2.0)];
        let b = [f16::from_f32(2.0), f16::from_f32(2.0)];
        let mut out = [f16::ZERO; 2];
        reduce_into(&mut out, &[&a, &b], ReduceOp::Avg, 2);
        assert_eq!(out, [f16::from_f32(1.5), f16::from_f32(2.0)]);
    }

    #[test]
    fn max_propagates_nan() {
        let a = [1.0f32, f32::NAN, 3.0];
        let b = [f32::NAN, 2.0, 1.0];
        let mut out = [0f32; 3];
        reduce_into(&mut out, &[&a, &b], ReduceOp::Max, 2);
        assert!(out[0].is_nan() && out[1].is_nan() && out[2] == 3.0);
    }

    #[test]
    fn integer_sum_wraps_instead_of_panicking() {
        let a = [i32::MAX];
        let b = [1i32];
        let mut out = [0i32];
        reduce_into(&mut out, &[&a, &b], ReduceOp::Sum, 2);
        assert_eq!(out, [i32::MIN]);
    }
}
