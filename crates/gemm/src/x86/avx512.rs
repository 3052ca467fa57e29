//! The AVX512-BF16 kernel: a 32 × 32 block of C as four 8 × 32 register blocks.
//!
//! `vdpbf16ps acc, a, b` adds a₂ᵢ·b₂ᵢ + a₂ᵢ₊₁·b₂ᵢ₊₁ into f32 lane i, which is exactly one VNNI row
//! of packed B (16 columns × one k-pair) against one k-pair of A broadcast to every lane. An 8 × 32
//! register block keeps 16 accumulators, loads 2 B rows and broadcasts 8 A pairs per k-pair.
//!
//! On the (AMX) test machine `vdpbf16ps` issues once per 2 cycles, half the rate of `vfmadd`, so
//! this path peaks near 100 GFLOP/s per core there, which it reaches, and trails the f32 gemm.
//! It is the path for AVX512-BF16 CPUs without AMX (Cooper Lake, Zen 4/5), not measured here.

use core::arch::x86_64::{
    __m512bh, __m512i, _mm512_dpbf16_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_set1_epi32,
    _mm512_setzero_ps, _mm512_storeu_ps,
};

use crate::pack::Tile;

/// Rows of C per register block.
const MR: usize = 8;

/// C\[32×32\] = (load ? C : 0) + A·B over the k-tiles of `a` and `b` (as [`super::amx::block`]).
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `c` points to 32 rows of 32 writable f32, `ldc` bytes
/// apart, that nothing else touches during the call.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn block(a: &[Tile], b: &[Tile], c: *mut f32, ldc: usize, load: bool) {
    assert!(
        b.len() == a.len() && a.len().is_multiple_of(2),
        "a block needs matching k ranges"
    );
    for r0 in (0..32).step_by(MR) {
        // SAFETY: rows r0..r0 + MR of the caller's 32 rows.
        unsafe { rows(a, b, r0, c.wrapping_byte_add(r0 * ldc), ldc, load) };
    }
}

/// Rows `r0..r0 + MR` of the block; `c` points at row r0.
///
/// # Safety
/// As [`block`], for MR rows.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn rows(a: &[Tile], b: &[Tile], r0: usize, c: *mut f32, ldc: usize, load: bool) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if load {
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = c.wrapping_byte_add(r * ldc);
            // SAFETY: row r of C, 32 f32 (by the contract).
            unsafe { *acc = [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))] };
        }
    }
    // Rows r0..r0 + MR lie in one A tile (MR divides 16): row r is at u16 offset (r % 16) * 32.
    let (tile, first) = (r0 / 16, (r0 % 16) * 32);
    for (at, bt) in a.chunks_exact(2).zip(b.chunks_exact(2)) {
        let a_rows = &at[tile].0[first..first + MR * 32];
        let (b0, b1) = (&bt[0].0, &bt[1].0);
        for p in 0..16 {
            // SAFETY: VNNI row p of each B tile: 32 u16 = 64 bytes inside the tile.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(b0[p * 32..].as_ptr().cast()),
                    _mm512_loadu_si512(b1[p * 32..].as_ptr().cast()),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = &a_rows[r * 32 + 2 * p..][..2];
                let pair = (u32::from(pair[0]) | u32::from(pair[1]) << 16) as i32;
                let av = bh(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, bh(b0));
                acc[1] = _mm512_dpbf16_ps(acc[1], av, bh(b1));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.wrapping_byte_add(r * ldc);
        // SAFETY: row r of C, 32 writable f32 (by the contract).
        unsafe {
            _mm512_storeu_ps(row, acc[0]);
            _mm512_storeu_ps(row.add(16), acc[1]);
        }
    }
}

/// Reads 32 bf16 bit patterns as the `__m512bh` the dot-product instruction takes.
#[inline]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain vectors; every bit pattern is a valid value of either.
    unsafe { core::mem::transmute::<__m512i, __m512bh>(v) }
}
