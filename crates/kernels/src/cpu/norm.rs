//! RMSNorm, forward and backward in one pass over each row.
//!
//! `y = w · round(x · r)` with `r = 1 / sqrt(mean(x²) + eps)` computed in f32 and the normalised
//! row rounded to the input's dtype before the gain, exactly as Hugging Face's `LlamaRMSNorm`
//! (`weight * hidden_states.to(input_dtype)`): in bf16 both products round where torch's do.

use super::elem::{Elem, kernel, sum_by, sum3_by};
use super::parallel::{new_rows, new_rows2, sum_blocks};

/// Forward over `rows × h` elements: the output and each row's `r` (kept for the backward).
pub(crate) fn forward<E: Elem>(x: &[E], w: &[f32], eps: f32) -> (Vec<E>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h;
    new_rows2(
        (x.len(), h),
        (rows, 1),
        h,
        (E::from_f32(0.0), 0.0f32),
        |first, y, r| rows_forward(&x[first * h..first * h + y.len()], w, eps, y, r),
    )
}

kernel! {
    fn rows_forward<E>(x: &[E], w: &[f32], eps: f32, y: &mut [E], r: &mut [f32]) {
        let h = w.len();
        for ((xr, yr), rr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)).zip(r.iter_mut()) {
            let ss = sum_by(xr, |v: E| {
                let v = v.to_f32();
                v * v
            });
            let inv = 1.0 / (ss / h as f32 + eps).sqrt();
            *rr = inv;
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                let normed = E::from_f32(v.to_f32() * inv).to_f32();
                *o = E::from_f32(g * normed);
            }
        }
    }
}

/// Backward: the input gradient and the gain's gradient (f32, summed over blocks of `block` rows
/// in a fixed order, see [`sum_blocks`]).
///
/// With `x̂ = x·r` and `g = dy·w`: `dx = r · (g − x̂ · mean(g·x̂))`, `dw = Σ_rows dy · round(x̂)`.
pub(crate) fn backward<E: Elem>(
    x: &[E],
    w: &[f32],
    r: &[f32],
    dy: &[E],
    need_dw: bool,
    block: usize,
) -> (Vec<E>, Option<Vec<f32>>) {
    let h = w.len();
    let rows = r.len();
    let dx = new_rows(x.len(), h, h, E::from_f32(0.0), |first, dx| {
        let n = dx.len() / h;
        rows_backward(
            &x[first * h..(first + n) * h],
            w,
            &r[first..first + n],
            &dy[first * h..(first + n) * h],
            dx,
        )
    });
    let dw = need_dw.then(|| {
        sum_blocks(rows, block, h, |start, end| {
            let mut acc = vec![0.0f32; h];
            gain_grad(
                &x[start * h..end * h],
                &r[start..end],
                &dy[start * h..end * h],
                &mut acc,
            );
            acc
        })
    });
    (dx, dw)
}

kernel! {
    fn rows_backward<E>(x: &[E], w: &[f32], r: &[f32], dy: &[E], dx: &mut [E]) {
        let h = w.len();
        for (((xr, dyr), dxr), &inv) in x
            .chunks_exact(h)
            .zip(dy.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
            .zip(r)
        {
            let dot = sum3_by(xr, dyr, w, |v: E, d: E, g: f32| d.to_f32() * g * v.to_f32());
            let mean = dot * inv / h as f32;
            for (((o, &v), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                let xhat = v.to_f32() * inv;
                *o = E::from_f32(inv * (d.to_f32() * g - xhat * mean));
            }
        }
    }
}

kernel! {
    fn gain_grad<E>(x: &[E], r: &[f32], dy: &[E], acc: &mut [f32]) {
        let h = acc.len();
        for ((xr, dyr), &inv) in x.chunks_exact(h).zip(dy.chunks_exact(h)).zip(r) {
            for ((a, &v), &d) in acc.iter_mut().zip(xr).zip(dyr) {
                *a += d.to_f32() * E::from_f32(v.to_f32() * inv).to_f32();
            }
        }
    }
}
