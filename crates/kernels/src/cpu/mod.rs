//! The CPU kernels behind [`KernelOps`](crate::KernelOps) on flex: shapes and dtypes are read
//! from the flex tensors here, the loops live in one file per operation.

pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod elem;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod parallel;
pub(crate) mod rope;
pub(crate) mod small;
pub(crate) mod swiglu;
pub(crate) mod tensor;

use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

use elem::Elem;
use matmul::{Mat, matmul_rows};
use tensor::{contiguous, dims, exclusive, floats, ints, slice, tensor, with_elem};

/// A 2-D view of a flex matrix (any non-negative strides) for [`matmul`].
fn mat<E: Elem>(t: &FlexTensor) -> (FlexTensor, usize, usize, usize, usize) {
    let layout = t.layout();
    let shape = layout.shape();
    let (rows, cols) = (shape[0], shape[1]);
    let strides = layout.strides();
    if strides.iter().all(|&s| s >= 0) {
        (
            t.clone(),
            rows,
            cols,
            strides[0] as usize,
            strides[1] as usize,
        )
    } else {
        (contiguous(t.clone()), rows, cols, cols, 1)
    }
}

fn view<'a, E: Elem>(
    t: &'a FlexTensor,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Mat<'a, E> {
    let offset = t.layout().start_offset();
    Mat {
        data: &t.storage::<E>()[offset..],
        rows,
        cols,
        rs,
        cs,
    }
}

/// `x[m, k] · w[n, k]ᵀ` → `[m, n]`, each row computed as it would be alone (see
/// [`matmul_rows`]).
pub(crate) fn linear(x: FlexTensor, w: FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let [m, k] = two(&x);
    let (w, n, wk, rs, cs) = mat_of(&w);
    assert_eq!(k, wk, "linear: input has {k} features, the weight {wk}");
    with_elem!(x.dtype(), E => {
        let out = matmul_rows(Mat::rows(slice::<E>(&x), m, k), view::<E>(&w, n, k, rs, cs).t());
        tensor([m, n], out)
    })
}

/// Multiply-adds from which a linear layer's backward is cut in halves: below, the halves' extra
/// products cost more than they gain (the default job's 1024 x 64 x 172 products ran 7% slower
/// cut; the reference Llama's 1024 x 256 x 256 ones run faster).
const HALVES_WORK: usize = 1 << 25;

/// Both gradients of [`linear`] that are asked for: the input's (with `w`) and the weight's
/// (with `x`).
///
/// With both, each of two threads computes half the input gradient's rows and then half the
/// weight gradient's rows: the same work on both (the weight gradient's block sums run slower
/// than the input gradient's one product, so one product per thread left a thread idle for the
/// difference). The halves are cut by the shapes alone, so the bits do not depend on the
/// number of threads.
pub(crate) fn linear_backward(
    dy: FlexTensor,
    x: Option<FlexTensor>,
    w: Option<FlexTensor>,
    block: usize,
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let dy = contiguous(dy);
    let [m, n] = two(&dy);
    let x = x.map(contiguous);
    let k = match (&x, &w) {
        (Some(x), _) => two(x)[1],
        (None, Some(w)) => two(w)[1],
        (None, None) => return (None, None),
    };
    let w = w.map(|w| {
        let (w, wn, wk, rs, cs) = mat_of(&w);
        assert_eq!((n, k), (wn, wk), "linear backward: weight shape");
        (w, rs, cs)
    });
    if let Some(x) = &x {
        assert_eq!(two(x), [m, k], "linear backward: input shape");
    }
    with_elem!(dy.dtype(), E => {
        let dy_m = Mat::rows(slice::<E>(&dy), m, n);
        let w_m = w.as_ref().map(|(w, rs, cs)| view::<E>(w, n, k, *rs, *cs));
        let x_m = x.as_ref().map(|x| Mat::rows(slice::<E>(x), m, k));
        let dx_len = if w_m.is_some() { m * k } else { 0 };
        let dw_len = if x_m.is_some() { n * k } else { 0 };
        let (mut dx, mut dw) = (Vec::with_capacity(dx_len), Vec::with_capacity(dw_len));
        // Rows of dx (a multiple of the product's row tile) and of dw in the first half.
        let halves = m * n * k >= HALVES_WORK && m >= 2 * matmul::ROW_TILE && n >= 32;
        let (sm, sn) = if halves {
            (m / 2 / matmul::ROW_TILE * matmul::ROW_TILE, n / 2 / 16 * 16)
        } else {
            (m, n)
        };
        {
            let dx_out = &mut dx.spare_capacity_mut()[..dx_len];
            let dw_out = &mut dw.spare_capacity_mut()[..dw_len];
            let (dx_a, dx_b) = dx_out.split_at_mut(if dx_len > 0 { sm * k } else { 0 });
            let (dw_a, dw_b) = dw_out.split_at_mut(if dw_len > 0 { sn * k } else { 0 });
            let half = |rows: Range<usize>, outs: Range<usize>, dx: &mut [_], dw: &mut [_]| {
                if let Some(w_m) = w_m {
                    matmul::matmul_rows_into(dy_m.row_range(rows.start, rows.len()), w_m, dx);
                }
                if let Some(x_m) = x_m {
                    let dy_t = dy_m.t().row_range(outs.start, outs.len());
                    matmul::weight_grad_into(dy_t, x_m, block, dw);
                }
            };
            if halves {
                parallel::side_by_side(
                    || half(0..sm, 0..sn, dx_a, dw_a),
                    || half(sm..m, sn..n, dx_b, dw_b),
                );
            } else {
                half(0..m, 0..n, dx_a, dw_a);
            }
        }
        // SAFETY: the halves wrote every element of the gradients asked for.
        unsafe {
            dx.set_len(dx_len);
            dw.set_len(dw_len);
        }
        (
            w_m.map(|_| tensor([m, k], dx)),
            x_m.map(|_| tensor([n, k], dw)),
        )
    })
}

