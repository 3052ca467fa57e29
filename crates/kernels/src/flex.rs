//! [`KernelOps`] and [`KernelGrads`] on burn's flex CPU backend: the kernels of [`crate::cpu`].

use burn::backend::Flex;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};

use crate::autodiff::KernelGrads;
use crate::cpu;
use crate::ops::KernelOps;

type T = FloatTensor<Flex>;

impl KernelOps for Flex {
    fn kiln_linear(x: T, w: T, _block: usize) -> T {
        cpu::linear(x, w)
    }
    fn kiln_rms_norm(x: T, w: T, eps: f64, _block: usize) -> T {
        cpu::rms_norm(x, w, eps).0
    }
    fn kiln_swiglu(gate: T, up: T) -> T {
        cpu::swiglu(gate, up)
    }
    fn kiln_rope(x: T, cos: T, sin: T, heads: usize) -> T {
        cpu::rope(x, &cos, &sin, heads, false)
    }
    #[allow(clippy::too_many_arguments)]
    fn kiln_attention(
        q: T,
        k: T,
        v: T,
        mask: BoolTensor<Flex>,
        cos: T,
        sin: T,
        rotary: bool,
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> T {
        cpu::attention(q, k, v, mask, (&cos, &sin, rotary), heads, kv_heads, scale).0
    }
    fn kiln_embedding(weight: T, ids: IntTensor<Flex>) -> T {
        cpu::embedding(weight, &ids)
    }
    fn kiln_cross_entropy_sum(logits: T, targets: IntTensor<Flex>) -> T {
        cpu::cross_entropy(logits, &targets).0
    }
}

impl KernelGrads for Flex {
    fn linear_backward(dy: T, x: Option<T>, w: Option<T>, block: usize) -> (Option<T>, Option<T>) {
        cpu::linear_backward(dy, x, w, block)
    }
    fn rms_norm_train(x: T, w: T, eps: f64) -> (T, T) {
        cpu::rms_norm(x, w, eps)
    }
    fn rms_norm_backward(x: T, w: T, r: T, dy: T, need_dw: bool, block: usize) -> (T, Option<T>) {
        cpu::rms_norm_backward(x, w, r, dy, need_dw, block)
    }
    fn swiglu_backward(gate: T, up: T, dy: T) -> (T, T) {
        cpu::swiglu_backward(gate, up, dy)
    }
    fn rope_backward(dy: T, cos: T, sin: T, heads: usize) -> T {
        cpu::rope(dy, &cos, &sin, heads, true)
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_train(
        q: T,
        k: T,
        v: T,
        mask: BoolTensor<Flex>,
        rope: (T, T, bool),
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> (T, T) {
        cpu::attention(
            q,
            k,
            v,
            mask,
            (&rope.0, &rope.1, rope.2),
            heads,
            kv_heads,
            scale,
        )
    }
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: T,
        k: T,
        v: T,
        mask: BoolTensor<Flex>,
        stats: T,
        dout: T,
        rope: (T, T, bool),
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> (T, T, T) {
        let rope = (&rope.0, &rope.1, rope.2);
        cpu::attention_backward(q, k, v, mask, stats, dout, rope, heads, kv_heads, scale)
    }
    fn embedding_grad(dy: T, ids: IntTensor<Flex>, vocab: usize) -> T {
        cpu::embedding_backward(dy, &ids, vocab)
    }
    fn cross_entropy_train(logits: T, targets: IntTensor<Flex>) -> (T, T) {
        cpu::cross_entropy(logits, &targets)
    }
    fn cross_entropy_backward(logits: T, targets: IntTensor<Flex>, lse: T, dsum: T) -> T {
        cpu::cross_entropy_backward(logits, &targets, lse, dsum)
    }
}
