//! kiln-kernels: the hot operations of a Llama training step, fused, with their own backward.
//!
//! Composed from burn's tensor ops, one RMSNorm is a dozen graph nodes and as many full-size
//! temporaries (cast, square, mean, sqrt, divide, cast, multiply, and their backwards); attention
//! is a transpose, a repeat of the kv heads, a score matrix per head, a mask fill, a softmax and
//! more transposes. Here each is one operation over the activations in their own layout,
//! computed in f32 whatever the tensors' dtype (f32, bf16, f16), with one backward step:
//!
//! | function | forward | kept for the backward |
//! | --- | --- | --- |
//! | [`linear`] | `x Wᵀ` (gemm on strided operands: no transpose copies) | `x`, `W` |
//! | [`rms_norm`] | `w · round(x / rms(x))` | `x`, each row's `1/rms` |
//! | [`swiglu`] | `silu(g) · u` | `g`, `u` |
//! | [`rope`] | rotate-half RoPE on `[batch, seq, heads·d]` | the tables |
//! | [`attention`] | masked softmax attention, grouped-query heads, RoPE inside | `q`, `k`, `v` (unrotated), each row's max and sum |
//! | [`cross_entropy_sum`] | log-softmax, pick, sum over the vocabulary | each row's log-sum-exp |
//! | [`embedding`] | the rows of the table | the ids |
//!
//! Weight gradients ([`linear`], [`rms_norm`]'s gain, [`embedding`]) are f32 whatever the
//! compute dtype, as torch autocast's are for f32 master weights: rounding each micro-batch's or
//! rank's partial gradient to bf16 before the engine sums them would lose more than the product
//! itself (measured: 5x the update error of bf16 data parallelism against one rank).
//!
//! They run as a burn backend extension ([`KernelOps`]) on the flex CPU backend and under its
//! autodiff; on any other device (wgpu, CUDA) the same functions compose burn's ops, so model code
//! calls them unconditionally. Kernels use the threads of the current rayon pool (a rank's pool
//! when ranks are threads), and every reduction sums in a fixed order, so results do not depend
//! on the number of threads.

mod autodiff;
pub mod composed;
mod cpu;
mod flex;
mod ops;

pub use autodiff::KernelGrads;
pub use ops::KernelOps;

use burn::backend::{Dispatch, DispatchDevice};
use burn::tensor::{Bool, DType, Int, Tensor};

/// Whether `t` lives on flex (with or without autodiff) in a dtype the kernels take.
fn fused<const D: usize>(t: &Tensor<D>) -> bool {
    let device = t.device().inner();
    matches!(device.as_dispatch(), DispatchDevice::Flex(_)) && cpu::supports(t.dtype())
}

/// `t` in `dtype` (no op when it already is).
fn to_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `y = x Wᵀ` with `W` stored `[out, in]` (Hugging Face's layout), in `x`'s dtype.
///
/// The weight's gradient is summed in f32 over each batch row's positions (dimension `D - 2`),
/// then over the rows, so micro-batches and ranks that split a batch along its rows sum the same
/// per-row terms as one rank on the whole batch.
///
/// # Shapes
/// `x: [..., in]`, `weight: [out, in]` -> `[..., out]`
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let weight = to_dtype(weight, x.dtype());
    if !fused(&x) {
        return composed::linear(x, weight);
    }
    let dims = x.dims();
    let (k, n) = (dims[D - 1], weight.dims()[0]);
    let rows = dims[..D - 1].iter().product::<usize>();
    let x2 = x.reshape([rows, k]);
    let block = if D >= 3 { dims[D - 2] } else { rows };
    let y = Tensor::<2>::from_dispatch(<Dispatch as KernelOps>::kiln_linear(
        x2.into_dispatch(),
        weight.into_dispatch(),
        block,
    ));
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// RMSNorm over the last dimension, computed in f32 as Hugging Face's `LlamaRMSNorm`:
/// `weight · (x / sqrt(mean(x²) + eps))` with the normalised `x` rounded to `x`'s dtype first.
/// The gain's gradient is summed per batch row (dimension `D - 2`), then over rows, as
/// [`linear`]'s weight gradient.
///
/// # Shapes
/// `x: [..., hidden]`, `weight: [hidden]` -> same as `x`
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if !fused(&x) {
        return composed::rms_norm(x, weight, eps);
    }
    let dims = x.dims();
    let h = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let weight = to_dtype(weight, x.dtype());
    let block = if D >= 3 { dims[D - 2] } else { rows };
    let y = Tensor::<2>::from_dispatch(<Dispatch as KernelOps>::kiln_rms_norm(
        x.reshape([rows, h]).into_dispatch(),
        weight.into_dispatch(),
        eps,
        block,
    ));
    y.reshape(dims)
}

