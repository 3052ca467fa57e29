//! A LoRA adapter attached to a `Linear` weight (burn's `LoraAdapter`, as kiln-lora attaches it)
//! runs on activations: checked against the dense `x (W0 + s B A)ᵀ` computed here by hand, and
//! its dropout against the definition of inverted dropout.

use burn::module::{LoraAdapter, Module, Param, Reparameterizer};
use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_models::layers::Init;
use kiln_models::{AdapterDropout, Linear, ParamSource, RandomInit, SplitMix64};

fn device() -> Device {
    Device::flex()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn tensor<const D: usize>(v: Vec<f32>, dims: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, dims), &device())
}

/// Attaches `scale · a b` (burn orientation: `a = B [out, r]`, `b = A [r, in]`) to `weight`.
struct Attach {
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
}

impl Reparameterizer for Attach {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        if path != "weight" {
            return (param, None);
        }
        let adapter = LoraAdapter {
            a: Param::from_tensor(self.a.clone()),
            b: Param::from_tensor(self.b.clone()),
            scale: self.scale,
        };
        (param, Some(adapter))
    }
}

/// A `[out, in]` linear layer (random weight) with a rank-`r` adapter: `(layer, W0, B, A)`.
fn adapted(out: usize, inp: usize, r: usize, scale: f64) -> (Linear, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut source = RandomInit::new(3, &device(), DType::F32);
    let layer = Linear::load(&mut source, "model.layers.0.self_attn.q_proj", out, inp).unwrap();
    let w0: Vec<f32> = layer
        .weight
        .val()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let (b, a) = (values(out * r, 5), values(r * inp, 6));
    let layer = layer.apply_reparameterization(Attach {
        a: tensor(b.clone(), [out, r]),
        b: tensor(a.clone(), [r, inp]),
        scale,
    });
    (layer, w0, b, a)
}

#[test]
fn an_attached_adapter_computes_the_dense_merged_weight_on_activations() {
    let (out, inp, r, scale) = (6, 5, 2, 1.5);
    let (layer, w0, b, a) = adapted(out, inp, r, scale);
    let rows = 7;
    let x = values(rows * inp, 9);
    // y = x (W0 + s B A)ᵀ in f64.
    let mut want = vec![0f64; rows * out];
    for i in 0..rows {
        for o in 0..out {
            for k in 0..inp {
                let ba: f64 = (0..r)
                    .map(|j| b[o * r + j] as f64 * a[j * inp + k] as f64)
                    .sum();
                let w = w0[o * inp + k] as f64 + scale * ba;
                want[i * out + o] += x[i * inp + k] as f64 * w;
            }
        }
    }
    let x = tensor(x, [1, rows, inp]);
    for (name, y) in [
        ("forward", layer.forward(x.clone())),
        ("forward_few_rows", layer.forward_few_rows(x.clone())),
        (
            "forward_with p = 0",
            layer.forward_with(x.clone(), Some(&AdapterDropout::new(0.0, 1, 0).unwrap())),
        ),
    ] {
        let y: Vec<f32> = y.into_data().try_into_vec::<f32>().unwrap();
        for (g, w) in y.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name}: {g} vs {w}"
            );
        }
    }
    // The weight's own value (burn's weight-space composition) agrees.
    let dense: Vec<f32> = x
        .matmul(layer.weight.val().transpose().unsqueeze())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    for (g, w) in dense.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0));
    }
}

/// With `A = B = I` and scale 1 the adapter's output is its (dropped-out) input.
fn identity_adapter(d: usize) -> Linear {
    let eye: Vec<f32> = (0..d * d)
        .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
        .collect();
    let mut source = RandomInit::new(3, &device(), DType::F32);
    let layer = Linear::load(&mut source, "model.layers.1.mlp.up_proj", d, d).unwrap();
    layer.apply_reparameterization(Attach {
        a: tensor(eye.clone(), [d, d]),
        b: tensor(eye, [d, d]),
        scale: 1.0,
    })
}

