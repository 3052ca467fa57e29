//! The fused operations as a burn backend extension: one trait routed by burn's dispatch to the
//! flex CPU kernels and to their autodiff wrapper (which registers our own backward).

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};

/// Fused forward operations. Shapes are those of the functions in the crate root, which are the
/// only callers.
#[backend_extension(Flex, Autodiff)]
pub trait KernelOps: Backend {
    /// `x[m, k] · w[n, k]ᵀ` → `[m, n]`; the weight's gradient is summed over blocks of `block`
    /// rows of `x` (see [`crate::linear`]).
    fn kiln_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, block: usize) -> FloatTensor<Self>;
    /// RMSNorm of `x[m, h]` with gain `w[h]`; the gain's gradient is summed over blocks of
    /// `block` rows (see [`crate::rms_norm`]).
    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        block: usize,
    ) -> FloatTensor<Self>;
    /// `silu(gate) · up`.
    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Rotate-half RoPE of `x[batch, seq, heads·d]` with tables `cos`, `sin` of `[seq, d]`.
    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// Attention of `q[batch, seq, heads·d]` over `k`, `v` `[batch, keys, kv_heads·d]` with
    /// `mask[batch or 1, 1, seq, keys]` (true: masked) → `[batch, seq, heads·d]`; with
    /// `rotary`, `q` and `k` are rotated by `cos`, `sin` (`[seq, d]`) first.
    #[allow(clippy::too_many_arguments)]
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        rotary: bool,
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// Rows `ids[n]` of `weight[vocab, h]` → `[n, h]`.
    fn kiln_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self>;
    /// Sum over rows of `logits[rows, vocab]` whose target is not -100 of the cross-entropy
    /// → `[1]` in f32.
    fn kiln_cross_entropy_sum(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
}
