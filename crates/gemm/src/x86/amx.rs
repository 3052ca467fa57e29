//! The AMX kernel: a 32 × 32 block of C in four 16 × 16 f32 tiles.
//!
//! All eight tile registers are used: tmm0..tmm3 hold C (2 × 2 tiles), tmm4/tmm5 the two A tiles
//! (rows 0..16 and 16..32, 32 k each) and tmm6/tmm7 the two B tiles (columns 0..16 and 16..32,
//! VNNI). Each k-tile is 4 loads and 4 `tdpbf16ps`, every loaded tile used twice. The AMX
//! intrinsics are unstable in Rust, so this is `asm!`; the whole loop is one `asm!` block, so no
//! tile register lives across compiler-generated code.
//!
//! With its operands in L1 this runs at ~2.6 TFLOP/s on one core of the test machine (87% of
//! `tdpbf16ps`'s peak); whole products, packing included, get 0.65–0.97 TFLOP/s per core, bound
//! by streaming A and B from L2/L3 and by writing C. Tried and measured no better: reading a
//! row-major A in place with `tileloadd`'s stride instead of packing it (~10% slower: 16 rows
//! 0.5–2 KiB apart conflict in the caches, packed tiles are 1 KiB contiguous), software prefetch
//! of the next A tiles (no change), `prefetchw` of C before the loop (~8% slower), and storing C
//! through an L1 buffer (+5% at K = 256, −8% at 1024³).

use core::arch::asm;
use std::marker::PhantomData;

use crate::pack::Tile;

/// The 64-byte `ldtilecfg` operand: palette 1, tiles 0..8 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut cfg = [0u8; 64];
    cfg[0] = 1; // palette 1
    let mut t = 0;
    while t < 8 {
        cfg[16 + 2 * t] = 64; // bytes per row (u16, little endian)
        cfg[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(cfg)
};

/// This thread's tile configuration, loaded on creation and released (`tilerelease`) on drop.
/// Tile state is per thread, so every worker holds its own; it cannot move to another thread.
pub(crate) struct Tiles {
    _this_thread: PhantomData<*const ()>,
}

impl Tiles {
    /// Configures the tiles; `None` when AMX is not available (no CPU support or no permission).
    pub(crate) fn configure() -> Option<Tiles> {
        if !crate::detect::available().contains(&crate::Isa::Amx) {
            return None;
        }
        let cfg = &CONFIG;
        // SAFETY: AMX is present and Linux granted this process the tile state (checked above);
        // `cfg` is a valid 64-byte palette-1 configuration that ldtilecfg only reads.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Some(Tiles {
            _this_thread: PhantomData,
        })
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by this thread (a `Tiles` never leaves it);
        // tilerelease returns them to the init state and touches no memory.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// C\[32×32\] = (load ? C : 0) + A·B over the k-tiles of `a` and `b`.
///
/// `a` and `b` are the same k range of an A strip and a B strip (two tiles per k-tile, see
/// [`crate::pack`]); C's rows are `ldc` bytes apart.
///
/// # Safety
/// The calling thread holds a [`Tiles`]; `c` points to 32 rows of 32 writable f32, `ldc` bytes
/// apart, that nothing else touches during the call.
pub(crate) unsafe fn block(
    _tiles: &Tiles,
    a: &[Tile],
    b: &[Tile],
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    let ktiles = a.len() / 2;
    assert!(
        ktiles > 0 && b.len() == a.len(),
        "a block needs matching, non-empty k ranges"
    );
    // SAFETY: the tiles are configured (the `Tiles` borrow). The A and B loads read 2 * ktiles
    // whole tiles from each slice (the pointers advance 2 KiB per k-tile, `n` counts them). The
    // C loads and stores touch 32 rows × 128 bytes from `c`, `ldc` apart: ours by the contract.
    unsafe {
        asm!(
            "test {load}, {load}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {ldc}]",
            "tileloadd tmm1, [{c0} + {ldc} + 64]",
            "tileloadd tmm2, [{c1} + {ldc}]",
            "tileloadd tmm3, [{c1} + {ldc} + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "3:",
            "tileloadd tmm4, [{a} + {s64}]",
            "tileloadd tmm6, [{b} + {s64}]",
            "tileloadd tmm5, [{a} + {s64} + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {s64} + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 3b",
            "tilestored [{c0} + {ldc}], tmm0",
            "tilestored [{c0} + {ldc} + 64], tmm1",
            "tilestored [{c1} + {ldc}], tmm2",
            "tilestored [{c1} + {ldc} + 64], tmm3",
            load = in(reg) usize::from(load),
            a = inout(reg) a.as_ptr() => _,
            b = inout(reg) b.as_ptr() => _,
            n = inout(reg) ktiles => _,
            c0 = in(reg) c,
            c1 = in(reg) c.wrapping_byte_add(16 * ldc),
            ldc = in(reg) ldc,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}
