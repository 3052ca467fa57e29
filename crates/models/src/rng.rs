//! The portable random numbers of kiln: one SplitMix64 for random init, sampling, LoRA's init and
//! dropout, and the trainer's data, plus the FNV-1a hash that salts streams by name.

/// FNV-1a (64-bit) of `bytes`: a stable hash of a parameter name.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 (Steele, Lea and Flood): a small, portable PRNG, the same stream on every platform
/// and every version of kiln. Seeds random init and [`generate()`](crate::generate())'s sampler.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        Self::mix(self.0)
    }

    /// The `index`-th output of the stream seeded with `seed` (counter-based: no state, so any
    /// element of a large draw can be computed on its own).
    pub fn at(seed: u64, index: u64) -> u64 {
        Self::mix(seed.wrapping_add(index.wrapping_add(1).wrapping_mul(Self::GAMMA)))
    }

    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in (0, 1) at the midpoints of the 2^53 steps (kiln-lora's adapter init).
    pub fn uniform_midpoint(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller over [`uniform_midpoint`](Self::uniform_midpoint).
    pub fn normal_midpoint(&mut self) -> f64 {
        let (u1, u2) = (self.uniform_midpoint(), self.uniform_midpoint());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
