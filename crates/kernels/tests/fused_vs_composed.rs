//! Every fused kernel equals burn's composition of the same math (`kiln_kernels::composed`), in
//! value and in every gradient, on odd shapes: in f32 to rounding, in bf16 to bf16 precision.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use kiln_kernels::composed;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn device() -> Device {
    Device::flex().autodiff()
}

fn input<const D: usize>(dims: [usize; D], seed: u64, dtype: DType) -> Tensor<D> {
    let n = dims.iter().product();
    Tensor::<D>::from_data(
        TensorData::new(values(n, seed), dims),
        (&device(), DType::F32),
    )
    .cast(dtype)
    .require_grad()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

/// The largest difference relative to the reference's largest magnitude.
fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 2e-5,
        _ => 3e-2,
    }
}

/// Runs `f` on fresh copies of `inputs` twice (fused and composed), seeds both backwards with the
/// same upstream gradient, and compares the outputs and each input's gradient.
fn check<const D: usize, const O: usize>(
    name: &str,
    dtype: DType,
    inputs: &[Tensor<D>],
    fused: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
    reference: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
) {
    let run = |f: &dyn Fn(Vec<Tensor<D>>) -> Tensor<O>| {
        let xs: Vec<Tensor<D>> = inputs
            .iter()
            .map(|t| t.clone().detach().require_grad())
            .collect();
        let y = f(xs.clone());
        let dims = y.dims();
        let g = Tensor::<O>::from_data(
            TensorData::new(values(dims.iter().product(), 99), dims),
            (&y.device(), DType::F32),
        )
        .cast(y.dtype());
        let grads = (y.clone().cast(DType::F32) * g.cast(DType::F32))
            .sum()
            .backward();
        let dx: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| to_vec(x.grad(&grads).expect("gradient")))
            .collect();
        (to_vec(y), dx)
    };
    let (y, dx) = run(&fused);
    let (y_ref, dx_ref) = run(&reference);
    let tol = tolerance(dtype);
    let e = rel(&y, &y_ref);
    assert!(
        e <= tol,
        "{name} {dtype:?}: output differs by {e:e} (tolerance {tol:e})"
    );
    for (i, (a, b)) in dx.iter().zip(&dx_ref).enumerate() {
        let e = rel(a, b);
        assert!(
            e <= tol,
            "{name} {dtype:?}: gradient of input {i} differs by {e:e}"
        );
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn linear_equals_matmul_by_the_transpose() {
    for dtype in DTYPES {
        let (x, w) = (input([3, 5, 17], 1, dtype), input([7, 17], 2, dtype));
        let split = |v: Vec<Tensor<3>>| (v[0].clone(), v[1].clone().reshape([7, 17]));
        check(
            "linear",
            dtype,
            &[x, w.reshape([1, 7, 17])],
            |v| {
                let (x, w) = split(v);
                kiln_kernels::linear(x, w)
            },
            |v| {
                let (x, w) = split(v);
                composed::linear(x, w)
            },
        );
    }
}

#[test]
fn rms_norm_equals_the_composition() {
    for dtype in DTYPES {
        let (x, w) = (input([2, 9, 33], 3, dtype), input([1, 1, 33], 4, dtype));
        let split = |v: Vec<Tensor<3>>| (v[0].clone(), v[1].clone().reshape([33]));
        check(
            "rms_norm",
            dtype,
            &[x, w],
            |v| {
                let (x, w) = split(v);
                kiln_kernels::rms_norm(x, w, 1e-5)
            },
            |v| {
                let (x, w) = split(v);
                composed::rms_norm(x, w, 1e-5)
            },
        );
    }
}

#[test]
fn swiglu_equals_silu_times_up() {
    for dtype in DTYPES {
        let (g, u) = (input([4, 37], 5, dtype), input([4, 37], 6, dtype));
        check(
            "swiglu",
            dtype,
            &[g.mul_scalar(4.0), u],
            |v| kiln_kernels::swiglu(v[0].clone(), v[1].clone()),
            |v| composed::swiglu(v[0].clone(), v[1].clone()),
        );
    }
}

fn tables(seq: usize, d: usize) -> (Tensor<2>, Tensor<2>) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..seq {
        for _ in 0..2 {
            for i in 0..d / 2 {
                let angle = p as f32 / 10000f32.powf(2.0 * i as f32 / d as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let t =
        |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [seq, d]), (&device(), DType::F32));
    (t(cos), t(sin))
}

#[test]
fn rope_equals_rotate_half() {
    for dtype in DTYPES {
        let (cos, sin) = tables(5, 8);
        check(
            "rope",
            dtype,
            &[input([2, 5, 24], 7, dtype)],
            |v| kiln_kernels::rope(v[0].clone(), cos.clone(), sin.clone(), 3),
            |v| composed::rope(v[0].clone(), cos.clone(), sin.clone(), 3),
        );
    }
}

/// Packed rows: a table row per token (`[batch·seq, d]`), each token at its own position.
#[test]
fn rope_with_a_table_row_per_token_equals_rotate_half() {
    for dtype in DTYPES {
        let (cos, sin) = tables(2 * 5, 8);
        check(
            "rope per token",
            dtype,
            &[input([2, 5, 24], 17, dtype)],
            |v| kiln_kernels::rope(v[0].clone(), cos.clone(), sin.clone(), 3),
            |v| composed::rope(v[0].clone(), cos.clone(), sin.clone(), 3),
        );
    }
}

/// Causal, with the first two keys of batch row 1 padded (its query 0 and 1 see no key).
fn mask(batch: usize, seq: usize) -> Tensor<4, Bool> {
    let mut m = Vec::new();
    for b in 0..batch {
        for q in 0..seq {
            for k in 0..seq {
                m.push(k > q || (b == 1 && k < 2));
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [batch, 1, seq, seq]), &device())
}

#[test]
fn attention_equals_eager_attention() {
    for dtype in DTYPES {
        for (heads, kv_heads) in [(4, 4), (4, 2), (6, 1)] {
            let (b, s, d) = (2, 70, 8);
            let m = mask(b, s);
            let split = |v: Vec<Tensor<3>>| (v[0].clone(), v[1].clone(), v[2].clone());
            let scale = (d as f64).powf(-0.5);
            check(
                &format!("attention {heads}/{kv_heads}"),
                dtype,
                &[
                    input([b, s, heads * d], 8, dtype).mul_scalar(3.0),
                    input([b, s, kv_heads * d], 9, dtype).mul_scalar(3.0),
                    input([b, s, kv_heads * d], 10, dtype),
                ],
                |v| {
                    let (q, k, vv) = split(v);
                    kiln_kernels::attention(q, k, vv, m.clone(), None, heads, kv_heads, scale)
                },
                |v| {
                    let (q, k, vv) = split(v);
                    composed::attention(q, k, vv, m.clone(), heads, kv_heads, scale)
                },
            );
        }
    }
}

#[test]
fn attention_with_rotary_equals_rope_then_attention() {
    for dtype in DTYPES {
        let (b, s, d, heads, kv_heads) = (2, 40, 8, 4, 2);
        let m = mask(b, s);
        let (cos, sin) = tables(s, d);
        let split = |v: Vec<Tensor<3>>| (v[0].clone(), v[1].clone(), v[2].clone());
        let scale = (d as f64).powf(-0.5);
        check(
            "attention with rope",
            dtype,
            &[
                input([b, s, heads * d], 12, dtype).mul_scalar(3.0),
                input([b, s, kv_heads * d], 13, dtype).mul_scalar(3.0),
                input([b, s, kv_heads * d], 14, dtype),
            ],
            |v| {
                let (q, k, vv) = split(v);
                let rotary = Some((cos.clone(), sin.clone()));
                kiln_kernels::attention(q, k, vv, m.clone(), rotary, heads, kv_heads, scale)
            },
            |v| {
                let (q, k, vv) = split(v);
                let q = composed::rope(q, cos.clone(), sin.clone(), heads);
                let k = composed::rope(k, cos.clone(), sin.clone(), kv_heads);
                composed::attention(q, k, vv, m.clone(), heads, kv_heads, scale)
            },
        );
    }
}

#[test]
fn attention_with_per_token_rotary_equals_rope_then_attention() {
    for dtype in DTYPES {
        let (b, s, d, heads, kv_heads) = (3, 33, 8, 4, 2);
        let m = mask(b, s);
        let (cos, sin) = tables(b * s, d);
        let split = |v: Vec<Tensor<3>>| (v[0].clone(), v[1].clone(), v[2].clone());
        let scale = (d as f64).powf(-0.5);
        check(
            "attention with per-token rope",
            dtype,
            &[
                input([b, s, heads * d], 22, dtype).mul_scalar(3.0),
                input([b, s, kv_heads * d], 23, dtype).mul_scalar(3.0),
                input([b, s, kv_heads * d], 24, dtype),
            ],
            |v| {
                let (q, k, vv) = split(v);
                let rotary = Some((cos.clone(), sin.clone()));
                kiln_kernels::attention(q, k, vv, m.clone(), rotary, heads, kv_heads, scale)
            },
            |v| {
                let (q, k, vv) = split(v);
                let q = composed::rope(q, cos.clone(), sin.clone(), heads);
                let k = composed::rope(k, cos.clone(), sin.clone(), kv_heads);
                composed::attention(q, k, vv, m.clone(), heads, kv_heads, scale)
            },
        );
    }
}

#[test]
fn cross_entropy_equals_log_softmax_pick() {
    for dtype in DTYPES {
        let targets: Vec<i64> = (0..11)
            .map(|i| if i % 4 == 3 { -100 } else { (i * 7) % 29 })
            .collect();
        let t = Tensor::<1, Int>::from_data(TensorData::new(targets, [11]), &device());
        check(
            "cross_entropy",
            dtype,
            &[input([11, 29], 11, dtype).mul_scalar(5.0)],
            |v| kiln_kernels::cross_entropy_sum(v[0].clone(), t.clone()),
            |v| composed::cross_entropy_sum(v[0].clone(), t.clone()),
        );
    }
}

/// A kernel's result does not depend on how many threads run it.
#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let x = input([4, 96, 256], 21, DType::F32);
                let w = input([688, 256], 22, DType::F32);
                let y = kiln_kernels::linear(x.clone(), w.clone());
                let y = kiln_kernels::rms_norm(y, input([688], 23, DType::F32), 1e-5);
                let grads = y.clone().sum().backward();
                (
                    to_vec(y),
                    to_vec(x.grad(&grads).unwrap()),
                    to_vec(w.grad(&grads).unwrap()),
                )
            })
    };
    assert!(run(1) == run(2), "1 and 2 threads give different bits");
}

