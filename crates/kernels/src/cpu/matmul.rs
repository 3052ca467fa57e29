//! Strided matrix products: the three products of a linear layer without a transpose copy.
//!
//! f32 runs on the `gemm` crate (the AVX-512 kernels burn-flex uses); bf16 on [`kiln_gemm`]
//! (AMX tiles or AVX512-BF16 where the CPU has them, f32 otherwise), accumulating in f32 and
//! rounding once; f16 on the `gemm` crate's f16 product, or through f32 where it accumulates.

use half::{bf16, f16};
use kiln_gemm::{MatRef, Out};

use super::elem::Elem;

/// A strided read-only matrix: element `(i, j)` is `data[i · rs + j · cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, E> {
    pub data: &'a [E],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, E> Mat<'a, E> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [E], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `start..start + n` (no copy).
    pub fn row_range(self, start: usize, n: usize) -> Self {
        let offset = if n == 0 { 0 } else { start * self.rs };
        Self {
            data: &self.data[offset.min(self.data.len())..],
            rows: n,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }

    fn retype<T: bytemuck::Pod>(self) -> Mat<'a, T>
    where
        E: bytemuck::Pod,
    {
        Mat {
            data: bytemuck::cast_slice(self.data),
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
        }
    }

    fn into_ref(self) -> MatRef<'a, E> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.rs,
            col_stride: self.cs,
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 21;

fn threads_for(a: &Mat<impl Sized>, b: &Mat<impl Sized>) -> usize {
    let work = a.rows.saturating_mul(a.cols).saturating_mul(b.cols);
    if work >= PARALLEL_WORK {
        rayon::current_num_threads()
    } else {
        1
    }
}

fn check<E, F>(a: &Mat<E>, b: &Mat<E>, out: &[F], out_rs: usize) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions");
    assert!(a.fits() && b.fits(), "matmul: strides outside the data");
    assert!(
        a.rows == 0 || b.cols == 0 || (a.rows - 1) * out_rs + b.cols <= out.len(),
        "matmul: output too small"
    );
}

/// `out[m × n] = a · b` for row-major `a` and `out`, one product per block of `block` rows of
/// `a` (a batch row's positions): each block is computed as the same product whatever else is in
/// the batch, so a row's result does not depend on the batch around it (gemm's blocking and its
/// choice of kernel depend on the sizes). Blocks run in parallel on the current pool.
pub(crate) fn matmul_blocks<E: Elem>(a: Mat<E>, b: Mat<E>, out: &mut [E], block: usize) {
    use rayon::prelude::*;
    let (m, n) = (a.rows, b.cols);
    assert_eq!(a.rs, a.cols, "matmul_blocks: row-major A");
    let block = block.clamp(1, m.max(1));
    if m.div_ceil(block) < 2 || n == 0 {
        return matmul(a, b, out, n);
    }
    let product = |(i, out): (usize, &mut [E])| {
        let rows = out.len() / n;
        matmul_on(a.row_range(i * block, rows), b, out, n, 1);
    };
    if rayon::current_num_threads() > 1 {
        out[..m * n]
            .par_chunks_mut(block * n)
            .enumerate()
            .for_each(product);
    } else {
        out[..m * n]
            .chunks_mut(block * n)
            .enumerate()
            .for_each(product);
    }
}

/// `out[m × n] = a · b` in `E` (row-major `out` with row stride `out_rs`), accumulated in f32
/// (f16: in the `gemm` crate's f16 product), on the current pool's threads when it is big
/// enough.
pub(crate) fn matmul<E: Elem>(a: Mat<E>, b: Mat<E>, out: &mut [E], out_rs: usize) {
    let threads = threads_for(&a, &b);
    matmul_on(a, b, out, out_rs, threads)
}

/// [`matmul`] on at most `threads` threads.
fn matmul_on<E: Elem>(a: Mat<E>, b: Mat<E>, out: &mut [E], out_rs: usize, threads: usize) {
    check(&a, &b, out, out_rs);
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    match E::DTYPE {
        burn::tensor::DType::BF16 => {
            let out: &mut [bf16] = bytemuck::cast_slice_mut(out);
            let c = Out::Bf16 {
                data: out,
                row_stride: out_rs,
            };
            kiln_gemm::matmul_bf16(a.retype::<bf16>().into_ref(), b.retype().into_ref(), c, threads)
                .expect("kiln-kernels: bf16 product on checked shapes");
        }
        burn::tensor::DType::F16 => {
            let out: &mut [f16] = bytemuck::cast_slice_mut(out);
            gemm_crate::<f16>(a.retype(), b.retype(), out, out_rs, false, threads);
        }
        _ => {
            let out: &mut [f32] = bytemuck::cast_slice_mut(out);
            gemm_crate::<f32>(a.retype(), b.retype(), out, out_rs, false, threads);
        }
    }
}

/// `out[m × n] (+)= a · b` in f32 whatever `E` is (`accumulate` adds to `out`).
pub(crate) fn matmul_f32<E: Elem>(
    a: Mat<E>,
    b: Mat<E>,
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
) {
    check(&a, &b, out, out_rs);
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    let threads = threads_for(&a, &b);
    match E::DTYPE {
        burn::tensor::DType::BF16 => {
            let c = Out::F32 {
                data: out,
                row_stride: out_rs,
                accumulate,
            };
            kiln_gemm::matmul_bf16(a.retype::<bf16>().into_ref(), b.retype().into_ref(), c, threads)
                .expect("kiln-kernels: bf16 product on checked shapes");
        }
        burn::tensor::DType::F16 => {
            let widen = |m: Mat<E>| -> Vec<f32> {
                let mut v = Vec::with_capacity(m.rows * m.cols);
                for i in 0..m.rows {
                    v.extend((0..m.cols).map(|j| m.data[i * m.rs + j * m.cs].to_f32()));
                }
                v
            };
            let (af, bf) = (widen(a), widen(b));
            let (m, k, n) = (a.rows, a.cols, b.cols);
            gemm_crate::<f32>(
                Mat::rows(&af, m, k),
                Mat::rows(&bf, k, n),
                out,
                out_rs,
                accumulate,
                threads,
            );
        }
        _ => gemm_crate::<f32>(a.retype(), b.retype(), out, out_rs, accumulate, threads),
    }
}

trait GemmScalar: Copy + 'static {
    const ONE: Self;
}
impl GemmScalar for f32 {
    const ONE: Self = 1.0;
}
impl GemmScalar for f16 {
    const ONE: Self = f16::ONE;
}

fn gemm_crate<T: GemmScalar + bytemuck::Zeroable>(
    a: Mat<T>,
    b: Mat<T>,
    out: &mut [T],
    out_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    if a.cols == 0 {
        if !accumulate {
            for row in out.chunks_mut(out_rs.max(1)).take(a.rows) {
                row[..b.cols].fill(bytemuck::Zeroable::zeroed());
            }
        }
        return;
    }
    // SAFETY: `check` verified that every element of `a`, `b` and the `m × n` block of `out` lies
    // inside its slice; `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}
