//! Validation, packing, blocking and threading around the 32 × 32 kernels.
//!
//! A product runs in two phases, each split across up to `threads` workers:
//! 1. Pack: every 32-row strip of A and every 32-column strip of B into the tile layout
//!    ([`crate::pack`]), in runs of strips claimed by the workers.
//! 2. Multiply: C is cut into blocks of up to `MB` × `NB` strips (128 × 256), claimed one at a
//!    time by the workers, column of blocks by column of blocks (consecutive blocks share their
//!    B panel, which stays in L2). A block walks K in chunks of `KC` k-tiles (1024 values of k:
//!    most products are one chunk, so C is written once); per chunk, each B strip of the block
//!    meets each A strip (`MB` strips × `KC` k-tiles = 256 KiB of packed A, in L2), one 32 × 32
//!    kernel call each. Partial sums go to C itself, or to a per-worker f32 scratch block where
//!    C cannot take them directly (bf16 output, blocks overhanging C's edge), copied out at the
//!    end.
//!
//! Measured on a 2-core Xeon with AMX (see the `gemm_speed` example): chunks of 1024 beat 256
//! and 512 (fewer C round trips, which cost more than streaming a B strip from L2), and block
//! shapes from 64 × 256 to 256 × 512 are within noise of each other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::error::{GemmError, Operand};
use crate::pack::{self, KTILE, Packed, Packer, STRIP, Tile};
use crate::{Isa, MatRef, Out, bf16};

/// C blocks are at most this many strips high (128 rows)…
const MB: usize = 4;
/// … and this many strips wide (256 columns).
const NB: usize = 8;
/// K chunk, in k-tiles (1024 values of k).
const KC: usize = 32;

/// Products below this many multiply-adds run on the calling thread: a rayon fork-join (tens of
/// µs with a wake-up) costs more than it saves. About 30 µs of work on each path.
fn parallel_work(isa: Isa) -> usize {
    match isa {
        Isa::Amx => 1 << 24,
        Isa::Avx512Bf16 => 1 << 21,
        Isa::Portable => 1 << 19,
    }
}

/// Checks shapes, strides and slice lengths, with overflow-checked arithmetic, before anything
/// touches memory.
pub(crate) fn validate(a: &MatRef<bf16>, b: &MatRef<bf16>, c: &Out) -> Result<(), GemmError> {
    if a.cols != b.rows {
        return Err(GemmError::InnerDimMismatch {
            a_cols: a.cols,
            b_rows: b.rows,
        });
    }
    covers(
        Operand::A,
        a.data.len(),
        a.rows,
        a.cols,
        a.row_stride,
        a.col_stride,
    )?;
    covers(
        Operand::B,
        b.data.len(),
        b.rows,
        b.cols,
        b.row_stride,
        b.col_stride,
    )?;
    let (m, n) = (a.rows, b.cols);
    let (len, row_stride) = match c {
        Out::F32 {
            data, row_stride, ..
        } => (data.len(), *row_stride),
        Out::Bf16 { data, row_stride } => (data.len(), *row_stride),
    };
    if m > 1 && n > 0 && row_stride < n {
        return Err(GemmError::OutputRowsOverlap {
            row_stride,
            cols: n,
        });
    }
    covers(Operand::C, len, m, n, row_stride, 1)
}

/// Whether a slice of `len` elements holds every element of a strided `rows × cols` matrix: the
/// last one is at `(rows - 1) * row_stride + (cols - 1) * col_stride`.
fn covers(
    operand: Operand,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<(), GemmError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let needed = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|r| {
            (cols - 1)
                .checked_mul(col_stride)
                .and_then(|c| r.checked_add(c))
        })
        .and_then(|last| last.checked_add(1))
        .ok_or(GemmError::ShapeOverflow {
            operand,
            rows,
            cols,
            row_stride,
            col_stride,
        })?;
    if len < needed {
        return Err(GemmError::SliceTooShort {
            operand,
            rows,
            cols,
            row_stride,
            col_stride,
            needed,
            len,
        });
    }
    Ok(())
}

