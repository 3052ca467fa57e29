//! Causal language-modelling loss, as HF's `LlamaForCausalLM` computes it.

use burn::tensor::{Int, Tensor, TensorData};

/// Label value that excludes a position from the loss.
pub const IGNORE_INDEX: i64 = kiln_kernels::IGNORE_INDEX;

/// Sum of the token losses and the number of tokens that count.
///
/// Position `t` predicts `labels[b, t+1]`; positions whose next label is `-100` are skipped, and
/// so is each row's last position (it has no next label). The cross-entropy is fused over the
/// vocabulary in f32 whatever the logits' dtype (see [`kiln_kernels::cross_entropy_sum`]): the
/// logits are never narrowed, copied or widened.
/// Returned separately so that data-parallel ranks can normalise by the global token count.
///
/// # Shapes
/// `logits: [batch, seq, vocab]`, `labels: [batch, seq]` -> (`[1]` sum in f32, `[1]` count in f32)
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: Tensor<2, Int>) -> (Tensor<1>, Tensor<1>) {
    let [b, s, v] = logits.dims();
    let targets = next_labels(labels);
    let count = targets.clone().not_equal_elem(IGNORE_INDEX).float().sum();
    let sum = kiln_kernels::cross_entropy_sum(logits.reshape([b * s, v]), targets);
    (sum, count)
}

/// `labels` shifted left by one with [`IGNORE_INDEX`] in each row's last position, flattened:
/// the target of every position.
fn next_labels(labels: Tensor<2, Int>) -> Tensor<1, Int> {
    let [b, s] = labels.dims();
    let last = Tensor::<2, Int>::from_data(
        TensorData::new(vec![IGNORE_INDEX; b], [b, 1]),
        (&labels.device(), labels.dtype()),
    );
    Tensor::cat(vec![labels.narrow(1, 1, s - 1), last], 1).reshape([b * s])
}

/// The mean loss over counted tokens (NaN when none count, as torch).
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let (sum, count) = causal_lm_loss_sum(logits, labels);
    sum / count
}