/// A batch row's output and its share of the weight gradient do not depend on the other rows
/// of the batch: micro-batches and ranks that split a batch along its rows compute each row as
/// the whole batch does.
#[test]
fn a_batch_row_does_not_depend_on_the_batch_around_it() {
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(batch_rows_are_independent);
    }
}

fn batch_rows_are_independent() {
    for (k, n, dtype) in [
        (32, 48, DType::F32),
        (256, 688, DType::F32),
        (17, 5, DType::F32),
        (600, 40, DType::F32),
        (64, 48, DType::BF16),
    ] {
        let x = input([12, 8, k], 31, dtype).detach();
        let w = input([n, k], 32, dtype).detach();
        let whole = to_vec(kiln_kernels::linear(x.clone(), w.clone()));
        for (start, rows) in [(0, 2), (2, 2), (5, 1), (4, 8)] {
            let part = to_vec(kiln_kernels::linear(
                x.clone().narrow(0, start, rows),
                w.clone(),
            ));
            let (a, b) = (start * 8 * n, (start + rows) * 8 * n);
            assert!(
                part == whole[a..b],
                "linear {k}->{n}: batch rows {start}..{} differ inside a batch of 12",
                start + rows
            );
        }
    }
}

#[test]
fn weight_gradient_is_the_sum_of_per_row_gradients() {
    let (k, n) = (32, 48);
    let x = input([12, 8, k], 41, DType::F32);
    let w = input([n, k], 42, DType::F32);
    let g = input([12, 8, n], 43, DType::F32).detach();
    let dw = |x: Tensor<3>, g: Tensor<3>| {
        let y = kiln_kernels::linear(x, w.clone());
        let grads = (y * g).sum().backward();
        to_vec(w.grad(&grads).unwrap())
    };
    let whole = dw(x.clone(), g.clone());
    let mut acc = vec![0.0f32; n * k];
    for r in 0..12 {
        let part = dw(x.clone().narrow(0, r, 1), g.clone().narrow(0, r, 1));
        for (a, p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
    let diff = whole.iter().zip(&acc).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{diff} of {} elements differ", n * k);
}

#[test]
fn embedding_equals_the_gather_and_its_scatter() {
    for dtype in DTYPES {
        let ids: Vec<i64> = (0..24).map(|i| (i * 7 % 13) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [3, 8]), &device());
        check(
            "embedding",
            dtype,
            &[input([13, 9], 51, dtype)],
            |v| kiln_kernels::embedding(v[0].clone(), ids.clone()),
            |v| composed::embedding(v[0].clone(), ids.clone()),
        );
    }
}
