//! Kernels over flat buffers: dtype casts and the fused unscale + inf/nan check.
//!
//! All of them are single passes without allocation. On x86-64 with AVX2 (checked at run time)
//! f16 uses F16C directly and bf16 / the unscale use the portable loops compiled for AVX2;
//! elsewhere f16 falls back to `half`'s slice conversion and bf16 to a branchless
//! round-to-nearest-even loop (half's bf16 slice path is a scalar loop with branches).

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::error::{Result, check_len};

/// Elements per chunk of the fused unscale: small enough to stay in L1, large enough to vectorise.
const CHUNK: usize = 4096;

const EXP_MASK: u32 = 0x7F80_0000;

/// Elements per task of the parallel passes over large buffers ([`par_new`], [`par_zip`]).
const PAR_CHUNK: usize = 1 << 16;

/// A new vector of `src.len()` elements, `f(src_chunk, dst_chunk)` filling each chunk, the
/// chunks on the rank's threads when the buffer is large (a copy or cast of a whole parameter
/// is otherwise one core's memory bandwidth). Each chunk is zeroed just before `f` writes it,
/// by the same thread, so no serial pass over the new vector comes first.
pub(crate) fn par_new<S: Sync, D: Copy + Default + Send + Sync>(
    src: &[S],
    f: impl Fn(&[S], &mut [D]) -> Result<()> + Sync + Send,
) -> Result<Vec<D>> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let n = src.len();
    if n < 2 * PAR_CHUNK {
        let mut out = vec![D::default(); n];
        f(src, &mut out)?;
        return Ok(out);
    }
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .try_for_each(|(d, s)| {
            d.fill(MaybeUninit::new(D::default()));
            // SAFETY: every element of `d` was just written; MaybeUninit<D> has D's layout.
            let d = unsafe { &mut *(d as *mut [MaybeUninit<D>] as *mut [D]) };
            f(s, d)
        })?;
    // SAFETY: the chunks cover all `n` elements, each initialised above.
    unsafe { out.set_len(n) };
    Ok(out)
}

/// `f(dst_chunk, src_chunk)` over matching chunks of `dst` and `src` (the same length), on the
/// rank's threads when they are large.
pub(crate) fn par_zip<S: Sync, D: Send>(
    dst: &mut [D],
    src: &[S],
    f: impl Fn(&mut [D], &[S]) -> Result<()> + Sync + Send,
) -> Result<()> {
    use rayon::prelude::*;
    check_len("destination", src.len(), dst.len())?;
    if dst.len() < 2 * PAR_CHUNK {
        return f(dst, src);
    }
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .try_for_each(|(d, s)| f(d, s))
}

/// Converts f32 to f16 (round to nearest, ties to even; overflow to ±inf; gradual underflow).
///
/// # Shapes
/// `src` and `dst` have the same length.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> Result<()> {
    check_len("f16 destination", src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C, checked just above.
        unsafe { x86::f32_to_f16_f16c(src, dst) };
        return Ok(());
    }
    dst.convert_from_f32_slice(src);
    Ok(())
}

/// Converts f16 to f32 (exact).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) -> Result<()> {
    check_len("f32 destination", src.len(), dst.len())?;
    src.convert_to_f32_slice(dst);
    Ok(())
}

/// Converts f32 to bf16 (round to nearest, ties to even; NaN stays NaN), like torch's `.bfloat16()`.
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) -> Result<()> {
    check_len("bf16 destination", src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { x86::f32_to_bf16_avx2(src, dst) };
        return Ok(());
    }
    f32_to_bf16_loop(src, dst);
    Ok(())
}

/// The portable loop; the AVX2 variant is the same code compiled with AVX2 enabled (baseline
/// x86-64 has no cheap u32 -> u16 narrowing, so the plain build runs 3x slower than memcpy).
#[inline(always)]
fn f32_to_bf16_loop(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(f32_to_bf16_bits(*s));
    }
}

/// Converts bf16 to f32 (exact: a 16-bit shift).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) -> Result<()> {
    check_len("f32 destination", src.len(), dst.len())?;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
    Ok(())
}

/// Branchless f32 -> bf16 bits with round to nearest even; a NaN keeps its sign and becomes quiet.
#[inline(always)]
fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    let is_nan = (b & 0x7FFF_FFFF) > EXP_MASK;
    (if is_nan { nan } else { rounded }) as u16
}

/// Multiplies every element by `inv_scale` in place and says whether any element was inf or NaN
/// before the multiply (torch's `_amp_foreach_non_finite_check_and_unscale_`).
///
/// Single pass, chunked, no allocation. The multiply happens even when a non-finite value is
/// found, like torch; the caller skips the optimizer step then.
pub fn unscale_and_check(buf: &mut [f32], inv_scale: f32) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { x86::unscale_and_check_avx2(buf, inv_scale) };
    }
    unscale_and_check_loop(buf, inv_scale)
}

#[inline(always)]
fn unscale_and_check_loop(buf: &mut [f32], inv_scale: f32) -> bool {
    let mut bad = 0u32;
    for chunk in buf.chunks_mut(CHUNK) {
        let mut acc = 0u32;
        for x in chunk.iter_mut() {
            let v = *x;
            acc |= u32::from((v.to_bits() & EXP_MASK) == EXP_MASK);
            *x = v * inv_scale;
        }
        bad |= acc;
    }
    bad != 0
}

