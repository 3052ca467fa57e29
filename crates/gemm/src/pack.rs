//! Packing A and B into the tile layout every kernel reads.
//!
//! Both operands are cut into *strips* of 32 rows (A) or 32 columns (B), and each strip into
//! *k-tiles* of 32 values of k; K is padded with zeros to a multiple of 32, and the last strip's
//! missing rows/columns are zeros too, so the kernels never see a ragged edge. A k-tile is two
//! 1 KiB [`Tile`]s, the AMX register size (16 rows of 64 bytes):
//!
//! * A, tile t ∈ {0, 1} of k-tile `kt` of strip `s`: `tile[r * 32 + kk] = A(32 s + 16 t + r, 32 kt
//!   + kk)`: 16 rows of A, 32 consecutive k each (what `tileloadd` wants for `tdpbf16ps`'s A).
//! * B, the "VNNI" layout: `tile[p * 32 + 2 j + e] = B(32 kt + 2 p + e, 32 s + 16 t + j)`: row p
//!   holds the k-pair (2p, 2p + 1) of 16 consecutive columns, interleaved.
//!
//! The tiles of a strip are contiguous, k-tile after k-tile, so a kernel streams through a strip
//! with unit stride. The portable path reads the same layout, so every path shares the packing.

use std::sync::Mutex;

use crate::{MatRef, bf16};

/// Rows of A (or columns of B) in a strip.
pub(crate) const STRIP: usize = 32;
/// Values of k in a k-tile.
pub(crate) const KTILE: usize = 32;

/// One AMX tile: 16 rows of 64 bytes (32 bf16 bits), aligned to a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Tile(pub(crate) [u16; 512]);

impl Tile {
    pub(crate) const ZERO: Tile = Tile([0; 512]);
}

/// An operand in the tile layout: `strips` strips of `ktiles` k-tiles, two tiles each. Its space
/// comes from, and goes back to, a small pool.
pub(crate) struct Packed {
    tiles: Vec<Tile>,
    ktiles: usize,
}

/// Packing space kept between products. Allocations of megabytes come from the OS as fresh
/// pages, and their page faults (and zeroing) cost a fifth of a 1024³ product; reused space
/// costs nothing. Packing overwrites every tile, so stale contents never show.
static POOL: Mutex<Vec<Vec<Tile>>> = Mutex::new(Vec::new());
/// The pool keeps at most this many buffers (two per product in flight)…
const POOL_BUFFERS: usize = 4;
/// … of at most this many tiles each (64 MiB): bigger products pay their page faults, which
/// their compute time dwarfs.
const POOL_MAX_TILES: usize = 64 << 10;

impl Packed {
    /// Space for `strips` strips of `ktiles` k-tiles (contents unspecified until packed);
    /// `None` when it cannot be had.
    pub(crate) fn alloc(strips: usize, ktiles: usize) -> Option<Packed> {
        let len = strips.checked_mul(ktiles)?.checked_mul(2)?;
        let mut tiles = take_from_pool(len).unwrap_or_default();
        if tiles.capacity() < len {
            tiles.clear();
            tiles.try_reserve_exact(len).ok()?;
        }
        tiles.resize(len, Tile::ZERO);
        Some(Packed { tiles, ktiles })
    }

    /// K-tiles per strip.
    pub(crate) fn ktiles(&self) -> usize {
        self.ktiles
    }

    /// The tiles of strip `s`: `2 * ktiles` of them, k-tile after k-tile.
    pub(crate) fn strip(&self, s: usize) -> &[Tile] {
        let len = 2 * self.ktiles;
        &self.tiles[s * len..(s + 1) * len]
    }

    /// The strips cut into at most `parts` runs of whole strips, to fill in parallel: each run
    /// as (its first strip, its tiles).
    pub(crate) fn runs_mut(&mut self, parts: usize) -> Vec<(usize, &mut [Tile])> {
        let per_strip = (2 * self.ktiles).max(1);
        let strips = self.tiles.len() / per_strip;
        let per_run = strips.div_ceil(parts.max(1)).max(1);
        self.tiles
            .chunks_mut(per_run * per_strip)
            .enumerate()
            .map(|(r, tiles)| (r * per_run, tiles))
            .collect()
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        let tiles = std::mem::take(&mut self.tiles);
        if tiles.capacity() == 0 || tiles.capacity() > POOL_MAX_TILES {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pool.push(tiles);
        if pool.len() > POOL_BUFFERS {
            // Drop the smallest: the big ones are the expensive ones to fault in again.
            let smallest = (0..pool.len())
                .min_by_key(|&i| pool[i].capacity())
                .unwrap_or(0);
            pool.swap_remove(smallest);
        }
    }
}

/// The smallest pooled buffer that holds `len` tiles, else the biggest one (to grow).
fn take_from_pool(len: usize) -> Option<Vec<Tile>> {
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fits = (0..pool.len())
        .filter(|&i| pool[i].capacity() >= len)
        .min_by_key(|&i| pool[i].capacity());
    let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()))?;
    Some(pool.swap_remove(pick))
}

