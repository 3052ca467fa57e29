//! Scaled dot-product attention with a boolean mask and grouped-query heads, fused: scores,
//! mask, softmax and the value product per (batch, head) in f32 blocks that stay in cache, with
//! a backward that recomputes the probabilities from each row's max and sum (as flash attention
//! does) instead of keeping `[batch, heads, seq, seq]` probabilities between the passes.
//!
//! Layout: `q` is `[batch, seq, heads·d]`, `k` and `v` are `[batch, keys, kv_heads·d]` (the
//! projections' own layout, no transpose), the output is `[batch, seq, heads·d]`. Query head
//! `h` reads kv head `h / (heads / kv_heads)`. The mask is `[batch or 1, seq, keys]`, true where
//! a query may not attend to a key; a masked score is `f32::MIN`, as Hugging Face's eager
//! attention fills it, so a row with every key masked attends uniformly instead of giving NaN.

use rayon::prelude::*;

use super::elem::{Elem, exp, kernel, max_by, sum_by, sum2_by};
use super::parallel::{new_rows, new_rows2};
use super::small;

/// Shapes and constants of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims<'a> {
    pub batch: usize,
    pub seq: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Whether the mask has one `[seq, keys]` plane per batch row (else one for all).
    pub mask_per_batch: bool,
    /// Rotary tables `cos`, `sin` (`[seq, d]` or `[batch·seq, d]`, f32) when `q` and `k` come
    /// unrotated: each head's
    /// rows are rotated as they are read, and its gradients rotated back, so the rotated `q` and
    /// `k` never exist as tensors.
    pub rope: Option<(&'a [f32], &'a [f32])>,
}

impl Dims<'_> {
    /// One head's rows of batch row `b` rotated by position (see [`Dims::rope`]); nothing
    /// without tables. Tables have a row per position (`[seq, d]`) or per token
    /// (`[batch·seq, d]`, packed sequences).
    fn rotate(&self, rows: &mut [f32], b: usize, inverse: bool) {
        if let Some((cos, sin)) = self.rope {
            let len = self.seq * self.head_dim;
            let at = if cos.len() > len { b * len } else { 0 };
            let (cos, sin) = (&cos[at..at + len], &sin[at..at + len]);
            super::rope::rotate_head(rows, cos, sin, self.head_dim, inverse);
        }
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_row(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn mask_plane<'m>(&self, mask: &'m [u8], b: usize) -> &'m [u8] {
        let plane = self.seq * self.keys;
        let b = if self.mask_per_batch { b } else { 0 };
        &mask[b * plane..(b + 1) * plane]
    }
}

/// Query rows processed at once: the score block `[BLOCK, keys]` stays in cache, and keys that no
/// row of the block may see (the causal future) are skipped.
const BLOCK: usize = 32;

/// Each query row's softmax statistics, kept for the backward: the max score and the sum of
/// `exp(score − max)`.
pub(crate) type Stats = Vec<f32>;

/// The attention output and, per `(batch, head, query)`, the row max and row sum
/// (`[batch, heads, seq, 2]`).
pub(crate) fn forward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
) -> (Vec<E>, Stats) {
    let Dims {
        batch,
        seq,
        heads,
        head_dim: d,
        ..
    } = dims;
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
        .into_par_iter()
        .map(|task| head_forward(q, k, v, mask, dims, task / heads, task % heads))
        .collect();
    // Each batch row's heads go into its own slab of the output, the slabs in parallel.
    let slab = seq * dims.q_row();
    let out = new_rows(
        batch * slab,
        slab,
        slab,
        E::from_f32(0.0),
        |first, slabs| {
            for (i, out) in slabs.chunks_exact_mut(slab.max(1)).enumerate() {
                for h in 0..heads {
                    scatter(
                        &per_head[(first + i) * heads + h].0,
                        out,
                        h * d,
                        dims.q_row(),
                        d,
                    );
                }
            }
        },
    );
    let mut stats = Vec::with_capacity(batch * heads * seq * 2);
    for (_, st) in &per_head {
        stats.extend_from_slice(st);
    }
    (out, stats)
}

/// The keys a block of query rows can see: one past the last key any of its rows may attend
/// to, or every key when some row may attend to none (it attends uniformly to all of them).
fn extent(mask: &[u8], keys: usize) -> usize {
    let mut end = 0;
    for row in mask.chunks_exact(keys) {
        match row.iter().rposition(|&m| m == 0) {
            Some(last) => end = end.max(last + 1),
            None => return keys,
        }
    }
    end
}