/// Says whether any element is inf or NaN.
pub fn has_non_finite(buf: &[f32]) -> bool {
    let mut bad = 0u32;
    for chunk in buf.chunks(CHUNK) {
        let mut acc = 0u32;
        for x in chunk {
            acc |= u32::from((x.to_bits() & EXP_MASK) == EXP_MASK);
        }
        bad |= acc;
    }
    bad != 0
}

/// `Σ x²` of one block in f64, over 8 lanes (element `i` into lane `i mod 8`) added at the
/// end: the same value on every CPU, compiled for AVX2 where the CPU has it.
pub fn sum_of_squares(block: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { x86::sum_of_squares_avx2(block) };
    }
    sum_of_squares_loop(block)
}

#[inline(always)]
fn sum_of_squares_loop(block: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let lanes = block.chunks_exact(8);
    let rest = lanes.remainder();
    for c in lanes {
        for i in 0..8 {
            acc[i] += f64::from(c[i]) * f64::from(c[i]);
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        acc[i] += f64::from(x) * f64::from(x);
    }
    acc.iter().sum::<f64>()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};

    /// [`super::sum_of_squares_loop`] compiled with AVX2 (no FMA: the same roundings as the
    /// portable loop).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_of_squares_avx2(block: &[f32]) -> f64 {
        super::sum_of_squares_loop(block)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn f32_to_bf16_avx2(src: &[f32], dst: &mut [bf16]) {
        super::f32_to_bf16_loop(src, dst)
    }

    /// F16C in a tight loop: `half` converts 8 at a time too, but through a call per chunk,
    /// which runs 2.7x slower than memcpy on a cache-resident buffer.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) {
        use std::arch::x86_64::{__m128i, _mm_storeu_si128, _mm256_cvtps_ph, _mm256_loadu_ps};
        let mut s = src.chunks_exact(8);
        let mut d = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s).zip(&mut d) {
            // SAFETY: `s` has 8 f32 (32 bytes) and `d` 8 f16 (16 bytes); both ops are unaligned.
            unsafe {
                let v = _mm256_loadu_ps(s.as_ptr());
                // imm 0: round to nearest even, like torch's `.half()`.
                let h = _mm256_cvtps_ph::<0>(v);
                _mm_storeu_si128(d.as_mut_ptr().cast::<__m128i>(), h);
            }
        }
        for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
            *d = f16::from_f32(*s);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn unscale_and_check_avx2(buf: &mut [f32], inv_scale: f32) -> bool {
        super::unscale_and_check_loop(buf, inv_scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_matches_half_on_special_values() {
        let xs = [
            0.0f32,
            -0.0,
            1.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.0e38,
        ];
        let mut ours = vec![bf16::ZERO; xs.len()];
        f32_to_bf16(&xs, &mut ours).unwrap();
        for (x, o) in xs.iter().zip(&ours) {
            assert_eq!(o.to_bits(), bf16::from_f32(*x).to_bits(), "x = {x:e}");
        }
        let mut nan = [bf16::ZERO];
        f32_to_bf16(&[f32::NAN], &mut nan).unwrap();
        assert!(nan[0].is_nan());
    }

    #[test]
    fn unscale_flags_inf_and_nan_and_still_multiplies() {
        let mut v = vec![2.0f32; 10_000];
        assert!(!unscale_and_check(&mut v, 0.5));
        assert!(v.iter().all(|&x| x == 1.0));
        v[9_999] = f32::NAN;
        assert!(unscale_and_check(&mut v, 0.5));
        v[9_999] = f32::NEG_INFINITY;
        assert!(unscale_and_check(&mut v, 0.5));
        assert!(has_non_finite(&v));
        assert_eq!(v[0], 0.25);
    }

    #[test]
    fn portable_and_dispatched_paths_agree() {
        let xs: Vec<f32> = (0..10_000)
            .map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761)))
            .collect();
        let mut a = vec![bf16::ZERO; xs.len()];
        let mut b = vec![bf16::ZERO; xs.len()];
        f32_to_bf16(&xs, &mut a).unwrap();
        f32_to_bf16_loop(&xs, &mut b);
        for (x, (a, b)) in xs.iter().zip(a.iter().zip(&b)) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{x:e}"
            );
            assert!(
                a.is_nan() || a.to_bits() == bf16::from_f32(*x).to_bits(),
                "{x:e}"
            );
        }
        let mut h = vec![f16::ZERO; xs.len()];
        f32_to_f16(&xs, &mut h).unwrap();
        for (x, h) in xs.iter().zip(&h) {
            let want = f16::from_f32(*x);
            assert!(
                h.to_bits() == want.to_bits() || (h.is_nan() && want.is_nan()),
                "{x:e}"
            );
        }
        let mut u = xs.clone();
        let mut v = xs.clone();
        assert_eq!(
            unscale_and_check(&mut u, 0.25),
            unscale_and_check_loop(&mut v, 0.25)
        );
        let same = u
            .iter()
            .zip(&v)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut d = [f16::ZERO; 2];
        assert!(f32_to_f16(&[1.0], &mut d).is_err());
    }
}
