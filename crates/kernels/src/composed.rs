//! The same operations composed from burn's tensor ops, for devices without fused kernels
//! (wgpu, CUDA) and as the reference the fused kernels are tested against. burn's autodiff
//! differentiates them op by op.

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Bool, DType, Int, Tensor};

use crate::IGNORE_INDEX;

pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    x.matmul(weight.transpose().unsqueeze())
}

pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
    let normed = (x / rms).cast(dtype);
    normed * weight.cast(dtype).unsqueeze()
}

pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

pub fn rope(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>, heads: usize) -> Tensor<3> {
    let [b, s, f] = x.dims();
    let d = f / heads;
    let half = d / 2;
    let x = x.reshape([b, s, heads, d]);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let dtype = x.dtype();
    // A row per position (`[s, d]`) or per token (`[b·s, d]`, packed sequences).
    let per_token = cos.dims()[0] == b * s && b > 1;
    let table = |t: Tensor<2>| {
        t.cast(dtype)
            .reshape([if per_token { b } else { 1 }, s, 1, d])
    };
    (x * table(cos) + rotated * table(sin)).reshape([b, s, f])
}

pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<4, Bool>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Tensor<3> {
    let [b, s, f] = q.dims();
    let keys = k.dims()[1];
    let d = f / heads;
    let split = |t: Tensor<3>, n: usize, len: usize| t.reshape([b, len, n, d]).swap_dims(1, 2);
    let repeat = |t: Tensor<4>| {
        let groups = heads / kv_heads;
        if groups == 1 {
            return t;
        }
        t.unsqueeze_dim::<5>(2)
            .expand([b, kv_heads, groups, keys, d])
            .reshape([b, heads, keys, d])
    };
    let (q, k, v) = (
        split(q, heads, s),
        repeat(split(k, kv_heads, keys)),
        repeat(split(v, kv_heads, keys)),
    );
    let dtype = q.dtype();
    let scores = (q.matmul(k.swap_dims(2, 3)) * scale).cast(DType::F32);
    let probs = softmax(scores.mask_fill(mask, f32::MIN), 3).cast(dtype);
    probs.matmul(v).swap_dims(1, 2).reshape([b, s, f])
}

pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [rows, _] = logits.dims();
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe = targets.mask_fill(valid.clone().bool_not(), 0);
    let picked = log_softmax(logits.cast(DType::F32), 1)
        .gather(1, safe.unsqueeze_dim(1))
        .reshape([rows]);
    -(picked * valid.float()).sum()
}

pub fn embedding(weight: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    burn::tensor::module::embedding(weight, ids)
}