fn two(t: &FlexTensor) -> [usize; 2] {
    let d = dims(t);
    assert_eq!(
        d.len(),
        2,
        "kiln-kernels: expected a matrix, got dims {d:?}"
    );
    [d[0], d[1]]
}

fn mat_of(t: &FlexTensor) -> (FlexTensor, usize, usize, usize, usize) {
    two(t);
    with_elem!(t.dtype(), E => mat::<E>(t))
}

/// RMSNorm of the rows of `x[m, h]` with gain `w[h]`: the output and each row's `1/rms`.
pub(crate) fn rms_norm(x: FlexTensor, w: FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
    let x = contiguous(x);
    let [m, h] = two(&x);
    let w = floats(&w);
    assert_eq!(
        w.len(),
        h,
        "rms_norm: gain has {} values, rows {h}",
        w.len()
    );
    with_elem!(x.dtype(), E => {
        let (y, r) = norm::forward::<E>(slice::<E>(&x), &w, eps as f32);
        (tensor([m, h], y), tensor([m], r))
    })
}

/// The gradients of [`rms_norm`]: input (in its dtype), and gain (f32, as a linear layer's
/// weight gradient) when `need_dw`.
pub(crate) fn rms_norm_backward(
    x: FlexTensor,
    w: FlexTensor,
    r: FlexTensor,
    dy: FlexTensor,
    need_dw: bool,
    block: usize,
) -> (FlexTensor, Option<FlexTensor>) {
    let (x, dy) = (contiguous(x), contiguous(dy));
    let [m, h] = two(&x);
    let wf = floats(&w);
    let r = floats(&r);
    with_elem!(x.dtype(), E => {
        let (dx, dw) = norm::backward::<E>(slice::<E>(&x), &wf, &r, slice::<E>(&dy), need_dw, block);
        (tensor([m, h], dx), dw.map(|dw| tensor([h], dw)))
    })
}

/// `silu(gate) · up`, any shape (both the same).
pub(crate) fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let (g, u) = (contiguous(gate), contiguous(up));
    let shape = dims(&g);
    assert_eq!(shape, dims(&u), "swiglu: gate and up differ in shape");
    with_elem!(g.dtype(), E => tensor(shape, swiglu::forward::<E>(slice::<E>(&g), slice::<E>(&u))))
}

/// The gradients of [`swiglu`]: `(dgate, dup)`.
pub(crate) fn swiglu_backward(
    gate: FlexTensor,
    up: FlexTensor,
    dy: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let (g, u, dy) = (contiguous(gate), contiguous(up), contiguous(dy));
    let shape = dims(&g);
    with_elem!(g.dtype(), E => {
        let (dg, du) = swiglu::backward::<E>(slice::<E>(&g), slice::<E>(&u), slice::<E>(&dy));
        (tensor(shape.clone(), dg), tensor(shape, du))
    })
}

