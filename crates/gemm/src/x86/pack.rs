//! AVX512BW packing for whole 32 × 32 blocks in the layouts linear layers use; the caller falls
//! back to the scalar loops for anything else (edges, other strides).
//!
//! * A with unit row stride (k-major, e.g. `dyᵀ` for a weight gradient): a 32 × 32 transpose of
//!   16-bit values.
//! * B with unit column stride (row-major, e.g. `W` in `dy · W`): interleave row pairs.
//! * B with unit row stride (e.g. `Wᵀ` in `x · Wᵀ`): the k-pairs are already adjacent, so the
//!   VNNI tile is a 16 × 16 transpose of 32-bit values.
//!
//! * A with unit column stride (row-major, e.g. `x`): a copy, 64 bytes per row.

use core::arch::x86_64::{
    __m512i, _mm512_loadu_si512, _mm512_permutex2var_epi16, _mm512_permutex2var_epi32,
    _mm512_setzero_si512, _mm512_storeu_si512,
};

use crate::pack::{KTILE, STRIP, Tile};
use crate::{MatRef, bf16};

/// `_mm512_permutex2var_epi16(x, LO16, y)` = x₀ y₀ x₁ y₁ … x₁₅ y₁₅ (index bit 5 picks y).
static LO16: [u16; 32] = interleave16(0);
/// `_mm512_permutex2var_epi16(x, HI16, y)` = x₁₆ y₁₆ … x₃₁ y₃₁.
static HI16: [u16; 32] = interleave16(16);
/// The same for 32-bit lanes: x₀ y₀ … x₇ y₇ and x₈ y₈ … x₁₅ y₁₅ (index bit 4 picks y).
static LO32: [u32; 16] = interleave32(0);
static HI32: [u32; 16] = interleave32(8);

const fn interleave16(from: u16) -> [u16; 32] {
    let mut idx = [0; 32];
    let mut c = 0;
    while c < 16 {
        idx[2 * c] = from + c as u16;
        idx[2 * c + 1] = 32 + from + c as u16;
        c += 1;
    }
    idx
}

const fn interleave32(from: u32) -> [u32; 16] {
    let mut idx = [0; 16];
    let mut c = 0;
    while c < 8 {
        idx[2 * c] = from + c as u32;
        idx[2 * c + 1] = 16 + from + c as u32;
        c += 1;
    }
    idx
}

/// Packs the A block at rows `i0..`, k `k0..` into `pair` if it is whole and k-major; returns
/// whether it did. Only called when AVX512F/BW are available.
pub(crate) fn a_block(a: &MatRef<bf16>, i0: usize, k0: usize, pair: &mut [Tile]) -> bool {
    let whole = i0 + STRIP <= a.rows && k0 + KTILE <= a.cols;
    if !whole {
        return false;
    }
    if a.col_stride == 1 {
        // SAFETY: the packers are only chosen on a CPU with AVX512F and AVX512BW.
        unsafe { a_row_major(a, i0, k0, pair) };
        true
    } else if a.row_stride == 1 {
        // SAFETY: as above.
        unsafe { a_kmajor(a, i0, k0, pair) };
        true
    } else {
        false
    }
}

/// Packs the B block at k `k0..`, columns `j0..` into `pair` (VNNI) if it is whole and has a unit
/// stride; returns whether it did. Only called when AVX512F/BW are available.
pub(crate) fn b_block(b: &MatRef<bf16>, k0: usize, j0: usize, pair: &mut [Tile]) -> bool {
    let whole = k0 + KTILE <= b.rows && j0 + STRIP <= b.cols;
    if !whole {
        return false;
    }
    if b.col_stride == 1 {
        // SAFETY: as above.
        unsafe { b_row_major(b, k0, j0, pair) };
        true
    } else if b.row_stride == 1 {
        // SAFETY: as above.
        unsafe { b_col_major(b, k0, j0, pair) };
        true
    } else {
        false
    }
}