/// One kv head's keys transposed (`[d, keys]`), the layout the score product reads.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// One head of one batch row: the output `[seq, d]` and the stats `[seq, 2]`.
fn head_forward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
    b: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        seq,
        keys,
        head_dim: d,
        ..
    } = dims;
    let kvh = h / dims.groups();
    let mut qs = gather(q, b * seq * dims.q_row() + h * d, dims.q_row(), seq, d);
    dims.rotate(&mut qs, b, false);
    let mut ks = gather(
        k,
        b * keys * dims.kv_row() + kvh * d,
        dims.kv_row(),
        keys,
        d,
    );
    dims.rotate(&mut ks, b, false);
    let kt = transpose(&ks, keys, d);
    let vs = gather(
        v,
        b * keys * dims.kv_row() + kvh * d,
        dims.kv_row(),
        keys,
        d,
    );
    let plane = dims.mask_plane(mask, b);
    let mut out = vec![0.0f32; seq * d];
    let mut stats = vec![0.0f32; seq * 2];
    let mut p = vec![0.0f32; BLOCK.min(seq) * keys];
    for start in (0..seq).step_by(BLOCK) {
        let rows = BLOCK.min(seq - start);
        let m = &plane[start * keys..(start + rows) * keys];
        let width = extent(m, keys);
        let p = &mut p[..rows * width];
        small::matmul(
            &qs[start * d..],
            d,
            1,
            &kt,
            keys,
            p,
            width,
            (rows, width, d),
            false,
        );
        softmax_rows(
            p,
            width,
            m,
            keys,
            dims.scale,
            &mut stats[start * 2..(start + rows) * 2],
        );
        small::matmul(
            p,
            width,
            1,
            &vs,
            d,
            &mut out[start * d..],
            d,
            (rows, d, width),
            false,
        );
    }
    (out, stats)
}

kernel! {
    /// Scores to probabilities in place (`p`: rows of `width`; `mask`: rows of `keys`, the first
    /// `width` read): `scale · s`, masked to `f32::MIN`, then softmax; writes each row's
    /// (max, sum).
    fn softmax_rows(p: &mut [f32], width: usize, mask: &[u8], keys: usize, scale: f32, stats: &mut [f32]) {
        for ((row, m), st) in p.chunks_exact_mut(width).zip(mask.chunks_exact(keys)).zip(stats.chunks_exact_mut(2)) {
            for (s, &masked) in row.iter_mut().zip(&m[..width]) {
                *s = if masked != 0 { f32::MIN } else { *s * scale };
            }
            let max = max_by(row, |s| s);
            for s in row.iter_mut() {
                *s = exp(*s - max);
            }
            let sum = sum_by(row, |s| s);
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
            st[0] = max;
            st[1] = sum;
        }
    }
}

kernel! {
    /// The probabilities of the forward again, from the scores and the kept (max, sum).
    fn probs_again(p: &mut [f32], width: usize, mask: &[u8], keys: usize, scale: f32, stats: &[f32]) {
        for ((row, m), st) in p.chunks_exact_mut(width).zip(mask.chunks_exact(keys)).zip(stats.chunks_exact(2)) {
            let (max, inv) = (st[0], 1.0 / st[1]);
            for (s, &masked) in row.iter_mut().zip(&m[..width]) {
                let x = if masked != 0 { f32::MIN } else { *s * scale };
                *s = exp(x - max) * inv;
            }
        }
    }
}

kernel! {
    /// `ds = scale · p · (dp − Σⱼ p·dp)` in place of `dp`, 0 where masked (the mask's fill is a
    /// constant, so no gradient reaches a masked score).
    fn score_grads(p: &[f32], dp: &mut [f32], width: usize, mask: &[u8], keys: usize, scale: f32) {
        for ((pr, dr), m) in p.chunks_exact(width).zip(dp.chunks_exact_mut(width)).zip(mask.chunks_exact(keys)) {
            let dot = sum2_by(pr, dr, |a, b| a * b);
            for ((g, &a), &masked) in dr.iter_mut().zip(pr).zip(&m[..width]) {
                *g = if masked != 0 { 0.0 } else { scale * a * (*g - dot) };
            }
        }
    }
}

/// Gradients of `q`, `k` and `v` for the output gradient `dout` (same layout as the output).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &[u8],
    stats: &[f32],
    dout: &[E],
    dims: Dims,
) -> (Vec<E>, Vec<E>, Vec<E>) {
    let Dims {
        batch,
        seq,
        keys,
        kv_heads,
        head_dim: d,
        ..
    } = dims;
    let per_kv: Vec<KvGrads> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|task| {
            kv_backward(
                q,
                k,
                v,
                mask,
                stats,
                dout,
                dims,
                task / kv_heads,
                task % kv_heads,
            )
        })
        .collect();
    // Each batch row's heads go into its own slab of each gradient, the slabs in parallel.
    let zero = E::from_f32(0.0);
    let q_slab = seq * dims.q_row();
    let dq = new_rows(q.len(), q_slab, q_slab, zero, |first, slabs| {
        for (i, dq) in slabs.chunks_exact_mut(q_slab.max(1)).enumerate() {
            for (kvh, g) in per_kv[(first + i) * kv_heads..][..kv_heads]
                .iter()
                .enumerate()
            {
                for (j, dqh) in g.dq.iter().enumerate() {
                    let h = kvh * dims.groups() + j;
                    scatter(dqh, dq, h * d, dims.q_row(), d);
                }
            }
        }
    });
    let kv_slab = keys * dims.kv_row();
    let (dk, dv) = new_rows2(
        (k.len(), kv_slab),
        (v.len(), kv_slab),
        2 * kv_slab,
        (zero, zero),
        |first, dk_slabs, dv_slabs| {
            let slabs = dk_slabs
                .chunks_exact_mut(kv_slab.max(1))
                .zip(dv_slabs.chunks_exact_mut(kv_slab.max(1)));
            for (i, (dk, dv)) in slabs.enumerate() {
                for (kvh, g) in per_kv[(first + i) * kv_heads..][..kv_heads]
                    .iter()
                    .enumerate()
                {
                    scatter(&g.dk, dk, kvh * d, dims.kv_row(), d);
                    scatter(&g.dv, dv, kvh * d, dims.kv_row(), d);
                }
            }
        },
    );
    (dq, dk, dv)
}

