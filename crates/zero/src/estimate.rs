//! Per-rank model-state memory of each stage, from the formula (DESIGN.md, ZeRO).

use crate::plan::Stage;

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

/// Stage 3 also holds the whole parameters of the unit that runs, in the compute dtype
/// (`bytes` per element), and of the next one with prefetch. Other stages hold whole parameters
/// anyway, so this is 0 for them.
pub fn gathered_bytes(stage: Stage, largest_unit: f64, prefetch: bool, bytes: f64) -> f64 {
    match stage {
        Stage::Three => largest_unit * bytes * if prefetch { 2.0 } else { 1.0 },
        _ => 0.0,
    }
}

/// Formats the per-rank model-state memory of every stage as a table (GB = 1e9 bytes), the
/// output of `kiln estimate`.
pub fn estimate_table(psi: f64, frozen: f64, n: usize, k: f64) -> String {
    estimate_table_with(psi, frozen, n, k, 0.0, false)
}

/// [`estimate_table`] with stage 3's gathered unit: `largest_unit` parameters (the biggest unit,
/// trainable and frozen), twice with `prefetch`.
pub fn estimate_table_with(
    psi: f64,
    frozen: f64,
    n: usize,
    k: f64,
    largest_unit: f64,
    prefetch: bool,
) -> String {
    let gb = |b: f64| b / 1e9;
    let mut out = format!(
        "Ψ = {:.3e} trainable + {:.3e} frozen parameters, N = {n}, K = {k}\n\
         | stage | params GB | grads GB | master + optimizer GB | gathered unit GB | total GB |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        psi, frozen
    );
    for (name, stage) in [
        ("0 (DDP)", Stage::Ddp),
        ("1", Stage::One),
        ("2", Stage::Two),
        ("3 (FSDP)", Stage::Three),
    ] {
        let e = estimate(psi, frozen, n, stage, k);
        let g = gathered_bytes(stage, largest_unit, prefetch, 2.0);
        out += &format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            gb(e.params),
            gb(e.grads),
            gb(e.optimizer),
            gb(g),
            gb(e.total() + g)
        );
    }
    out
}

/// The dimensions that set a decoder's activation memory for one rank's micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationShape {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub vocab: usize,
    /// Bytes per activation element in the compute dtype (2 for bf16/f16).
    pub bytes: usize,
}

/// Bytes of activations a Llama-style decoder keeps for backward, counted tensor by tensor from
/// what kiln's fused kernels save (t = batch·seq tokens, e = bytes per element of the compute
/// dtype, kv = kv_heads·head_dim):
///
/// - per layer: the two RMSNorm inputs (2·t·h·e) and their row scales (2·t·4 bytes); the inputs
///   of the q/k/v, o and gate/up projections (3·t·h·e) and of the down projection (t·i·e); the
///   rotated q, k and the v that attention keeps (t·(h + 2·kv)·e) with each query row's softmax
///   max and sum (t·heads·8 bytes, no `seq²` probabilities); SwiGLU's gate and up (2·t·i·e);
/// - the head: the final norm's input and scales (t·h·e + 4t), the head's input (t·h·e), the
///   logits and, during the backward, their gradient (2·t·V·e), each row's log-sum-exp (4t);
/// - the attention mask, once (b·s² bytes).
///
/// With `recompute` (one unit re-run during backward), only each block's input is kept, plus one
/// block's full set at a time.
pub fn activation_bytes(s: &ActivationShape, recompute: bool) -> f64 {
    // In f64 throughout: sizes a user types (`--seq 5000000000`) overflow usize products.
    let (b, sq) = (s.batch as f64, s.seq as f64);
    let t = b * sq;
    let (h, i, e) = (s.hidden as f64, s.intermediate as f64, s.bytes as f64);
    let kv = s.kv_heads as f64 * (s.hidden / s.heads.max(1)) as f64;
    let layer = t * (6.0 * h + 2.0 * kv + 3.0 * i) * e + t * 8.0 * (1.0 + s.heads as f64);
    let head = 2.0 * t * h * e + 8.0 * t + 2.0 * t * s.vocab as f64 * e;
    let mask = b * sq * sq;
    let blocks = if recompute {
        s.layers as f64 * t * h * e + layer
    } else {
        s.layers as f64 * layer
    };
    blocks + head + mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_prints_the_seed_figures() {
        let table = estimate_table(7.5e9, 0.0, 64, 12.0);
        for total in ["| 120.0 |", "| 31.4 |", "| 16.6 |", "| 1.9 |"] {
            assert!(table.contains(total), "{total} missing from\n{table}");
        }
        // A 7B Llama's largest unit is a decoder block of ~202M parameters (or the 131M-row
        // embedding); gathered in bf16 that is 0.40 GB, 0.81 GB with prefetch.
        let table = estimate_table_with(7.5e9, 0.0, 64, 12.0, 2.02e8, true);
        assert!(
            table.contains("| 3 (FSDP) | 0.2 | 0.2 | 1.4 | 0.81 | 2.7 |"),
            "{table}"
        );
        assert_eq!(gathered_bytes(Stage::Two, 2.02e8, true, 2.0), 0.0);
    }

    #[test]
    fn activation_bytes_count_every_saved_tensor() {
        let s = ActivationShape {
            batch: 1,
            seq: 2,
            hidden: 4,
            intermediate: 8,
            heads: 2,
            kv_heads: 1,
            layers: 3,
            vocab: 10,
            bytes: 2,
        };
        // t = 2, kv = 2: layer = 2·(24 + 4 + 24)·2 + 2·8·3 = 208 + 48; head = 2·2·4·2 + 16 +
        // 2·2·10·2 = 32 + 16 + 80; mask = 4.
        let layer = 208.0 + 48.0;
        let head = 128.0;
        assert_eq!(activation_bytes(&s, false), 3.0 * layer + head + 4.0);
        assert_eq!(activation_bytes(&s, true), 3.0 * 16.0 + layer + head + 4.0);
        assert!(activation_bytes(&s, true) < activation_bytes(&s, false));
    }
}
