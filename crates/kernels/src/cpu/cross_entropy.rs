//! Cross-entropy over the vocabulary, fused: log-softmax, the target's pick and the sum in one
//! pass per row, and the backward `softmax − onehot` written straight into the logits' gradient.
//! Nothing of `[rows, vocab]` size is kept between the passes: only each row's log-sum-exp.

use super::elem::{Elem, exp, kernel, max_by, sum_by};
use super::parallel::{for_rows, new_rows2};

/// Label value that excludes a row from the loss (Hugging Face's `ignore_index`).
pub(crate) const IGNORE: i64 = -100;

/// The sum over rows whose target is not [`IGNORE`] of `logsumexp(row) − row[target]`, and each
/// row's log-sum-exp. Targets outside `0..vocab` (other than `IGNORE`) are the caller's error.
pub(crate) fn forward<E: Elem>(logits: &[E], targets: &[i64], vocab: usize) -> (f32, Vec<f32>) {
    let rows = targets.len();
    // A row's work is its vocabulary row, not its one output.
    let (lse, loss) = new_rows2(
        (rows, 1),
        (rows, 1),
        vocab,
        (0.0f32, 0.0f32),
        |first, lse, loss| {
            let n = lse.len();
            rows_forward(
                &logits[first * vocab..(first + n) * vocab],
                &targets[first..first + n],
                vocab,
                lse,
                loss,
            )
        },
    );
    // A fixed order, whatever the threads did.
    let sum = loss.iter().map(|&l| f64::from(l)).sum::<f64>() as f32;
    (sum, lse)
}

kernel! {
    fn rows_forward<E>(logits: &[E], targets: &[i64], vocab: usize, lse: &mut [f32], loss: &mut [f32]) {
        for (((row, &t), l), out) in logits.chunks_exact(vocab).zip(targets).zip(lse.iter_mut()).zip(loss.iter_mut()) {
            let max = max_by(row, |v: E| v.to_f32());
            let sum = sum_by(row, |v: E| exp(v.to_f32() - max));
            let z = max + sum.ln();
            *l = z;
            *out = if t == IGNORE { 0.0 } else { z - row[t as usize].to_f32() };
        }
    }
}

/// `dlogits = g · (softmax(row) − onehot(target))` for counted rows, 0 for ignored ones,
/// written over the logits themselves: the gradient has their shape and dtype, and the logits
/// are not needed after it, so no buffer of `[rows, vocab]` is allocated.
pub(crate) fn backward_in_place<E: Elem>(
    logits: &mut [E],
    targets: &[i64],
    lse: &[f32],
    vocab: usize,
    g: f32,
) {
    for_rows(logits, vocab, |first, rows| {
        let n = rows.len() / vocab;
        rows_backward(rows, &targets[first..first + n], &lse[first..first + n], g)
    });
}

kernel! {
    fn rows_backward<E>(logits: &mut [E], targets: &[i64], lse: &[f32], g: f32) {
        let vocab = logits.len() / targets.len().max(1);
        for ((row, &t), &z) in logits.chunks_exact_mut(vocab).zip(targets).zip(lse) {
            if t == IGNORE {
                row.fill(E::from_f32(0.0));
                continue;
            }
            let t = t as usize;
            let picked = row[t].to_f32();
            for v in row.iter_mut() {
                *v = E::from_f32(g * exp(v.to_f32() - z));
            }
            row[t] = E::from_f32(g * (exp(picked - z) - 1.0));
        }
    }
}
