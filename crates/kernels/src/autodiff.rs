//! The fused operations under burn's autodiff: each forward registers one backward step that
//! calls the fused backward kernel, instead of the dozen steps of the composed operations.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata};

use crate::ops::KernelOps;

/// What a backend needs beyond [`KernelOps`] to train through the fused operations: forwards
/// that also return what their backward keeps, and the backwards.
pub trait KernelGrads: KernelOps {
    /// The input gradient `dy[m, n] · w[n, k]` when `w` is given and the weight gradient
    /// `dy[m, n]ᵀ · x[m, k]` (f32, summed over blocks of `block` rows) when `x` is given.
    fn linear_backward(
        dy: FloatTensor<Self>,
        x: Option<FloatTensor<Self>>,
        w: Option<FloatTensor<Self>>,
        block: usize,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>);
    /// The output and each row's `1/rms` (`[m]`, f32).
    fn rms_norm_train(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dw)`; `dw` only when asked for, summed over blocks of `block` rows.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        r: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        need_dw: bool,
        block: usize,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>);
    /// `(dgate, dup)`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The transposed rotation applied to `dy`.
    fn rope_backward(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// The output and the softmax stats (`[batch, heads, seq, 2]`, f32); `rope` is
    /// `(cos, sin, rotary)` as in [`KernelOps::kiln_attention`].
    #[allow(clippy::too_many_arguments)]
    fn attention_train(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        rope: (FloatTensor<Self>, FloatTensor<Self>, bool),
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        stats: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        rope: (FloatTensor<Self>, FloatTensor<Self>, bool),
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// The table's gradient (`[vocab, h]`, f32): `dy`'s rows added at `ids`.
    fn embedding_grad(
        dy: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
    ) -> FloatTensor<Self>;
    /// The loss sum and each row's log-sum-exp (`[rows]`, f32).
    fn cross_entropy_train(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The logits' gradient for the upstream gradient `dsum` (`[1]`) of the sum.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dsum: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

type P<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;

impl<B: KernelGrads, C: CheckpointStrategy> KernelOps for Autodiff<B, C> {
    fn kiln_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, block: usize) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Linear;
        impl<B: KernelGrads> Backward<B, 2> for Linear {
            /// The input (when the weight needs a gradient), the weight (when the input does), and
            /// the rows per block of the weight's gradient.
            type State = (Option<P<B>>, Option<P<B>>, usize);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, w, block) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let [px, pw] = ops.parents;
                let (x, w) = (x.filter(|_| pw.is_some()), w.filter(|_| px.is_some()));
                let (dx, dw) = B::linear_backward(dy, x, w, block);
                if let (Some(node), Some(dx)) = (px, dx) {
                    grads.register::<B>(node.id, dx);
                }
                if let (Some(node), Some(dw)) = (pw, dw) {
                    grads.register::<B>(node.id, dw);
                }
            }
        }
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        let (guards, (x, w)) = (
            [x.node(), w.node()],
            (x.into_primitive(), w.into_primitive()),
        );
        match Linear.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = (
                    w_tracked.then(|| x.clone()),
                    x_tracked.then(|| w.clone()),
                    block,
                );
                prep.finish(state, B::kiln_linear(x, w, block))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_linear(x, w, block)),
        }
    }

    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;
        impl<B: KernelGrads> Backward<B, 2> for RmsNorm {
            type State = (P<B>, P<B>, P<B>, usize);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, w, r, block) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let [px, pw] = ops.parents;
                let (dx, dw) = B::rms_norm_backward(x, w, r, dy, pw.is_some(), block);
                if let Some(node) = px {
                    grads.register::<B>(node.id, dx);
                }
                if let (Some(node), Some(dw)) = (pw, dw) {
                    grads.register::<B>(node.id, dw);
                }
            }
        }
        let (guards, (x, w)) = (
            [x.node(), w.node()],
            (x.into_primitive(), w.into_primitive()),
        );
        match RmsNorm.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, r) = B::rms_norm_train(x.clone(), w.clone(), eps);
                prep.finish((x, w, r, block), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_rms_norm(x, w, eps, block)),
        }
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwiGlu;
        impl<B: KernelGrads> Backward<B, 2> for SwiGlu {
            type State = (P<B>, P<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (g, u) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dg, du) = B::swiglu_backward(g, u, dy);
                let [pg, pu] = ops.parents;
                if let Some(node) = pg {
                    grads.register::<B>(node.id, dg);
                }
                if let Some(node) = pu {
                    grads.register::<B>(node.id, du);
                }
            }
        }
        let guards = [gate.node(), up.node()];
        let (g, u) = (gate.into_primitive(), up.into_primitive());
        match SwiGlu.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((g.clone(), u.clone()), B::kiln_swiglu(g, u)),
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_swiglu(g, u)),
        }
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Rope;
        impl<B: KernelGrads> Backward<B, 1> for Rope {
            type State = (P<B>, P<B>, usize);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (cos, sin, heads) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::rope_backward(dy, cos, sin, heads));
                }
            }
        }
        let guards = [x.node()];
        let (x, cos, sin) = (
            x.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        );
        match Rope.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_rope(x, cos.clone(), sin.clone(), heads);
                prep.finish((cos, sin, heads), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_rope(x, cos, sin, heads)),
        }
    }

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
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;
        #[derive(Debug, Clone)]
        struct Saved<B: Backend> {
            q: P<B>,
            k: P<B>,
            v: P<B>,
            mask: BoolTensor<B>,
            stats: P<B>,
            rope: (P<B>, P<B>, bool),
            heads: usize,
            kv_heads: usize,
            scale: f64,
        }
        impl<B: KernelGrads> Backward<B, 3> for Attention {
            type State = Saved<B>;
            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let s = ops.state;
                let dout = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = B::attention_backward(
                    s.q, s.k, s.v, s.mask, s.stats, dout, s.rope, s.heads, s.kv_heads, s.scale,
                );
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        let guards = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match Attention.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let rope = (cos, sin, rotary);
                let (out, stats) = B::attention_train(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    mask.clone(),
                    rope.clone(),
                    heads,
                    kv_heads,
                    scale,
                );
                let saved = Saved {
                    q,
                    k,
                    v,
                    mask,
                    stats,
                    rope,
                    heads,
                    kv_heads,
                    scale,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_attention(
                q, k, v, mask, cos, sin, rotary, heads, kv_heads, scale,
            )),
        }
    }

    fn kiln_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Embedding;
        impl<B: KernelGrads> Backward<B, 1> for Embedding {
            type State = (IntTensor<B>, usize);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (ids, vocab) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::embedding_grad(dy, ids, vocab));
                }
            }
        }
        let vocab = weight.shape()[0];
        let guards = [weight.node()];
        let weight = weight.into_primitive();
        match Embedding.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::kiln_embedding(weight, ids.clone());
                prep.finish((ids, vocab), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_embedding(weight, ids)),
        }
    }

    fn kiln_cross_entropy_sum(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropy;
        impl<B: KernelGrads> Backward<B, 1> for CrossEntropy {
            type State = (P<B>, IntTensor<B>, P<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (logits, targets, lse) = ops.state;
                let dsum = grads.consume::<B>(&ops.node);
                if let [Some(node)] = ops.parents {
                    let d = B::cross_entropy_backward(logits, targets, lse, dsum);
                    grads.register::<B>(node.id, d);
                }
            }
        }
        let guards = [logits.node()];
        let logits = logits.into_primitive();
        match CrossEntropy.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (sum, lse) = B::cross_entropy_train(logits.clone(), targets.clone());
                prep.finish((logits, targets, lse), sum)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_cross_entropy_sum(logits, targets)),
        }
    }
}