/// Loads 64 bytes starting at `data[off]` (bounds-checked).
#[target_feature(enable = "avx512f")]
fn load<T>(data: &[T], off: usize) -> __m512i {
    let bytes = &data[off..off + 64 / size_of::<T>()];
    // SAFETY: `bytes` is 64 bytes long (checked by the slice index above).
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// Stores 64 bytes at `data[off..]` (bounds-checked).
#[target_feature(enable = "avx512f")]
fn store(data: &mut [u16], off: usize, v: __m512i) {
    let bytes = &mut data[off..off + 32];
    // SAFETY: `bytes` is 64 writable bytes (checked by the slice index above).
    unsafe { _mm512_storeu_si512(bytes.as_mut_ptr().cast(), v) }
}

/// A(i, k) = data[i * row_stride + k]: a plain copy of 32 rows of 64 bytes.
#[target_feature(enable = "avx512f")]
fn a_row_major(a: &MatRef<bf16>, i0: usize, k0: usize, pair: &mut [Tile]) {
    for r in 0..STRIP {
        store(
            &mut pair[r / 16].0,
            (r % 16) * 32,
            load(a.data, (i0 + r) * a.row_stride + k0),
        );
    }
}

/// A(i, k) = data[k * col_stride + i]: row kk of the source block is 32 consecutive i.
#[target_feature(enable = "avx512f,avx512bw")]
fn a_kmajor(a: &MatRef<bf16>, i0: usize, k0: usize, pair: &mut [Tile]) {
    let mut rows = [_mm512_setzero_si512(); 32];
    for (kk, row) in rows.iter_mut().enumerate() {
        *row = load(a.data, (k0 + kk) * a.col_stride + i0);
    }
    transpose_u16(&mut rows);
    for (r, row) in rows.iter().enumerate() {
        store(&mut pair[r / 16].0, (r % 16) * 32, *row);
    }
}

/// B(k, j) = data[k * row_stride + j]: interleave rows 2p and 2p + 1 into VNNI row p.
#[target_feature(enable = "avx512f,avx512bw")]
fn b_row_major(b: &MatRef<bf16>, k0: usize, j0: usize, pair: &mut [Tile]) {
    let (lo, hi) = (load(&LO16, 0), load(&HI16, 0));
    for p in 0..16 {
        let even = load(b.data, (k0 + 2 * p) * b.row_stride + j0);
        let odd = load(b.data, (k0 + 2 * p + 1) * b.row_stride + j0);
        store(
            &mut pair[0].0,
            p * 32,
            _mm512_permutex2var_epi16(even, lo, odd),
        );
        store(
            &mut pair[1].0,
            p * 32,
            _mm512_permutex2var_epi16(even, hi, odd),
        );
    }
}

/// B(k, j) = data[j * col_stride + k]: source row j holds the 16 k-pairs of column j as 32-bit
/// lanes, VNNI row p wants pair p of 16 columns: a 16 × 16 transpose of 32-bit lanes per tile.
#[target_feature(enable = "avx512f,avx512bw")]
fn b_col_major(b: &MatRef<bf16>, k0: usize, j0: usize, pair: &mut [Tile]) {
    for (t, tile) in pair.iter_mut().enumerate() {
        let mut rows = [_mm512_setzero_si512(); 16];
        for (j, row) in rows.iter_mut().enumerate() {
            *row = load(b.data, (j0 + 16 * t + j) * b.col_stride + k0);
        }
        transpose_u32(&mut rows);
        for (p, row) in rows.iter().enumerate() {
            store(&mut tile.0, p * 32, *row);
        }
    }
}

/// Transposes a 32 × 32 matrix of 16-bit values, one row per register. Each pass interleaves
/// row j with row j + 16 into rows 2j and 2j + 1, which moves the row index's top bit to the
/// bottom of the column index and the column index's top bit to the bottom of the row index;
/// after 5 passes (log2 32) row and column bits have traded places.
#[target_feature(enable = "avx512f,avx512bw")]
fn transpose_u16(rows: &mut [__m512i; 32]) {
    let (lo, hi) = (load(&LO16, 0), load(&HI16, 0));
    for _ in 0..5 {
        let prev = *rows;
        for j in 0..16 {
            rows[2 * j] = _mm512_permutex2var_epi16(prev[j], lo, prev[j + 16]);
            rows[2 * j + 1] = _mm512_permutex2var_epi16(prev[j], hi, prev[j + 16]);
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit values the same way (4 passes).
#[target_feature(enable = "avx512f")]
fn transpose_u32(rows: &mut [__m512i; 16]) {
    let (lo, hi) = (load(&LO32, 0), load(&HI32, 0));
    for _ in 0..4 {
        let prev = *rows;
        for j in 0..8 {
            rows[2 * j] = _mm512_permutex2var_epi32(prev[j], lo, prev[j + 8]);
            rows[2 * j + 1] = _mm512_permutex2var_epi32(prev[j], hi, prev[j + 8]);
        }
    }
}
