//! Cross-entropy over the vocabulary, fused: log-softmax, the target's pick and the sum in one
//! pass per row, and the backward `softmax − onehot` written straight into the logits' gradient.
//! Nothing of `[rows, vocab]` size is kept between the passes: only each row's log-sum-exp.

use super::elem::{Elem, exp, kernel, max_by, sum_by};
use super::parallel::{for_rows, for_rows2};

/// Label value that excludes a row from the loss (Hugging Face's `ignore_index`).
pub(crate) const IGNORE: i64 = -100;

/// The sum over rows whose target is not [`IGNORE`] of `logsumexp(row) − row[target]`, and each
/// row's log-sum-exp. Targets outside `0..vocab` (other than `IGNORE`) are the caller's error.
pub(crate) fn forward<E: Elem>(logits: &[E], targets: &[i64], vocab: usize) -> (f32, Vec<f32>) {
    let rows = targets.len();
    let mut lse = vec![0.0f32; rows];
    let mut loss = vec![0.0f32; rows];
    for_rows2(&mut lse, 1, &mut loss, 1, |first, lse, loss| {
        let n = lse.len();
        rows_forward(
            &logits[first * vocab..(first + n) * vocab],
            &targets[first..first + n],
            vocab,
            lse,
            loss,
        )
    });
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

/// `dlogits = g · (softmax(row) − onehot(target))` for counted rows, 0 for ignored ones.
pub(crate) fn backward<E: Elem>(
    logits: &[E],
    targets: &[i64],
    lse: &[f32],
    vocab: usize,
    g: f32,
) -> Vec<E> {
    let mut d = vec![E::from_f32(0.0); logits.len()];
    for_rows(&mut d, vocab, |first, d| {
        let n = d.len() / vocab;
        rows_backward(
            &logits[first * vocab..(first + n) * vocab],
            &targets[first..first + n],
            &lse[first..first + n],
            g,
            d,
        )
    });
    d
}

kernel! {
    fn rows_backward<E>(logits: &[E], targets: &[i64], lse: &[f32], g: f32, d: &mut [E]) {
        let vocab = logits.len() / targets.len().max(1);
        for (((row, &t), &z), out) in logits.chunks_exact(vocab).zip(targets).zip(lse).zip(d.chunks_exact_mut(vocab)) {
            if t == IGNORE {
                continue;
            }
            for (o, &v) in out.iter_mut().zip(row) {
                *o = E::from_f32(g * exp(v.to_f32() - z));
            }
            let t = t as usize;
            out[t] = E::from_f32(g * (exp(row[t].to_f32() - z) - 1.0));
        }
    }
}