/// Rotary embedding of `x[batch, seq, heads·d]` with tables `[seq, d]`; `inverse` for the
/// backward.
pub(crate) fn rope(
    x: FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    heads: usize,
    inverse: bool,
) -> FlexTensor {
    let x = contiguous(x);
    let shape = dims(&x);
    assert_eq!(
        shape.len(),
        3,
        "rope: expected [batch, seq, heads·d], got {shape:?}"
    );
    let (cos, sin) = (floats(cos), floats(sin));
    let (batch, seq) = (shape[0], shape[1]);
    let d = shape[2] / heads.max(1);
    let rows = cos.len() / d.max(1);
    assert!(
        d > 0
            && cos.len() == rows * d
            && sin.len() == cos.len()
            && (rows == seq || rows == batch * seq),
        "rope: tables of {} values for [batch {batch}, seq {seq}, heads {heads} · d {d}]",
        cos.len()
    );
    with_elem!(x.dtype(), E => tensor(shape, rope::apply::<E>(slice::<E>(&x), &cos, &sin, d, heads, inverse)))
}

/// The attention's shapes from its inputs (see [`attention::Dims`]).
fn attention_dims<'a>(
    q: &FlexTensor,
    k: &FlexTensor,
    mask: &FlexTensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> attention::Dims<'a> {
    let (qd, kd, md) = (dims(q), dims(k), dims(mask));
    assert!(
        qd.len() == 3 && kd.len() == 3,
        "attention: q {qd:?}, k {kd:?}: expected [batch, seq, heads·d]"
    );
    assert!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "attention: {heads} heads, {kv_heads} kv heads"
    );
    let head_dim = qd[2] / heads;
    assert_eq!(
        kd[2],
        kv_heads * head_dim,
        "attention: k has {} features for {kv_heads} heads of {head_dim}",
        kd[2]
    );
    let (batch, seq, keys) = (qd[0], qd[1], kd[1]);
    let n = md.len();
    assert!(
        n >= 2 && md[n - 2] == seq && md[n - 1] == keys,
        "attention: mask {md:?} for {seq} queries and {keys} keys"
    );
    let planes: usize = md[..n - 2].iter().product();
    assert!(
        planes == 1 || planes == batch,
        "attention: mask {md:?} for batch {batch}"
    );
    attention::Dims {
        rope: None,
        batch,
        seq,
        keys,
        heads,
        kv_heads,
        head_dim,
        scale: scale as f32,
        mask_per_batch: planes == batch && batch > 1,
    }
}

/// A boolean mask's bytes (1: masked), row-major.
fn mask_bytes(mask: &FlexTensor) -> Vec<u8> {
    let mask = contiguous(mask.clone());
    let (start, n) = (mask.layout().start_offset(), mask.layout().num_elements());
    mask.storage::<u8>()[start..start + n].to_vec()
}

/// Rotary tables as f32 when `rotary` (checked against the queries: `[seq, d]`).
fn tables(
    cos: &FlexTensor,
    sin: &FlexTensor,
    rotary: bool,
    d: &attention::Dims,
) -> Option<(Vec<f32>, Vec<f32>)> {
    rotary.then(|| {
        let (c, s) = (floats(cos), floats(sin));
        let rows = c.len() / d.head_dim.max(1);
        assert!(
            d.keys == d.seq
                && c.len() == rows * d.head_dim
                && (rows == d.seq || rows == d.batch * d.seq)
                && s.len() == c.len(),
            "attention: rotary tables for {} positions of {} (keys {})",
            d.seq,
            d.head_dim,
            d.keys
        );
        (c, s)
    })
}

/// Attention forward: the output `[batch, seq, heads·d]` and the softmax stats; with `rotary`,
/// `q` and `k` are rotated by `cos`, `sin` (`[seq, d]`) as they are read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: FlexTensor,
    (cos, sin, rotary): (&FlexTensor, &FlexTensor, bool),
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> (FlexTensor, FlexTensor) {
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let mut d = attention_dims(&q, &k, &mask, heads, kv_heads, scale);
    let m = mask_bytes(&mask);
    let rope = tables(cos, sin, rotary, &d);
    d.rope = rope.as_ref().map(|(c, s)| (c.as_slice(), s.as_slice()));
    with_elem!(q.dtype(), E => {
        let (out, stats) = attention::forward::<E>(slice::<E>(&q), slice::<E>(&k), slice::<E>(&v), &m, d);
        (tensor(dims(&q), out), tensor([d.batch, d.heads, d.seq, 2], stats))
    })
}

/// Attention backward: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: FlexTensor,
    stats: FlexTensor,
    dout: FlexTensor,
    (cos, sin, rotary): (&FlexTensor, &FlexTensor, bool),
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (q, k, v, dout) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(dout),
    );
    let mut d = attention_dims(&q, &k, &mask, heads, kv_heads, scale);
    let m = mask_bytes(&mask);
    let stats = floats(&stats);
    let rope = tables(cos, sin, rotary, &d);
    d.rope = rope.as_ref().map(|(c, s)| (c.as_slice(), s.as_slice()));
    with_elem!(q.dtype(), E => {
        let (dq, dk, dv) = attention::backward::<E>(
            slice::<E>(&q), slice::<E>(&k), slice::<E>(&v), &m, &stats, slice::<E>(&dout), d,
        );
        (tensor(dims(&q), dq), tensor(dims(&k), dk), tensor(dims(&v), dv))
    })
}

