//! SwiGLU's gate, `silu(g) · u`, forward and backward in one pass.
//!
//! The forward rounds `silu(g)` to the input dtype before the product, as the composed
//! `silu(gate) * up` does in bf16.

use super::elem::{Elem, kernel, sigmoid};
use super::parallel::{new_rows, new_rows2};

/// `silu(g) · u` elementwise; `g` and `u` have the same length.
pub(crate) fn forward<E: Elem>(g: &[E], u: &[E]) -> Vec<E> {
    new_rows(g.len(), 1, 1, E::from_f32(0.0), |first, y| {
        let n = y.len();
        rows_forward(&g[first..first + n], &u[first..first + n], y)
    })
}

kernel! {
    fn rows_forward<E>(g: &[E], u: &[E], y: &mut [E]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            let a = a.to_f32();
            let silu = E::from_f32(a * sigmoid(a)).to_f32();
            *o = E::from_f32(silu * b.to_f32());
        }
    }
}

/// `(dg, du)` for the upstream gradient `dy`: `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`,
/// `du = dy·silu(g)`.
pub(crate) fn backward<E: Elem>(g: &[E], u: &[E], dy: &[E]) -> (Vec<E>, Vec<E>) {
    let (n, zero) = (g.len(), E::from_f32(0.0));
    new_rows2((n, 1), (n, 1), 1, (zero, zero), |first, dg, du| {
        let n = dg.len();
        let r = first..first + n;
        rows_backward(&g[r.clone()], &u[r.clone()], &dy[r], dg, du)
    })
}

kernel! {
    fn rows_backward<E>(g: &[E], u: &[E], dy: &[E], dg: &mut [E], du: &mut [E]) {
        for ((((og, ou), &a), &b), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let (a, b, d) = (a.to_f32(), b.to_f32(), d.to_f32());
            let s = sigmoid(a);
            let silu = E::from_f32(a * s).to_f32();
            *og = E::from_f32(d * b * s * (1.0 + a * (1.0 - s)));
            *ou = E::from_f32(d * silu);
        }
    }
}
