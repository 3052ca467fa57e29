//! Strided matrix products: the three products of a linear layer without a transpose copy.
//!
//! f32 runs on the `gemm` crate (the AVX-512 kernels burn-flex uses); bf16 on [`kiln_gemm`]
//! (AMX tiles or AVX512-BF16 where the CPU has them, f32 otherwise), accumulating in f32 and
//! rounding once; f16 on the `gemm` crate's f16 product, or through f32 where it accumulates.

use half::{bf16, f16};
use kiln_gemm::{MatRef, Out};

use std::mem::MaybeUninit;

use super::elem::Elem;
use super::parallel::init;

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

    pub(crate) fn retype<T: bytemuck::Pod>(self) -> Mat<'a, T>
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
        super::parallel::threads()
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

/// `out[m × n] = a · b` for row-major `a` and `out`, computed so that each row's result does not
/// depend on the other rows: micro-batches and ranks that split a batch compute each row as the
/// whole batch does.
///
/// The `gemm` crate multiplies a tile of rows with one microkernel and the rows at the edge of
/// the product with narrower ones whose additions associate differently, and for small products
/// it blocks `k` differently. So the rows go in one product whose row count is a multiple of
/// [`ROW_TILE`] and above the small-product sizes, the remainder padded with zero rows to one
/// such product of its own. kiln-gemm computes every element the same way wherever it sits.
pub(crate) fn matmul_rows<E: Elem>(a: Mat<E>, b: Mat<E>) -> Vec<E> {
    let len = a.rows * b.cols;
    let mut out = Vec::with_capacity(len);
    matmul_rows_into(a, b, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `matmul_rows_into` wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// [`matmul_rows`] into `out` (`a.rows × b.cols`, row-major, possibly uninitialised), every
/// element written. Rows computed by separate calls equal the rows of one call.
pub(crate) fn matmul_rows_into<E: Elem>(a: Mat<E>, b: Mat<E>, out: &mut [MaybeUninit<E>]) {
    use rayon::prelude::*;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(a.rs, k, "matmul_rows: row-major A");
    assert_eq!(a.cs, 1, "matmul_rows: row-major A");
    assert_eq!(out.len(), m * n, "matmul_rows: output size");
    if E::DTYPE == burn::tensor::DType::BF16 || m == 0 || n == 0 || k == 0 {
        matmul(a, b, init(out, E::from_f32(0.0)), n);
        return;
    }
    assert_eq!(k, b.rows, "matmul_rows: inner dimensions");
    assert!(
        a.fits() && b.fits(),
        "matmul_rows: strides outside the data"
    );
    // Below MIN_ROWS rows a product with at most SMALL_COLS columns takes gemm's small path.
    let min_rows = if n > SMALL_COLS { ROW_TILE } else { MIN_ROWS };
    let body = if m >= min_rows {
        m / ROW_TILE * ROW_TILE
    } else {
        0
    };
    let parallel = super::parallel::threads() > 1 && m * k * n >= PARALLEL_WORK;
    // One product per thread over whole tiles of rows (each at least `min_rows`), and the
    // remainder padded beside them, rather than gemm's own split of each product: long
    // single-threaded products keep the cores busier.
    let parts = if parallel {
        super::parallel::threads().min(body / min_rows).max(1)
    } else {
        1
    };
    // The output is written, never read, by the products: no zeroing pass.
    let (body_out, rest_out) = out.split_at_mut(body * n);
    let mut jobs: Vec<(usize, &mut [MaybeUninit<E>])> = Vec::with_capacity(parts + 1);
    let (mut left, mut start, tiles) = (body_out, 0, body / ROW_TILE);
    for p in 0..parts.min(tiles) {
        let rows = (tiles / parts + usize::from(p < tiles % parts)) * ROW_TILE;
        let (part, tail) = left.split_at_mut(rows * n);
        jobs.push((start, part));
        (left, start) = (tail, start + rows);
    }
    if !rest_out.is_empty() {
        jobs.push((body, rest_out));
    }
    let job = |(start, out): (usize, &mut [MaybeUninit<E>])| {
        let rows = out.len() / n;
        let threads = if parallel { 1 } else { threads_for(&a, &b) };
        if start < body {
            // SAFETY: `out` holds exactly `rows × n` elements, the product writes every one of
            // them (read_dst = false) and reads none; the inputs were checked above.
            return unsafe {
                gemm_into(
                    a.row_range(start, rows),
                    b,
                    out.as_mut_ptr().cast(),
                    n,
                    threads,
                )
            };
        }
        let padded = rows.next_multiple_of(ROW_TILE).max(min_rows);
        let mut a_pad = vec![E::from_f32(0.0); padded * k];
        a_pad[..rows * k].copy_from_slice(&a.data[start * k..(start + rows) * k]);
        let mut out_pad = vec![E::from_f32(0.0); padded * n];
        matmul_on(Mat::rows(&a_pad, padded, k), b, &mut out_pad, n, threads);
        for (o, &v) in out.iter_mut().zip(&out_pad) {
            o.write(v);
        }
    };
    // The jobs cover all `m × n` elements and each writes all of its own.
    if parallel {
        jobs.into_par_iter().for_each(job);
    } else {
        jobs.into_iter().for_each(job);
    }
}

/// `out[m × n] = a · b` on the `gemm` crate (f32 or f16 `E`), `out` given as a pointer so it may be
/// uninitialised.
///
/// # Safety
/// `out` must be valid for writes of `(m - 1) · out_rs + n` elements and alias neither input;
/// `a` and `b` must lie inside their slices (see `check`).
unsafe fn gemm_into<E: Elem>(a: Mat<E>, b: Mat<E>, out: *mut E, out_rs: usize, threads: usize) {
    // SAFETY: the caller's contract, passed on; `E` is f32 or f16 here, as `T` below.
    unsafe {
        match E::DTYPE {
            burn::tensor::DType::F16 => {
                gemm_raw::<f16>(a.retype(), b.retype(), out.cast(), out_rs, false, threads)
            }
            _ => gemm_raw::<f32>(a.retype(), b.retype(), out.cast(), out_rs, false, threads),
        }
    }
}

/// Products with at most this many columns (and fewer than [`MIN_ROWS`] rows) take the `gemm`
/// crate's small-product path, which blocks `k` differently.
const SMALL_COLS: usize = 64;
/// Rows per `gemm` crate product are a multiple of this: a multiple of every microkernel width
/// it uses (6 on AVX2 and AVX-512, 4 and 8 elsewhere).
pub(crate) const ROW_TILE: usize = 24;
/// Products of at least this many rows take the `gemm` crate's general path.
const MIN_ROWS: usize = 72;

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
            kiln_gemm::matmul_bf16(
                a.retype::<bf16>().into_ref(),
                b.retype().into_ref(),
                c,
                threads,
            )
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
            kiln_gemm::matmul_bf16(
                a.retype::<bf16>().into_ref(),
                b.retype().into_ref(),
                c,
                threads,
            )
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

/// A linear layer's weight gradient rows: `out[r × k] = Σ_blocks dyᵀ[r, block] · x[block, k]` in
/// f32 for `dy_t` (`r × m`, a row per output feature) and `x` (`m × k`), over blocks of `block`
/// of the `m` rows (a batch row's positions), the block products added one after the other.
/// f32 whatever the compute dtype, as torch autocast gives f32 gradients for f32 master weights:
/// rounding each rank's or micro-batch's partial gradient to bf16 before they are summed would
/// cost more precision than the whole product. Splitting a batch into micro-batches or ranks
/// along its rows then only changes how the block sums associate, not the sums themselves.
/// `out` may be uninitialised: every element is written. Each output row's sums do not depend
/// on the other rows, so the rows may be computed in separate calls.
pub(crate) fn weight_grad_into<E: Elem>(
    dy_t: Mat<E>,
    x: Mat<E>,
    block: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let (r, m, k) = (dy_t.rows, dy_t.cols, x.cols);
    assert_eq!(out.len(), r * k, "weight gradient: output size");
    let block = block.clamp(1, m.max(1));
    let blk = |start: usize| {
        let rows = block.min(m - start);
        let d = Mat {
            data: &dy_t.data[(start * dy_t.cs).min(dy_t.data.len())..],
            cols: rows,
            ..dy_t
        };
        (d, x.row_range(start, rows))
    };
    if r == 0 || k == 0 {
        return;
    }
    // The blocks left for the accumulating products after the first pass.
    let (out, skip): (&mut [f32], usize) = if m > 0 && E::DTYPE == burn::tensor::DType::F32 {
        // f32: the first block's product writes the sum, no zeroed buffer first.
        let (d, xb) = blk(0);
        let (d, xb) = (d.retype::<f32>(), xb.retype::<f32>());
        check(&d, &xb, out, k);
        let threads = threads_for(&d, &xb);
        // SAFETY: `check` verified the inputs and that `out` holds the `r × k` block; with at
        // least one row in the block and no accumulation the product writes every element and
        // reads none.
        unsafe { gemm_raw::<f32>(d, xb, out.as_mut_ptr().cast(), k, false, threads) };
        // SAFETY: every element was just written.
        let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
        (out, block.min(m))
    } else {
        (init(out, 0.0), 0)
    };
    for start in (skip..m).step_by(block) {
        let (d, xb) = blk(start);
        matmul_f32(d, xb, out, k, start > 0);
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
    unsafe { gemm_raw(a, b, out.as_mut_ptr(), out_rs, accumulate, threads) }
}

/// The `gemm` crate's product into `out`, read only when `accumulate`.
///
/// # Safety
/// As [`gemm_into`]; `k` must be at least 1 when `out` is uninitialised.
unsafe fn gemm_raw<T: GemmScalar>(
    a: Mat<T>,
    b: Mat<T>,
    out: *mut T,
    out_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            out,
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