/// SwiGLU's gate `silu(gate) · up`, with `silu(gate)` rounded to the dtype first as the composed
/// form does.
///
/// # Shapes
/// `gate`, `up`: the same shape -> that shape
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !fused(&gate) || gate.dtype() != up.dtype() {
        return composed::swiglu(gate, up);
    }
    Tensor::from_dispatch(<Dispatch as KernelOps>::kiln_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// Rotate-half RoPE (Hugging Face's Llama: pairs `i` and `i + d/2`) of every head of `x`, with
/// `cos` and `sin` tables for its positions.
///
/// # Shapes
/// `x: [batch, seq, heads·d]`, `cos`, `sin: [seq, d]` -> same as `x`
pub fn rope(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>, heads: usize) -> Tensor<3> {
    if !fused(&x) {
        return composed::rope(x, cos, sin, heads);
    }
    Tensor::from_dispatch(<Dispatch as KernelOps>::kiln_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        heads,
    ))
}

/// Scaled dot-product attention as Hugging Face's eager Llama attention computes it: scores
/// `q kᵀ · scale` and softmax in f32, masked scores filled with `f32::MIN` (a row with every
/// key masked attends uniformly), query head `h` reading kv head `h / (heads / kv_heads)`.
///
/// With `rotary = Some((cos, sin))`, `q` and `k` are the projections before RoPE and are rotated
/// inside the kernel (rotate-half, as [`rope`]) as each head is read, and their gradients rotated
/// back: the rotated tensors are never stored (training: keys and queries share positions).
/// Without, `q` and `k` come rotated (decoding with a cache).
///
/// # Shapes
/// `q: [batch, seq, heads·d]`, `k`, `v: [batch, keys, kv_heads·d]`,
/// `mask: [batch or 1, 1, seq, keys]` (true: may not attend), `cos`, `sin: [seq, d]`
/// -> `[batch, seq, heads·d]`
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4, Bool>,
    rotary: Option<(Tensor<2>, Tensor<2>)>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Tensor<3> {
    if !fused(&q) || q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        let (q, k) = match rotary {
            Some((cos, sin)) => (
                composed::rope(q, cos.clone(), sin.clone(), heads),
                composed::rope(k, cos, sin, kv_heads),
            ),
            None => (q, k),
        };
        return composed::attention(q, k, v, mask, heads, kv_heads, scale);
    }
    let rotate = rotary.is_some();
    let (cos, sin) = rotary.unwrap_or_else(|| {
        let none = Tensor::<2>::empty([0, 0], (&q.device(), DType::F32));
        (none.clone(), none)
    });
    Tensor::from_dispatch(<Dispatch as KernelOps>::kiln_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        rotate,
        heads,
        kv_heads,
        scale,
    ))
}

/// Token embeddings: row `ids[b, s]` of `weight[vocab, hidden]`. Its gradient is f32 (as the
/// other weight gradients), the rows of the upstream gradient added in token order.
///
/// # Shapes
/// `weight: [vocab, hidden]`, `ids: [batch, seq]` -> `[batch, seq, hidden]`
pub fn embedding(weight: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    if !fused(&weight) {
        return composed::embedding(weight, ids);
    }
    let [b, s] = ids.dims();
    let h = weight.dims()[1];
    let rows = Tensor::<2>::from_dispatch(<Dispatch as KernelOps>::kiln_embedding(
        weight.into_dispatch(),
        ids.reshape([b * s]).into_dispatch(),
    ));
    rows.reshape([b, s, h])
}

/// Label value that excludes a row from [`cross_entropy_sum`] (Hugging Face's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The sum over rows whose target is not [`IGNORE_INDEX`] of `logsumexp(logits) −
/// logits[target]`, in f32 whatever the logits' dtype.
///
/// # Shapes
/// `logits: [rows, vocab]`, `targets: [rows]` -> `[1]` (f32)
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if !fused(&logits) {
        return composed::cross_entropy_sum(logits, targets);
    }
    Tensor::from_dispatch(<Dispatch as KernelOps>::kiln_cross_entropy_sum(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}
