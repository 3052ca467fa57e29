//! Element types the kernels read and write, the f32 math they share, and the choice of
//! instruction set.
//!
//! Every kernel computes in f32 and reads or writes its tensors in their own dtype (f32, bf16 or
//! f16), converting one element at a time, so a bf16 tensor is never widened into a temporary
//! copy. The loops are written as plain scalar code without branches (selects only) and compiled
//! twice: once for the baseline x86-64 target and once with AVX-512 enabled, chosen at run time
//! ([`kernel!`]); LLVM vectorises the second to 16 lanes.

use burn::tensor::DType;
use half::{bf16, f16};

/// A float element a kernel can read and write.
pub(crate) trait Elem:
    burn::tensor::Element + bytemuck::Pod + Send + Sync + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    /// Round to nearest even, as `half` and torch do, written without branches so that it
    /// vectorises; NaN stays NaN (quiet).
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let bits = v.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let nan = (bits >> 16) | 0x40;
        bf16::from_bits(if v.is_nan() { nan } else { rounded } as u16)
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `e^x` in f32 within 2 ulp over the whole range, without branches: Cephes' `expf` (range
/// reduction by `ln 2` in two parts, a degree-6 polynomial, the exponent put in by bits). Inputs
/// below `ln(f32::MIN_POSITIVE)` give exactly 0, as the libm `exp` underflows there too, so a
/// masked score (`f32::MIN`) has probability 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const HI: f32 = 88.376_26;
    const LO: f32 = -87.336_55;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let kr = xc * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // `kr`'s low mantissa bits hold the integer `k` (|k| ≤ 127 ≪ 2²²), so the exponent `k + 127`
    // comes from integer arithmetic on the bits: no float-to-int conversion, which LLVM would
    // not vectorise (Rust's `as` saturates and maps NaN to 0).
    let biased = (kr.to_bits() as i32)
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127);
    let scale = f32::from_bits((biased << 23) as u32);
    if x < LO { 0.0 } else { y * scale }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Partial sums kept side by side in [`sum_by`] and [`max_by`]: one AVX-512 register of f32.
const LANES: usize = 16;

/// `Σ f(xᵢ)` in 16 interleaved partial sums added in a fixed order at the end. A plain loop
/// `s += f(x)` is a chain LLVM may not reorder (IEEE addition is not associative), so it would
/// never vectorise; this order is as deterministic and vectorises to one register.
#[inline(always)]
pub(crate) fn sum_by<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        acc[i] += f(x);
    }
    fold(acc)
}

/// `Σ f(aᵢ, bᵢ)` over two slices of the same length, as [`sum_by`].
#[inline(always)]
pub(crate) fn sum2_by<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    for (i, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += f(x, y);
    }
    fold(acc)
}

/// `Σ f(aᵢ, bᵢ, cᵢ)` over three slices of the same length, as [`sum_by`].
#[inline(always)]
pub(crate) fn sum3_by<A: Copy, B: Copy, C: Copy>(
    a: &[A],
    b: &[B],
    c: &[C],
    f: impl Fn(A, B, C) -> f32,
) -> f32 {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i], z[i]);
        }
    }
    for (i, ((&x, &y), &z)) in ra.iter().zip(rb).zip(rc).enumerate() {
        acc[i] += f(x, y, z);
    }
    fold(acc)
}

/// `max f(xᵢ)` (`f32::MIN` for an empty slice), vectorised as [`sum_by`].
#[inline(always)]
pub(crate) fn max_by<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [f32::MIN; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let v = f(c[i]);
            acc[i] = if v > acc[i] { v } else { acc[i] };
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        let v = f(x);
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    acc.iter().fold(f32::MIN, |m, &v| if v > m { v } else { m })
}

/// The partial sums added pairwise in a fixed order.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Which build of the kernels this CPU runs: 2 for AVX-512 (F, BW, VL, DQ, with FMA), 1 for
/// AVX2 with FMA, 0 for the baseline.
pub(crate) fn simd_level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let fma = has!("fma") && has!("avx2") && has!("bmi2") && has!("f16c");
            if fma && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                2
            } else if fma {
                1
            } else {
                0
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            0
        }
    })
}

/// Defines a kernel function whose body is compiled three times, for AVX-512, for AVX2 + FMA and
/// for the baseline target, and picks one per call from what the CPU has. Everything the body
/// calls must be `#[inline(always)]` to be compiled with the wider instruction set. The function
/// may have one element type parameter. `f32::mul_add` is a single instruction in the first two
/// (and a library call only on x86-64 CPUs older than 2013, which have neither).
macro_rules! kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$E:ident>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name $(<$E: $crate::cpu::elem::Elem>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$E: $crate::cpu::elem::Elem>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,bmi2,f16c")]
            unsafe fn wide $(<$E: $crate::cpu::elem::Elem>)? ($($arg: $ty),*) $(-> $ret)? {
                body $(::<$E>)? ($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,bmi2,f16c")]
            unsafe fn mid $(<$E: $crate::cpu::elem::Elem>)? ($($arg: $ty),*) $(-> $ret)? {
                body $(::<$E>)? ($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            match $crate::cpu::elem::simd_level() {
                // SAFETY: `simd_level` checked that the CPU has every feature the build enables.
                2 => return unsafe { wide $(::<$E>)? ($($arg),*) },
                // SAFETY: as above.
                1 => return unsafe { mid $(::<$E>)? ($($arg),*) },
                _ => {}
            }
            body $(::<$E>)? ($($arg),*)
        }
    };
}
pub(crate) use kernel;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for bits in (0..u32::MAX).step_by(65_521) {
            let v = f32::from_bits(bits);
            let ours = <bf16 as Elem>::from_f32(v);
            let theirs = bf16::from_f32(v);
            if v.is_nan() {
                assert!(ours.is_nan());
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{v:e}");
            }
        }
    }
}