/// How to fill a strip: with plain loops, or with AVX512 shuffles for the common layouts (and
/// the plain loops at the edges).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packer {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Packer {
    /// The AVX512 packers for the paths that imply AVX512F/BW, plain loops for the portable one
    /// (so that forcing it also tests the plain loops).
    pub(crate) fn for_isa(isa: crate::Isa) -> Packer {
        match isa {
            crate::Isa::Portable => Packer::Scalar,
            #[cfg(target_arch = "x86_64")]
            crate::Isa::Amx | crate::Isa::Avx512Bf16 => Packer::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            crate::Isa::Amx | crate::Isa::Avx512Bf16 => {
                unreachable!("only x86-64 detects {isa:?}")
            }
        }
    }
}

/// Fills strips `first..` of packed A from A; `out` holds whole strips (`2 * ktiles` tiles each).
pub(crate) fn pack_a(
    packer: Packer,
    a: &MatRef<bf16>,
    first: usize,
    ktiles: usize,
    out: &mut [Tile],
) {
    let order = Order::along(a.row_stride, a.col_stride);
    for_each_block(order, first, ktiles, out, |s, kt, pair| {
        let (i0, k0) = (s * STRIP, kt * KTILE);
        let done = match packer {
            Packer::Scalar => false,
            #[cfg(target_arch = "x86_64")]
            Packer::Avx512 => crate::x86::pack::a_block(a, i0, k0, pair),
        };
        if !done {
            a_block(a, i0, k0, pair);
        }
    });
}

/// Fills strips `first..` of packed B from B; `out` holds whole strips (`2 * ktiles` tiles each).
pub(crate) fn pack_b(
    packer: Packer,
    b: &MatRef<bf16>,
    first: usize,
    ktiles: usize,
    out: &mut [Tile],
) {
    let order = Order::along(b.col_stride, b.row_stride);
    for_each_block(order, first, ktiles, out, |s, kt, pair| {
        let (j0, k0) = (s * STRIP, kt * KTILE);
        let done = match packer {
            Packer::Scalar => false,
            #[cfg(target_arch = "x86_64")]
            Packer::Avx512 => crate::x86::pack::b_block(b, k0, j0, pair),
        };
        if !done {
            b_block(b, k0, j0, pair);
        }
    });
}

/// The order to visit an operand's blocks in, so that consecutive blocks are neighbours in the
/// source and reads sweep it in memory order (which the prefetchers follow). In the other order
/// each of a block's 32 source rows starts a row stride past the last, on a new cache line
/// every time: one demand miss per row (measured: B's packing took twice as long).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Strip by strip, k-tile after k-tile: when k is the source's contiguous direction.
    StripMajor,
    /// K-tile by k-tile, across the strips: when the strip direction is contiguous.
    KtileMajor,
}

impl Order {
    /// From the source's stride along a strip's rows/columns (i for A, j for B) and along k.
    fn along(strip_stride: usize, k_stride: usize) -> Order {
        if strip_stride < k_stride {
            Order::KtileMajor
        } else {
            Order::StripMajor
        }
    }
}

/// Calls `fill(strip, ktile, its two tiles)` for every block of the strips in `out` (numbered
/// from `first`), in `order`.
fn for_each_block(
    order: Order,
    first: usize,
    ktiles: usize,
    out: &mut [Tile],
    mut fill: impl FnMut(usize, usize, &mut [Tile]),
) {
    if ktiles == 0 {
        return;
    }
    let strips = out.len() / (2 * ktiles);
    let mut visit = |s: usize, kt: usize| {
        let at = (s * ktiles + kt) * 2;
        fill(first + s, kt, &mut out[at..at + 2]);
    };
    match order {
        Order::StripMajor => (0..strips).for_each(|s| (0..ktiles).for_each(|kt| visit(s, kt))),
        Order::KtileMajor => (0..ktiles).for_each(|kt| (0..strips).for_each(|s| visit(s, kt))),
    }
}

/// The two A tiles of rows `i0..i0 + 32`, k `k0..k0 + 32`, zero outside A.
fn a_block(a: &MatRef<bf16>, i0: usize, k0: usize, pair: &mut [Tile]) {
    let kn = a.cols.saturating_sub(k0).min(KTILE);
    for (t, tile) in pair.iter_mut().enumerate() {
        for (r, row) in tile.0.chunks_exact_mut(KTILE).enumerate() {
            let i = i0 + 16 * t + r;
            row.fill(0);
            if i >= a.rows || kn == 0 {
                continue;
            }
            // In range, so the offsets cannot overflow (validated against the slice length).
            let base = i * a.row_stride + k0 * a.col_stride;
            if a.col_stride == 1 {
                for (dst, src) in row.iter_mut().zip(&a.data[base..base + kn]) {
                    *dst = src.to_bits();
                }
            } else {
                for (kk, dst) in row[..kn].iter_mut().enumerate() {
                    *dst = a.data[base + kk * a.col_stride].to_bits();
                }
            }
        }
    }
}