/// C = A·B (validated) on `isa`, which is available.
pub(crate) fn matmul(
    isa: Isa,
    a: MatRef<bf16>,
    b: MatRef<bf16>,
    c: Out,
    threads: usize,
) -> Result<(), GemmError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        zero(c, m, n);
        return Ok(());
    }
    let (m_strips, n_strips, ktiles) = (m.div_ceil(STRIP), n.div_ceil(STRIP), k.div_ceil(KTILE));
    let too_large = |operand, rows, cols| GemmError::TooLarge {
        operand,
        rows,
        cols,
    };
    let mut pa = Packed::alloc(m_strips, ktiles).ok_or(too_large(Operand::A, m, k))?;
    let mut pb = Packed::alloc(n_strips, ktiles).ok_or(too_large(Operand::B, k, n))?;
    let workers = if m.saturating_mul(n).saturating_mul(k) < parallel_work(isa) {
        1
    } else {
        threads.min(rayon::current_num_threads()).max(1)
    };
    let packer = Packer::for_isa(isa);
    pack_operands(packer, (&a, &mut pa), (&b, &mut pb), workers);
    let (mb, nb) = block_shape(m_strips, n_strips, workers);
    let grid = Grid {
        wide: packer != Packer::Scalar,
        m,
        n,
        m_strips,
        n_strips,
        ktiles,
        mb,
        nb,
    };
    multiply(isa, &grid, (&pa, &pb), &Dest::new(c), workers);
    Ok(())
}

/// Phase 1: packs A into `pa` and B into `pb` on `workers` threads.
///
/// The work goes in pieces (a run of A's strips and a run of B's: the same amount of work, as a
/// strip of either operand is 32 × K), claimed one at a time, a few per worker, so that a worker
/// that starts late (on a busy core) only delays its own share.
fn pack_operands(
    packer: Packer,
    (a, pa): (&MatRef<bf16>, &mut Packed),
    (b, pb): (&MatRef<bf16>, &mut Packed),
    workers: usize,
) {
    let ktiles = pa.ktiles();
    let pieces = if workers == 1 { 1 } else { 4 * workers };
    let (mut a_runs, mut b_runs) = (
        pa.runs_mut(pieces).into_iter(),
        pb.runs_mut(pieces).into_iter(),
    );
    let runs: Vec<Mutex<(Option<Run>, Option<Run>)>> = (0..pieces)
        .map(|_| Mutex::new((a_runs.next(), b_runs.next())))
        .collect();
    let next = AtomicUsize::new(0);
    on_workers(workers, || {
        while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
            // Each piece is claimed once, so the lock is never contended.
            let mut run = run.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((first, out)) = &mut run.0 {
                pack::pack_a(packer, a, *first, ktiles, out);
            }
            if let Some((first, out)) = &mut run.1 {
                pack::pack_b(packer, b, *first, ktiles, out);
            }
        }
    });
}

/// Phase 2: every block of `grid` into C on `workers` threads, each claiming blocks one at a
/// time (so uneven blocks and a late worker even out).
fn multiply(isa: Isa, grid: &Grid, (pa, pb): (&Packed, &Packed), dest: &Dest, workers: usize) {
    let tasks = grid.m_strips.div_ceil(grid.mb) * grid.n_strips.div_ceil(grid.nb);
    let next = AtomicUsize::new(0);
    on_workers(workers, || {
        // Tile state is per thread: each worker configures (and on drop releases) its own.
        #[cfg(target_arch = "x86_64")]
        let tiles = (isa == Isa::Amx).then(|| Tiles::configure().expect("AMX was detected"));
        #[cfg(not(target_arch = "x86_64"))]
        let tiles: Option<Tiles> = None;
        let kernel = Kernel {
            isa,
            tiles: tiles.as_ref(),
        };
        let mut scratch = Vec::new();
        loop {
            let task = next.fetch_add(1, Ordering::Relaxed);
            if task >= tasks {
                break;
            }
            grid.run(task, &kernel, pa, pb, dest, &mut scratch);
        }
    });
}