/// The gradients one kv head and the query heads that read it produce.
struct KvGrads {
    dq: Vec<Vec<f32>>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn kv_backward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    mask: &[u8],
    stats: &[f32],
    dout: &[E],
    dims: Dims,
    b: usize,
    kvh: usize,
) -> KvGrads {
    let Dims {
        seq,
        keys,
        heads,
        head_dim: d,
        ..
    } = dims;
    let kv_base = b * keys * dims.kv_row() + kvh * d;
    let mut ks = gather(k, kv_base, dims.kv_row(), keys, d);
    dims.rotate(&mut ks, b, false);
    let kt = transpose(&ks, keys, d);
    let vt = transpose(&gather(v, kv_base, dims.kv_row(), keys, d), keys, d);
    let plane = dims.mask_plane(mask, b);
    let mut dk = vec![0.0f32; keys * d];
    let mut dv = vec![0.0f32; keys * d];
    let mut dq = Vec::with_capacity(dims.groups());
    let block = BLOCK.min(seq);
    let (mut p, mut dp) = (vec![0.0f32; block * keys], vec![0.0f32; block * keys]);
    for j in 0..dims.groups() {
        let h = kvh * dims.groups() + j;
        let q_base = b * seq * dims.q_row() + h * d;
        let mut qs = gather(q, q_base, dims.q_row(), seq, d);
        dims.rotate(&mut qs, b, false);
        let dos = gather(dout, q_base, dims.q_row(), seq, d);
        let st = &stats[(b * heads + h) * seq * 2..(b * heads + h + 1) * seq * 2];
        let mut dqh = vec![0.0f32; seq * d];
        for start in (0..seq).step_by(BLOCK) {
            let rows = BLOCK.min(seq - start);
            let m = &plane[start * keys..(start + rows) * keys];
            let w = extent(m, keys);
            let (p, dp) = (&mut p[..rows * w], &mut dp[..rows * w]);
            let (q_blk, do_blk) = (&qs[start * d..], &dos[start * d..]);
            small::matmul(q_blk, d, 1, &kt, keys, p, w, (rows, w, d), false);
            probs_again(
                p,
                w,
                m,
                keys,
                dims.scale,
                &st[start * 2..(start + rows) * 2],
            );
            // dv += pᵀ · do
            small::matmul(p, 1, w, do_blk, d, &mut dv, d, (w, d, rows), true);
            // dp = do · vᵀ, then ds in place
            small::matmul(do_blk, d, 1, &vt, keys, dp, w, (rows, w, d), false);
            score_grads(p, dp, w, m, keys, dims.scale);
            // dq = ds · k, dk += dsᵀ · q
            small::matmul(
                dp,
                w,
                1,
                &ks,
                d,
                &mut dqh[start * d..],
                d,
                (rows, d, w),
                false,
            );
            small::matmul(dp, 1, w, q_blk, d, &mut dk, d, (w, d, rows), true);
        }
        dims.rotate(&mut dqh, b, true);
        dq.push(dqh);
    }
    dims.rotate(&mut dk, b, true);
    KvGrads { dq, dk, dv }
}

/// Rows `0..rows` of `d` elements at `base + r · stride` of `x`, as contiguous f32.
fn gather<E: Elem>(x: &[E], base: usize, stride: usize, rows: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * d);
    for r in 0..rows {
        out.extend(
            x[base + r * stride..base + r * stride + d]
                .iter()
                .map(|v| v.to_f32()),
        );
    }
    out
}

/// The inverse of [`gather`]: contiguous f32 rows of `d` into `x` at `base + r · stride`.
fn scatter<E: Elem>(rows: &[f32], x: &mut [E], base: usize, stride: usize, d: usize) {
    for (r, row) in rows.chunks_exact(d).enumerate() {
        for (o, &v) in x[base + r * stride..base + r * stride + d]
            .iter_mut()
            .zip(row)
        {
            *o = E::from_f32(v);
        }
    }
}
