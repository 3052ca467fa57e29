//! Causal language-modelling loss, as HF's `LlamaForCausalLM` computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor};

/// Label value that excludes a position from the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Sum of the token losses and the number of tokens that count.
///
/// Position `t` predicts `labels[b, t+1]`; positions whose next label is `-100` are skipped.
/// Returned separately so that data-parallel ranks can normalise by the global token count.
///
/// # Shapes
/// `logits: [batch, seq, vocab]`, `labels: [batch, seq]` -> (`[1]` sum in f32, `[1]` count in f32)
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: Tensor<2, Int>) -> (Tensor<1>, Tensor<1>) {
    let [b, s, v] = logits.dims();
    let logits = logits
        .narrow(1, 0, s - 1)
        .cast(DType::F32)
        .reshape([b * (s - 1), v]);
    let targets = labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]);
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(valid.clone().bool_not(), 0);
    let picked = log_softmax(logits, 1)
        .gather(1, safe_targets.unsqueeze_dim(1))
        .reshape([b * (s - 1)]);
    let valid = valid.float();
    let sum = -(picked * valid.clone()).sum();
    (sum, valid.sum())
}

/// The mean loss over counted tokens (NaN when none count, as torch).
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    sum / count
}