/// Runs `work` on `workers` threads of the current rayon pool (the calling thread alone for 1).
fn on_workers(workers: usize, work: impl Fn() + Sync) {
    if workers == 1 {
        work();
    } else {
        (0..workers).into_par_iter().for_each(|_| work());
    }
}

/// A run of whole strips of a packed operand: its first strip and its tiles.
type Run<'p> = (usize, &'p mut [Tile]);

/// C = 0 (k = 0), unless C accumulates.
fn zero(c: Out, m: usize, n: usize) {
    match c {
        Out::F32 {
            accumulate: true, ..
        } => {}
        Out::F32 {
            data,
            row_stride,
            accumulate: false,
        } => {
            for i in 0..m {
                data[i * row_stride..i * row_stride + n].fill(0.0);
            }
        }
        Out::Bf16 { data, row_stride } => {
            for i in 0..m {
                data[i * row_stride..i * row_stride + n].fill(bf16::ZERO);
            }
        }
    }
}

/// Block height and width in strips: at most `MB` × `NB`, halved (the longer side first) until
/// there are at least 4 blocks per worker, so the last blocks even out the workers' loads.
fn block_shape(m_strips: usize, n_strips: usize, workers: usize) -> (usize, usize) {
    let (mut mb, mut nb) = (MB.min(m_strips), NB.min(n_strips));
    while workers > 1 && m_strips.div_ceil(mb) * n_strips.div_ceil(nb) < 4 * workers {
        if mb >= nb && mb > 1 {
            mb = mb.div_ceil(2);
        } else if nb > 1 {
            nb = nb.div_ceil(2);
        } else {
            break;
        }
    }
    (mb, nb)
}

#[cfg(target_arch = "x86_64")]
use crate::x86::amx::Tiles;
/// No tiles off x86-64.
#[cfg(not(target_arch = "x86_64"))]
enum Tiles {}

/// The kernel of one path (plus, for AMX, the proof that this thread configured the tiles).
struct Kernel<'t> {
    isa: Isa,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    tiles: Option<&'t Tiles>,
}

impl Kernel<'_> {
    /// C\[32×32\] = (load ? C : 0) + A·B over matching k ranges of an A and a B strip.
    ///
    /// # Safety
    /// `c` points to 32 rows of 32 writable f32, `ldc` bytes apart, that no other thread touches
    /// during the call.
    unsafe fn block(&self, a: &[Tile], b: &[Tile], c: *mut f32, ldc: usize, load: bool) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => {
                let tiles = self.tiles.expect("an AMX worker configures its tiles");
                // SAFETY: this thread holds `tiles`; C as promised by our caller.
                unsafe { crate::x86::amx::block(tiles, a, b, c, ldc, load) }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx512Bf16 is only chosen when detected (AVX512F + BF16); C as promised.
            Isa::Avx512Bf16 => unsafe { crate::x86::avx512::block(a, b, c, ldc, load) },
            // SAFETY: C as promised by our caller.
            Isa::Portable => unsafe { crate::portable::block(a, b, c, ldc, load) },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Amx | Isa::Avx512Bf16 => unreachable!("only x86-64 detects {:?}", self.isa),
        }
    }
}

/// C's raw pointer, shared by the workers, each writing its own blocks.
enum Dest {
    F32 {
        ptr: *mut f32,
        row_stride: usize,
        accumulate: bool,
    },
    Bf16 {
        ptr: *mut bf16,
        row_stride: usize,
    },
}

// SAFETY: a `Dest` is made from an `Out` (an exclusive borrow of C held for the whole product)
// and the workers write disjoint blocks of it (each task index is claimed once), so sharing the
// pointer between threads creates no data race.
unsafe impl Sync for Dest {}

impl Dest {
    fn new(c: Out) -> Dest {
        match c {
            Out::F32 {
                data,
                row_stride,
                accumulate,
            } => Dest::F32 {
                ptr: data.as_mut_ptr(),
                row_stride,
                accumulate,
            },
            Out::Bf16 { data, row_stride } => Dest::Bf16 {
                ptr: data.as_mut_ptr(),
                row_stride,
            },
        }
    }
}

