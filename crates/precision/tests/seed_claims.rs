//! The three claims of the mixed-precision recipe, each shown on real burn tensors (flex device).

use burn::tensor::{DType, Device, Tensor, TensorData, f16};
use kiln_precision::{AdamWConfig, DynamicLossScaler, MasterWeights, ParamGroup};

/// `loss = c · Σ w·x` with the product in f16 and the reduction weight `c` in f32 (like a mean
/// over a large batch): dL/dw = c·x, here 1e-4 · 1e-4 = 1e-8, below f16's smallest subnormal.
fn small_grad_in_f16(scaler: Option<&DynamicLossScaler>) -> (Vec<f32>, Vec<f32>) {
    let device = Device::flex().autodiff();
    let n = 8;
    let x = Tensor::<1>::from_data(
        TensorData::new(vec![1e-4f32; n], [n]),
        (&device, DType::F16),
    );
    let w = Tensor::<1>::from_data(TensorData::new(vec![0.5f32; n], [n]), (&device, DType::F16))
        .require_grad();
    let loss = (w.clone() * x).sum().cast(DType::F32).mul_scalar(1e-4);
    let loss = match scaler {
        Some(s) => s.scale_loss(loss),
        None => loss,
    };
    let grads = loss.backward();
    let g = w.grad(&grads).expect("w has a gradient");
    assert_eq!(g.dtype(), DType::F16, "the gradient is computed in f16");
    let raw: Vec<f32> = g
        .into_data()
        .as_slice::<f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    // What the master weights see: f32 copy, unscaled.
    let mut master = MasterWeights::from_params(
        [("w", &TensorData::new(vec![0.5f32; n], [n]))],
        |_| 0,
        vec![ParamGroup::default()],
        AdamWConfig::default(),
    )
    .unwrap();
    let g16 = TensorData::new(raw.iter().map(|&v| f16::from_f32(v)).collect(), [n]);
    master.set_grad("w", &g16).unwrap();
    let found_inf = master.unscale_grads(scaler.map_or(1.0, |s| s.inv_scale()));
    assert!(!found_inf);
    (raw, master.grads().to_vec())
}

#[test]
fn small_gradients_underflow_to_zero_in_f16_without_scaling_and_survive_with_it() {
    let truth = 1e-4f32 * 1e-4f32;
    assert!(
        truth < f16::from_bits(1).to_f32(),
        "1e-8 is below the smallest f16 subnormal"
    );

    let (raw, unscaled) = small_grad_in_f16(None);
    assert!(raw.iter().all(|&g| g == 0.0), "no scaling: {raw:?}");
    assert!(unscaled.iter().all(|&g| g == 0.0));

    let scaler = DynamicLossScaler::default();
    let (raw, unscaled) = small_grad_in_f16(Some(&scaler));
    assert!(
        raw.iter().all(|&g| g > 0.0 && g.is_finite()),
        "scaled: {raw:?}"
    );
    for g in unscaled {
        // f16 inputs (1e-4 -> 1.0002e-4) and f16 rounding of the scaled gradient: ~1e-3 relative.
        assert!(
            (g - truth).abs() <= 2e-3 * truth,
            "unscaled {g:e} vs {truth:e}"
        );
    }
}

#[test]
fn update_below_f16_resolution_is_lost_on_f16_weights_and_kept_by_fp32_master() {
    let device = Device::flex();
    let lr = 1e-4;
    let steps = 100;
    // The update is smaller than half an f16 ulp at 1.0 (2^-11 / 2).
    assert!(lr < 2f64.powi(-12));

    // Pure f16 weights: w -= lr·g (g = 1), in f16.
    let mut w16 =
        Tensor::<1>::from_data(TensorData::new(vec![1.0f32; 4], [4]), (&device, DType::F16));
    for _ in 0..steps {
        w16 = w16.sub_scalar(lr);
    }
    let w16: Vec<f32> = w16.cast(DType::F32).into_data().try_to_vec().unwrap();
    assert!(
        w16.iter().all(|&w| w == 1.0),
        "f16 weights never moved: {w16:?}"
    );

    // fp32 master weights, AdamW with a constant gradient of 1: m̂ = v̂ = 1, so every step moves
    // each weight by lr / (1 + eps), the same update that was lost above.
    let mut master = MasterWeights::from_params(
        [("w", &TensorData::new(vec![1.0f32; 4], [4]))],
        |_| 0,
        vec![ParamGroup {
            lr,
            weight_decay: 0.0,
        }],
        AdamWConfig::default(),
    )
    .unwrap();
    for _ in 0..steps {
        master.grads_mut().fill(1.0);
        assert!(master.step(None).unwrap().stepped);
    }
    let expect = 1.0 - steps as f64 * lr;
    for &w in master.params() {
        assert!(
            (f64::from(w) - expect).abs() < 1e-5,
            "master {w} vs {expect}"
        );
    }
    // ... and the compute copy written back in f16 shows the progress.
    let back = master.param_data("w", DType::F16).unwrap();
    for v in back.as_slice::<f16>().unwrap() {
        assert!(
            (f64::from(v.to_f32()) - expect).abs() < 5e-4,
            "f16 copy {v}"
        );
        assert!(v.to_f32() < 1.0);
    }
}

#[test]
fn bf16_keeps_the_range_where_f16_overflows() {
    let device = Device::flex();
    let xs = vec![300.0f32, 70000.0, 1e10, -1e5];
    let t = Tensor::<1>::from_data(TensorData::new(xs.clone(), [4]), (&device, DType::F32));
    // Casting: everything above 65504 is inf in f16, finite in bf16.
    let h: Vec<f32> = t
        .clone()
        .cast(DType::F16)
        .cast(DType::F32)
        .into_data()
        .try_to_vec()
        .unwrap();
    let b: Vec<f32> = t
        .clone()
        .cast(DType::BF16)
        .cast(DType::F32)
        .into_data()
        .try_to_vec()
        .unwrap();
    assert!(
        h[0].is_finite() && h[1..].iter().all(|v| v.is_infinite()),
        "{h:?}"
    );
    assert!(b.iter().all(|v| v.is_finite()), "{b:?}");
    for (x, v) in xs.iter().zip(&b) {
        assert!(((x - v) / x).abs() < 2f32.powi(-8), "bf16 {v} vs {x}");
    }
    // Computing: 300² = 90000 overflows in f16 arithmetic, not in bf16.
    let sq = |dtype| -> f32 {
        let a = Tensor::<1>::from_data(TensorData::new(vec![300.0f32], [1]), (&device, dtype));
        (a.clone() * a)
            .cast(DType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()[0]
    };
    assert!(sq(DType::F16).is_infinite());
    let v = sq(DType::BF16);
    assert!(
        v.is_finite() && (v - 90000.0).abs() / 90000.0 < 2f32.powi(-8),
        "{v}"
    );
}