/// The two B tiles (VNNI layout) of k `k0..k0 + 32`, columns `j0..j0 + 32`, zero outside B.
fn b_block(b: &MatRef<bf16>, k0: usize, j0: usize, pair: &mut [Tile]) {
    let kn = b.rows.saturating_sub(k0).min(KTILE);
    for (t, tile) in pair.iter_mut().enumerate() {
        tile.0.fill(0);
        let jt = j0 + 16 * t;
        let jn = b.cols.saturating_sub(jt).min(16);
        if jn == 0 {
            continue;
        }
        for kk in 0..kn {
            let base = (k0 + kk) * b.row_stride + jt * b.col_stride;
            let (p, e) = (kk / 2, kk % 2);
            for j in 0..jn {
                tile.0[p * 32 + 2 * j + e] = b.data[base + j * b.col_stride].to_bits();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small matrix whose element (i, j) encodes its position, as bf16 bits.
    fn numbered(rows: usize, cols: usize) -> Vec<bf16> {
        (0..rows * cols)
            .map(|v| bf16::from_bits(v as u16 + 1))
            .collect()
    }

    #[test]
    fn scalar_layouts_match_the_definition() {
        let (m, k) = (40, 45);
        let data = numbered(m, k);
        let a = MatRef::row_major(&data, m, k);
        let ktiles = k.div_ceil(KTILE);
        let mut out = vec![Tile::ZERO; 2 * ktiles];
        pack_a(Packer::Scalar, &a, 1, ktiles, &mut out);
        for kt in 0..ktiles {
            for t in 0..2 {
                for r in 0..16 {
                    for kk in 0..32 {
                        let (i, kx) = (32 + 16 * t + r, 32 * kt + kk);
                        let want = if i < m && kx < k {
                            data[i * k + kx].to_bits()
                        } else {
                            0
                        };
                        assert_eq!(out[2 * kt + t].0[r * 32 + kk], want, "A({i}, {kx})");
                    }
                }
            }
        }
        // The same data as B (k × n = 40 × 45).
        let b = MatRef::row_major(&data, m, k);
        let ktiles = m.div_ceil(KTILE);
        let mut out = vec![Tile::ZERO; 2 * ktiles];
        pack_b(Packer::Scalar, &b, 1, ktiles, &mut out);
        for kt in 0..ktiles {
            for t in 0..2 {
                for p in 0..16 {
                    for j in 0..16 {
                        for e in 0..2 {
                            let (kx, jx) = (32 * kt + 2 * p + e, 32 + 16 * t + j);
                            let want = if kx < m && jx < k {
                                data[kx * k + jx].to_bits()
                            } else {
                                0
                            };
                            let got = out[2 * kt + t].0[p * 32 + 2 * j + e];
                            assert_eq!(got, want, "B({kx}, {jx})");
                        }
                    }
                }
            }
        }
    }

    /// The AVX512 packers (full blocks) equal the scalar ones, in every layout they speed up.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_packers_equal_scalar() {
        if !crate::detect::avx512_bf16() {
            return;
        }
        let (r, c) = (70, 100);
        let data = numbered(r, c);
        let row_major = MatRef::row_major(&data, r, c);
        let sub = MatRef {
            data: &data[3..],
            rows: 64,
            cols: 64,
            row_stride: c,
            col_stride: 1,
        };
        for m in [row_major, row_major.t(), sub, sub.t()] {
            let ktiles = m.cols.div_ceil(KTILE);
            for s in 0..m.rows.div_ceil(STRIP) {
                let mut want = vec![Tile::ZERO; 2 * ktiles];
                let mut got = vec![Tile::ZERO; 2 * ktiles];
                pack_a(Packer::Scalar, &m, s, ktiles, &mut want);
                pack_a(Packer::Avx512, &m, s, ktiles, &mut got);
                assert!(
                    want.iter().zip(&got).all(|(w, g)| w.0 == g.0),
                    "A strip {s}"
                );
            }
            let ktiles = m.rows.div_ceil(KTILE);
            for s in 0..m.cols.div_ceil(STRIP) {
                let mut want = vec![Tile::ZERO; 2 * ktiles];
                let mut got = vec![Tile::ZERO; 2 * ktiles];
                pack_b(Packer::Scalar, &m, s, ktiles, &mut want);
                pack_b(Packer::Avx512, &m, s, ktiles, &mut got);
                assert!(
                    want.iter().zip(&got).all(|(w, g)| w.0 == g.0),
                    "B strip {s}"
                );
            }
        }
    }
}
