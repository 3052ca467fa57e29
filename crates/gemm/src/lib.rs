//! bf16 × bf16 → f32-accumulate matrix products on the CPU, on the fastest path the machine
//! allows, chosen at run time:
//!
//! 1. [`Isa::Amx`]: Intel AMX tiles (`tdpbf16ps`), after Linux grants the process the tile
//!    state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once).
//! 2. [`Isa::Avx512Bf16`]: `vdpbf16ps` on 512-bit registers.
//! 3. [`Isa::Portable`]: convert to f32 and multiply; runs anywhere.
//!
//! Every path packs A and B into the same tile layout first (K padded with zeros to a multiple of
//! 32, rows and columns to a multiple of 32), so any strides work: a transpose is just swapped
//! strides. Products accumulate in f32; [`Out::Bf16`] rounds the f32 result once, to nearest even.
//!
//! ```
//! use kiln_gemm::{bf16, matmul_bf16, MatRef, Out};
//! // y[2×3] = x[2×4] · Wᵀ with W stored [3, 4] (out, in), as a linear layer keeps it.
//! let x: Vec<bf16> = (0..8).map(|v| bf16::from_f32(v as f32)).collect();
//! let w: Vec<bf16> = (0..12).map(|v| bf16::from_f32(v as f32)).collect();
//! let a = MatRef { data: &x, rows: 2, cols: 4, row_stride: 4, col_stride: 1 };
//! let b = MatRef { data: &w, rows: 4, cols: 3, row_stride: 1, col_stride: 4 }; // B(k, n) = W[n, k]
//! let mut y = [0f32; 6];
//! matmul_bf16(a, b, Out::F32 { data: &mut y, row_stride: 3, accumulate: false }, 1)?;
//! assert_eq!(y, [14.0, 38.0, 62.0, 38.0, 126.0, 214.0]);
//! # Ok::<(), kiln_gemm::GemmError>(())
//! ```
//!
//! Subnormal bf16 inputs count as zero on the AMX and AVX512-BF16 paths (the hardware flushes
//! them), and subnormal partial sums may be flushed there too; the portable path keeps them.
//!
//! Each product packs copies of A and B (about their size in bf16); the packing space is kept
//! for the next product (at most four buffers of at most 64 MiB each), as fresh pages cost a
//! fifth of a 1024³ product in page faults.

mod detect;
mod driver;
mod error;
mod pack;
mod portable;
mod round;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use error::{GemmError, Operand};
pub use half::bf16;

/// Which code path a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AMX tiles: `tdpbf16ps` on 16×32 · 32×16 bf16 tiles into 16×16 f32 tiles.
    Amx,
    /// AVX512-BF16: `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// Plain f32 arithmetic; always available.
    Portable,
}

/// The fastest path this CPU and OS allow (detected once, cached; requests AMX permission once).
pub fn best_isa() -> Isa {
    available_isas()[0]
}

/// Every path this machine can run (for tests and benchmarks), best first; Portable always.
pub fn available_isas() -> Vec<Isa> {
    detect::available().to_vec()
}

/// A read-only strided matrix: element (i, j) is `data[i * row_stride + j * col_stride]`, for
/// i < `rows`, j < `cols`. A transpose is swapped strides (and swapped `rows`/`cols`); strides may
/// be anything, 0 included, as long as `data` covers every element.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` matrix: rows `cols` apart, columns contiguous.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (`cols × rows`), without moving data.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Where C goes: row-major with a row stride (cols contiguous). C is `m × n`, with m = A's rows
/// and n = B's columns; the slice needs `(m - 1) * row_stride + n` elements, and `row_stride`
/// must be at least n when m > 1 (rows may not overlap).
#[derive(Debug)]
pub enum Out<'a> {
    /// C = A·B, or C += A·B when `accumulate`.
    F32 {
        data: &'a mut [f32],
        row_stride: usize,
        accumulate: bool,
    },
    /// C = round_to_nearest_even_bf16(A·B) (accumulated in f32, rounded once).
    Bf16 {
        data: &'a mut [bf16],
        row_stride: usize,
    },
}

/// C\[m×n\] = A\[m×k\]·B\[k×n\] on [`best_isa()`], using up to `threads` threads of the current
/// rayon pool (1 = the calling thread only; 0 counts as 1).
pub fn matmul_bf16(
    a: MatRef<bf16>,
    b: MatRef<bf16>,
    c: Out,
    threads: usize,
) -> Result<(), GemmError> {
    matmul_bf16_on(best_isa(), a, b, c, threads)
}

/// The same as [`matmul_bf16`] on a given path (tests force each path; an unavailable path is
/// an error, not a crash).
pub fn matmul_bf16_on(
    isa: Isa,
    a: MatRef<bf16>,
    b: MatRef<bf16>,
    c: Out,
    threads: usize,
) -> Result<(), GemmError> {
    driver::validate(&a, &b, &c)?;
    if !detect::available().contains(&isa) {
        return Err(GemmError::Unavailable(isa));
    }
    driver::matmul(isa, a, b, c, threads)
}