/// Cross-entropy of `logits[rows, vocab]` against `targets[rows]` (`-100`: not counted): the sum
/// (`[1]`, f32) and each row's log-sum-exp.
pub(crate) fn cross_entropy(logits: FlexTensor, targets: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let logits = contiguous(logits);
    let [rows, vocab] = two(&logits);
    let t = checked_targets(targets, rows, vocab);
    with_elem!(logits.dtype(), E => {
        let (sum, lse) = cross_entropy::forward::<E>(slice::<E>(&logits), &t, vocab);
        (tensor([1], vec![sum]), tensor([rows], lse))
    })
}

/// The logits' gradient of [`cross_entropy`] for the upstream gradient of the sum.
pub(crate) fn cross_entropy_backward(
    logits: FlexTensor,
    targets: &FlexTensor,
    lse: FlexTensor,
    dsum: FlexTensor,
) -> FlexTensor {
    let mut logits = exclusive(logits);
    let [rows, vocab] = two(&logits);
    let t = checked_targets(targets, rows, vocab);
    let lse = floats(&lse);
    let g = floats(&dsum)[0];
    with_elem!(logits.dtype(), E => {
        cross_entropy::backward_in_place::<E>(logits.storage_mut::<E>(), &t, &lse, vocab, g);
        logits
    })
}

fn checked_targets(targets: &FlexTensor, rows: usize, vocab: usize) -> Vec<i64> {
    let t = ints(targets);
    assert_eq!(
        t.len(),
        rows,
        "cross_entropy: {} targets for {rows} rows",
        t.len()
    );
    if let Some(bad) = t
        .iter()
        .find(|&&v| v != cross_entropy::IGNORE && !(0..vocab as i64).contains(&v))
    {
        panic!("cross_entropy: target {bad} outside the vocabulary 0..{vocab}");
    }
    t
}

/// Rows `ids` of `weight[vocab, h]` → `[ids, h]`.
pub(crate) fn embedding(weight: FlexTensor, ids: &FlexTensor) -> FlexTensor {
    let w = contiguous(weight);
    let [vocab, h] = two(&w);
    let ids = checked_ids(ids, vocab, "embedding");
    with_elem!(w.dtype(), E => {
        let table = slice::<E>(&w);
        let mut out = Vec::with_capacity(ids.len() * h);
        for &i in &ids {
            out.extend_from_slice(&table[i as usize * h..(i as usize + 1) * h]);
        }
        tensor([ids.len(), h], out)
    })
}

/// The gradient of [`embedding`]: `dy` rows added into `[vocab, h]` in f32, in token order.
pub(crate) fn embedding_backward(dy: FlexTensor, ids: &FlexTensor, vocab: usize) -> FlexTensor {
    let dy = contiguous(dy);
    let [n, h] = two(&dy);
    let ids = checked_ids(ids, vocab, "embedding backward");
    assert_eq!(
        ids.len(),
        n,
        "embedding backward: {} ids for {n} rows",
        ids.len()
    );
    with_elem!(dy.dtype(), E => {
        let dy = slice::<E>(&dy);
        // Blocks of vocabulary rows in parallel, each adding its tokens' rows in token order.
        let grad = parallel::new_rows(vocab * h, h, h + n, 0.0f32, |first, grad| {
            let rows = first..first + grad.len() / h.max(1);
            for (row, &i) in dy.chunks_exact(h.max(1)).zip(&ids) {
                let i = i as usize;
                if rows.contains(&i) {
                    let g = &mut grad[(i - rows.start) * h..(i - rows.start + 1) * h];
                    g.iter_mut().zip(row).for_each(|(g, &d)| *g += d.to_f32());
                }
            }
        });
        tensor([vocab, h], grad)
    })
}

fn checked_ids(ids: &FlexTensor, vocab: usize, what: &str) -> Vec<i64> {
    let ids = ints(ids);
    if let Some(bad) = ids.iter().find(|&&i| !(0..vocab as i64).contains(&i)) {
        panic!("{what}: token id {bad} outside the vocabulary 0..{vocab}");
    }
    ids
}

/// Whether the kernels run on tensors of `dtype`.
pub(crate) fn supports(dtype: DType) -> bool {
    tensor::supported(dtype)
}
