//! Per-rank model-state memory of each stage, from the formula (DESIGN.md, ZeRO).

use crate::engine::Stage;

/// Per-rank model-state bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Compute copy of the parameters (trainable and frozen).
    pub params: f64,
    /// Gradients in the compute dtype.
    pub grads: f64,
    /// fp32 master weights and optimizer state (`K` bytes per trainable parameter).
    pub optimizer: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer
    }
}

/// Model-state bytes per rank for `psi` trainable and `frozen` frozen parameters on `n` ranks,
/// with a 2-byte compute dtype and `k` bytes of master + optimizer state per trainable parameter
/// (12 for fp32 master + Adam). Frozen parameters cost only their compute copy (sharded under
/// stage 3).
///
/// Ψ = 7.5e9, N = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB for stages 0-3.
pub fn estimate(psi: f64, frozen: f64, n: usize, stage: Stage, k: f64) -> Estimate {
    let n = n.max(1) as f64;
    let all = psi + frozen;
    match stage {
        Stage::Ddp => Estimate {
            params: 2.0 * all,
            grads: 2.0 * psi,
            optimizer: k * psi,
        },
        Stage::One => Estimate {
            params: 2.0 * all,
            grads: 2.0 * psi,
            optimizer: k * psi / n,
        },
        Stage::Two => Estimate {
            params: 2.0 * all,
            grads: 2.0 * psi / n,
            optimizer: k * psi / n,
        },
        Stage::Three => Estimate {
            params: 2.0 * all / n,
            grads: 2.0 * psi / n,
            optimizer: k * psi / n,
        },
    }
}
