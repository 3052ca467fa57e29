//! Rotary position embedding (rotate-half, as Hugging Face's Llama) on `[batch, seq, heads·d]`
//! activations in their own layout: no transpose to `[batch, heads, seq, d]` is needed.

use super::elem::{Elem, kernel};
use super::parallel::new_rows;

/// `y = x·cos + rotate_half(x)·sin` for rows `b·seq + s` of `heads · d` elements, with tables
/// `cos`, `sin` (f32) of `[seq, d]` (row `s` for position `s` of every batch row) or
/// `[batch·seq, d]` (a row per token: packed sequences). `inverse` applies the transpose of the
/// rotation (the backward: `dx₁ = dy₁·cos₁ + dy₂·sin₂`, `dx₂ = dy₂·cos₂ − dy₁·sin₁`).
pub(crate) fn apply<E: Elem>(
    x: &[E],
    cos: &[f32],
    sin: &[f32],
    d: usize,
    heads: usize,
    inverse: bool,
) -> Vec<E> {
    let row = heads * d;
    if row == 0 {
        return vec![E::from_f32(0.0); x.len()];
    }
    // Token r reads table row r mod (table rows): the position within its row for `[seq, d]`
    // tables, the token itself for `[batch·seq, d]` ones.
    let table_rows = cos.len() / d;
    new_rows(x.len(), row, row, E::from_f32(0.0), |first, y| {
        let n = y.len() / row;
        let tables = Tables {
            cos,
            sin,
            rows: table_rows,
            d,
        };
        rows(
            &x[first * row..(first + n) * row],
            tables,
            row,
            first,
            inverse,
            y,
        )
    })
}

#[derive(Clone, Copy)]
struct Tables<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    rows: usize,
    d: usize,
}

kernel! {
    fn rows<E>(x: &[E], t: Tables<'_>, row: usize, first: usize, inverse: bool, y: &mut [E]) {
        let (d, half) = (t.d, t.d / 2);
        for (r, (xr, yr)) in x.chunks_exact(row).zip(y.chunks_exact_mut(row)).enumerate() {
            let pos = (first + r) % t.rows;
            let cos = &t.cos[pos * d..(pos + 1) * d];
            let sin = &t.sin[pos * d..(pos + 1) * d];
            for (xh, yh) in xr.chunks_exact(d).zip(yr.chunks_exact_mut(d)) {
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i].to_f32(), x2[i].to_f32());
                    if inverse {
                        y1[i] = E::from_f32(a * cos[i] + b * sin[half + i]);
                        y2[i] = E::from_f32(b * cos[half + i] - a * sin[i]);
                    } else {
                        y1[i] = E::from_f32(a * cos[i] - b * sin[i]);
                        y2[i] = E::from_f32(b * cos[half + i] + a * sin[half + i]);
                    }
                }
            }
        }
    }
}

/// One head's rows `[rows, d]` (f32, in place) rotated by the tables' rows `0..rows` (`[·, d]`):
/// row `r` is position `r`. `inverse` applies the transposed rotation (the backward).
pub(crate) fn rotate_head(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize, inverse: bool) {
    rotate_rows(x, cos, sin, d, inverse)
}

kernel! {
    fn rotate_rows(x: &mut [f32], cos: &[f32], sin: &[f32], d: usize, inverse: bool) {
        let half = d / 2;
        for ((row, c), s) in x.chunks_exact_mut(d).zip(cos.chunks_exact(d)).zip(sin.chunks_exact(d)) {
            let (x1, x2) = row.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                if inverse {
                    x1[i] = a * c[i] + b * s[half + i];
                    x2[i] = b * c[half + i] - a * s[i];
                } else {
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[half + i] + a * s[half + i];
                }
            }
        }
    }
}