#[test]
fn dropout_acts_on_the_adapter_input_only_zeroing_p_and_scaling_the_rest() {
    let (rows, seq, d) = (8, 16, 64);
    let layer = identity_adapter(d);
    let x = values(rows * seq * d, 21);
    let xt = tensor(x.clone(), [rows, seq, d]);
    let base: Vec<f32> = xt
        .clone()
        .matmul(layer.weight.base().transpose().unsqueeze())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    for p in [0.1, 0.5] {
        let dropout = AdapterDropout::new(p, 42, 0).unwrap();
        let y: Vec<f32> = layer
            .forward_with(xt.clone(), Some(&dropout))
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let mut dropped = 0usize;
        for i in 0..x.len() {
            // The base path is untouched; the adapter path is 0 or x / (1 - p).
            let adapter = y[i] - base[i];
            let kept = x[i] / (1.0 - p as f32);
            if adapter.abs() <= 1e-5 {
                dropped += 1;
            } else {
                assert!(
                    (adapter - kept).abs() <= 1e-4 * kept.abs().max(1.0),
                    "{adapter} vs {kept}"
                );
            }
        }
        let n = x.len() as f64;
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!(
            (dropped as f64 - n * p).abs() <= 5.0 * sigma,
            "p = {p}: dropped {dropped} of {n}"
        );
    }
}

#[test]
fn the_mask_depends_on_seed_layer_and_global_row_only() {
    let d = AdapterDropout::new(0.3, 7, 0).unwrap();
    let dims = [6, 3, 5];
    let mask = |d: &AdapterDropout, dims: [usize; 3], salt: u64| -> Vec<f32> {
        d.mask(dims, salt, &device(), DType::F32)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let whole = mask(&d, dims, 1);
    // The documented definition, element by element: draw k of layer `salt` is 32-bit half
    // k % 2 of output k / 2 of the stream seeded SplitMix64::at(seed, salt); it keeps when it is
    // at or above p · 2³².
    let stream = SplitMix64::at(7, 1);
    let want: Vec<f32> = (0..6 * 3 * 5u64)
        .map(|k| {
            let draw = (SplitMix64::at(stream, k / 2) >> (32 * (k % 2))) & 0xffff_ffff;
            match draw as f64 >= 0.3 * 4_294_967_296.0 {
                true => 1.0,
                false => 0.0,
            }
        })
        .collect();
    assert_eq!(whole, want);
    assert_eq!(
        whole,
        mask(&d, dims, 1),
        "the same draw twice (a recompute)"
    );
    assert_ne!(whole, mask(&d, dims, 2), "another layer");
    assert_ne!(
        whole,
        mask(&AdapterDropout::new(0.3, 8, 0).unwrap(), dims, 1),
        "another step"
    );
    // Row 0 as one batch and rows 1..6 as another (two ranks, or two micro-batches; a row of 15
    // draws, so the second starts on an odd draw) drop what the whole batch drops.
    let mut split = mask(&d, [1, 3, 5], 1);
    split.extend(mask(&d.skip_rows(1), [5, 3, 5], 1));
    assert_eq!(whole, split);
    assert!(AdapterDropout::new(1.0, 0, 0).is_err());
    assert!(AdapterDropout::new(-0.1, 0, 0).is_err());
}

#[test]
fn a_layer_without_adapter_ignores_dropout() {
    let mut source = RandomInit::new(3, &device(), DType::F32);
    let w = source.tensor("w", [4, 3], Init::Normal).unwrap();
    let layer = Linear {
        weight: Param::from_tensor(w),
        salt: 1,
    };
    let x = tensor(values(2 * 3, 4), [2, 3]);
    let dropout = AdapterDropout::new(0.5, 1, 0).unwrap();
    let a: Vec<f32> = layer
        .forward(x.clone())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let b: Vec<f32> = layer
        .forward_with(x, Some(&dropout))
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(a, b);
}
