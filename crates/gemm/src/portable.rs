//! The portable kernel: the packed tiles converted to f32 and multiplied with plain loops (which
//! the compiler vectorises for whatever the target has).

use crate::pack::Tile;

/// bf16 bits → f32: a bf16 is the top half of an f32.
#[inline]
fn f32_of(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// C\[32×32\] = (load ? C : 0) + A·B over the k-tiles of `a` and `b`, in the tile layout of
/// [`crate::pack`]; C's rows are `ldc` bytes apart.
///
/// # Safety
/// `c` points to 32 rows of 32 writable f32, `ldc` bytes apart, that nothing else touches during
/// the call.
pub(crate) unsafe fn block(a: &[Tile], b: &[Tile], c: *mut f32, ldc: usize, load: bool) {
    assert!(
        b.len() == a.len() && a.len().is_multiple_of(2),
        "a block needs matching k ranges"
    );
    let mut acc = [[0f32; 32]; 32];
    if load {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r of C: 32 f32 (by the contract), not written by anyone else now.
            let row = unsafe { std::slice::from_raw_parts(c.wrapping_byte_add(r * ldc), 32) };
            acc.copy_from_slice(row);
        }
    }
    for (at, bt) in a.chunks_exact(2).zip(b.chunks_exact(2)) {
        for p in 0..16 {
            // B rows 2p and 2p + 1 of this k-tile, 32 columns, from VNNI row p of both tiles.
            let (mut even, mut odd) = ([0f32; 32], [0f32; 32]);
            for (t, tile) in bt.iter().enumerate() {
                let vnni = &tile.0[p * 32..p * 32 + 32];
                for j in 0..16 {
                    even[16 * t + j] = f32_of(vnni[2 * j]);
                    odd[16 * t + j] = f32_of(vnni[2 * j + 1]);
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = &at[r / 16].0[(r % 16) * 32..];
                let (a0, a1) = (f32_of(row[2 * p]), f32_of(row[2 * p + 1]));
                for ((c, e), o) in acc.iter_mut().zip(&even).zip(&odd) {
                    *c += a0 * e + a1 * o;
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r of C: 32 writable f32 (by the contract), ours alone during the call.
        let row = unsafe { std::slice::from_raw_parts_mut(c.wrapping_byte_add(r * ldc), 32) };
        row.copy_from_slice(acc);
    }
}
