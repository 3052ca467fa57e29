//! The deterministic draws of the data: a 64-bit hash, a uniform index, a shuffle.

use kiln_models::SplitMix64;

/// The salt of every per-epoch (and held-out) shuffle.
pub(super) const SHUFFLE_SALT: u64 = 0x7368_7566_0000_0004;

/// splitmix64's output function: a well-mixed 64-bit hash of `x` (the first output of
/// [`SplitMix64`] seeded with `x`).
pub fn splitmix64(x: u64) -> u64 {
    SplitMix64::at(x, 0)
}

/// A uniform index in `0..n` from a 64-bit random value (`n > 0`).
pub(super) fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// Fisher-Yates with the given source of random u64.
pub(super) fn shuffle<T>(v: &mut [T], next: &mut impl FnMut() -> u64) {
    for i in (1..v.len()).rev() {
        let j = below(next(), i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_is_the_reference_output_function() {
        // splitmix64.c (Vigna): z = x + 0x9E3779B97F4A7C15, then the two xor-shift-multiplies.
        let reference = |x: u64| {
            let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        for x in [0, 1, 42, u64::MAX, 0x7472_6169_6e00_0001] {
            assert_eq!(splitmix64(x), reference(x));
        }
    }
}
