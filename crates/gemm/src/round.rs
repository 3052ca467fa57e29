//! f32 → bf16 for [`crate::Out::Bf16`], vectorised: `half::bf16::from_f32` branches on NaN,
//! which keeps the compiler from vectorising a loop over it, and the scalar loop cost as much as
//! the product itself for a 1024 × 256 · 256 × 256 product.

use crate::bf16;

/// The bits of the bf16 nearest to `x`, ties to even (subnormals and overflow to infinity
/// included); NaN stays NaN, quieted. Equal to `bf16::from_f32(x).to_bits()` for every f32 (the
/// same rule as `half`), without branches.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    // Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the dropped
    // half is above one half, or equal to it with an odd kept half. No overflow: the largest
    // non-NaN pattern (-inf, 0xff80_0000) stays below 2³² - 0x8000.
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    let is_nan = bits & 0x7fff_ffff > 0x7f80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

/// `dst[i] = bf16(src[i])`, rounded as [`bf16_bits`]; `wide` (on CPUs with AVX512F/BW only) runs
/// the loop 16 lanes wide.
pub(crate) fn to_bf16(wide: bool, dst: &mut [bf16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is only set when the CPU has AVX512F and AVX512BW.
        return unsafe { to_bf16_avx512(dst, src) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    convert(dst, src);
}

#[inline(always)]
fn convert(dst: &mut [bf16], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(bf16_bits(*s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn to_bf16_avx512(dst: &mut [bf16], src: &[f32]) {
    convert(dst, src);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class of f32: ties both ways, subnormals, the overflow edge, infinities, NaNs, and a
    /// sweep of patterns (the full 2³² sweep was run once, outside the test suite).
    #[test]
    fn matches_half() {
        let mut cases: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0000_8001,
            0x0001_8000,
            0x007f_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x7f7f_ffff,
            0x7f7f_8000,
            0x7f7f_7fff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0xff7f_ffff,
        ];
        cases.extend((0..1u32 << 20).map(|i| i.wrapping_mul(0x9e37_79b9) ^ (i >> 3)));
        let src: Vec<f32> = cases.iter().map(|&b| f32::from_bits(b)).collect();
        for wide in [false, crate::detect::avx512_bf16()] {
            let mut dst = vec![bf16::ZERO; src.len()];
            to_bf16(wide, &mut dst, &src);
            for (x, got) in src.iter().zip(&dst) {
                let want = bf16::from_f32(*x).to_bits();
                assert_eq!(got.to_bits(), want, "{:#010x} (wide: {wide})", x.to_bits());
            }
        }
    }
}