/// The product's shape, in strips, and its cut into blocks.
struct Grid {
    /// Whether the CPU has AVX512F/BW (for the bf16 rounding loop).
    wide: bool,
    m: usize,
    n: usize,
    m_strips: usize,
    n_strips: usize,
    ktiles: usize,
    mb: usize,
    nb: usize,
}

impl Grid {
    /// Computes block `task` into C. Blocks are numbered down the columns of blocks, so that
    /// consecutive blocks share a B panel (kept in L2) and walk A.
    fn run(
        &self,
        task: usize,
        kernel: &Kernel,
        pa: &Packed,
        pb: &Packed,
        dest: &Dest,
        scratch: &mut Vec<f32>,
    ) {
        let blocks_m = self.m_strips.div_ceil(self.mb);
        let (bi, bj) = (task % blocks_m, task / blocks_m);
        let ms = bi * self.mb..((bi + 1) * self.mb).min(self.m_strips);
        let ns = bj * self.nb..((bj + 1) * self.nb).min(self.n_strips);
        let (row0, col0) = (ms.start * STRIP, ns.start * STRIP);
        let (rows, cols) = (ms.len() * STRIP, ns.len() * STRIP);

        // Kernels write straight into an f32 C when the whole block lies inside it; otherwise
        // into `scratch` (rows × cols, packed), copied out below.
        let (c, ldc, load_c, direct) = match *dest {
            Dest::F32 {
                ptr,
                row_stride,
                accumulate,
            } if row0 + rows <= self.m && col0 + cols <= self.n => (
                ptr.wrapping_add(row0 * row_stride + col0),
                row_stride * 4,
                accumulate,
                true,
            ),
            _ => {
                scratch.resize(rows * cols, 0.0);
                (scratch.as_mut_ptr(), cols * 4, false, false)
            }
        };
        for kc in (0..self.ktiles).step_by(KC) {
            let kr = 2 * kc..2 * (kc + KC).min(self.ktiles);
            let load = kc > 0 || load_c;
            for (bj, s_n) in ns.clone().enumerate() {
                let b = &pb.strip(s_n)[kr.clone()];
                for (bi, s_m) in ms.clone().enumerate() {
                    let a = &pa.strip(s_m)[kr.clone()];
                    let c = c.wrapping_byte_add(bi * STRIP * ldc + bj * STRIP * 4);
                    // SAFETY: this 32 × 32 part of the block is inside C (direct case: the whole
                    // block is inside C, rows `ldc` bytes apart) or inside `scratch` (rows × cols);
                    // the block is this worker's alone (see `Dest`).
                    unsafe { kernel.block(a, b, c, ldc, load) };
                }
            }
        }
        if !direct {
            self.copy_out(scratch, row0, col0, cols, dest);
        }
    }

    /// Writes the part of a scratch block (`cols` wide, at C's (row0, col0)) that lies inside C.
    fn copy_out(&self, scratch: &[f32], row0: usize, col0: usize, cols: usize, dest: &Dest) {
        let rows = (self.m - row0).min(scratch.len() / cols);
        let width = (self.n - col0).min(cols);
        for (r, src) in scratch.chunks_exact(cols).take(rows).enumerate() {
            let src = &src[..width];
            match *dest {
                Dest::F32 {
                    ptr,
                    row_stride,
                    accumulate,
                } => {
                    // SAFETY: row row0 + r < m, columns col0..col0 + width ≤ n of C, which the
                    // slice covers (validated); this block is this worker's alone (see `Dest`).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            ptr.add((row0 + r) * row_stride + col0),
                            width,
                        )
                    };
                    if accumulate {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
                Dest::Bf16 { ptr, row_stride } => {
                    // SAFETY: as above.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            ptr.add((row0 + r) * row_stride + col0),
                            width,
                        )
                    };
                    crate::round::to_bf16(self.wide, dst, src);
                }
            }
        }
    }
}
