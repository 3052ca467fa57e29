//! End to end on a tiny burn MLP whose fields are named like HF paths: bf16 compute + fp32 master
//! weights and f16 compute + loss scaler + fp32 master weights both track f32 training's loss
//! curve from the same init and data; pure f16 (weights stored in f16, no scaler) degrades.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};
use common::{Mode, max_rel_dev, reload_from_model};
use kiln_precision::{
    AdamWConfig, ParamGroup, Policy, cast_module, collect_grads, collect_params,
    master_weights_for, param_paths, write_back,
};

#[derive(Module, Debug)]
struct Mlp {
    model: Body,
}

#[derive(Module, Debug)]
struct Body {
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(d_in: usize, d_hidden: usize, d_out: usize, device: &Device) -> Self {
        Self {
            model: Body {
                up_proj: LinearConfig::new(d_in, d_hidden).init(device),
                down_proj: LinearConfig::new(d_hidden, d_out).init(device),
            },
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.model.up_proj.forward(x).tanh();
        self.model.down_proj.forward(h)
    }
}

const D_IN: usize = 16;
const D_HIDDEN: usize = 64;
const D_OUT: usize = 8;
const BATCH: usize = 128;
const STEPS: usize = 50;
/// A loss weight, as when a loss is averaged over many tokens: it makes the raw gradients small
/// (~1e-6 and below) without changing AdamW's trajectory, which is invariant to the loss scale.
const LOSS_WEIGHT: f32 = 1e-4;
const LR: f64 = 1e-3;

/// Deterministic inputs and a teacher's targets.
fn data(device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..BATCH * D_IN).map(|_| rnd()).collect();
    let teacher: Vec<f32> = (0..D_IN * D_OUT).map(|_| rnd() * 0.5).collect();
    let x = Tensor::<2>::from_data(TensorData::new(x, [BATCH, D_IN]), (device, DType::F32));
    let a = Tensor::<2>::from_data(
        TensorData::new(teacher, [D_IN, D_OUT]),
        (device, DType::F32),
    );
    let y = x.clone().matmul(a).sin();
    (x, y)
}

fn train(init: &Mlp, mode: Mode) -> Vec<f32> {
    let device = Device::flex().autodiff();
    let policy = match mode {
        Mode::F32 => Policy::f32(),
        Mode::Bf16Master => Policy::bf16(),
        Mode::F16MasterScaler | Mode::F16Pure => Policy::fp16(),
    };
    let mut scaler = match mode {
        Mode::F16Pure => None,
        _ => policy.loss_scaler(),
    };
    assert_eq!(scaler.is_some(), mode == Mode::F16MasterScaler);
    let groups = vec![
        ParamGroup {
            lr: LR,
            weight_decay: 0.1,
        },
        ParamGroup {
            lr: LR,
            weight_decay: 0.0,
        },
    ];
    let group_of = |p: &str| usize::from(p.ends_with(".bias"));
    let mut master = master_weights_for(init, group_of, groups, AdamWConfig::default()).unwrap();
    let mut model = cast_module(init.clone(), policy.compute);
    if mode == Mode::F16Pure {
        // Without master weights the weights are the f16 values.
        reload_from_model(&mut master, &model);
    }
    let (x, y) = data(&device);
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let pred = model.forward(x.clone().cast(policy.compute));
        let diff = pred.cast(DType::F32) - y.clone();
        let loss = (diff.clone() * diff).mean().mul_scalar(LOSS_WEIGHT);
        losses.push(loss.clone().into_data().try_to_vec::<f32>().unwrap()[0] / LOSS_WEIGHT);
        let loss = match &scaler {
            Some(s) => s.scale_loss(loss),
            None => loss,
        };
        let grads = loss.backward();
        let grads = collect_grads(&model, &grads).unwrap();
        assert_eq!(grads.len(), 4);
        for (_, g) in &grads {
            assert_eq!(
                g.dtype(),
                policy.compute,
                "gradients come in the compute dtype"
            );
        }
        master
            .set_grads(grads.iter().map(|(p, g)| (p.as_str(), g)))
            .unwrap();
        master.step(scaler.as_mut()).unwrap();
        model = write_back(&master, model, policy.compute).unwrap();
        if mode == Mode::F16Pure {
            reload_from_model(&mut master, &model);
        }
    }
    if let Some(s) = &scaler {
        assert!(s.warning().is_none());
        assert!(s.scale() >= 1.0);
    }
    losses
}

#[test]
fn paths_are_hf_style_field_names() {
    let device = Device::flex().autodiff();
    let m = Mlp::new(D_IN, D_HIDDEN, D_OUT, &device);
    assert_eq!(
        param_paths(&m),
        [
            "model.up_proj.weight",
            "model.up_proj.bias",
            "model.down_proj.weight",
            "model.down_proj.bias"
        ]
    );
    let cast = cast_module(m, DType::BF16);
    for p in collect_params(&cast).unwrap() {
        assert_eq!(p.data.dtype(), DType::BF16, "{}", p.path);
        assert!(p.require_grad, "{} stays trainable after the cast", p.path);
    }
}

#[test]
fn frozen_parameters_get_no_master_copy_and_are_left_alone() {
    let device = Device::flex().autodiff();
    let mut m = Mlp::new(D_IN, D_HIDDEN, D_OUT, &device);
    m.model.up_proj = m.model.up_proj.no_grad();
    let master = master_weights_for(
        &m,
        |_| 0,
        vec![ParamGroup::default()],
        AdamWConfig::default(),
    )
    .unwrap();
    let paths: Vec<_> = master
        .layout()
        .entries()
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(paths, ["model.down_proj.weight", "model.down_proj.bias"]);
    assert_eq!(
        master.optimizer_state().exp_avg.len(),
        D_HIDDEN * D_OUT + D_OUT
    );
    let before = collect_params(&m).unwrap();
    let m = write_back(&master, cast_module(m, DType::BF16), DType::BF16).unwrap();
    let after = collect_params(&m).unwrap();
    assert_eq!(after[0].data.dtype(), DType::BF16);
    assert!(!after[0].require_grad);
    assert!(after[2].require_grad);
    assert_eq!(before.len(), after.len());
}

#[test]
fn mixed_precision_tracks_f32_training_and_pure_f16_degrades() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let init = Mlp::new(D_IN, D_HIDDEN, D_OUT, &device);

    let f32_curve = train(&init, Mode::F32);
    let bf16_curve = train(&init, Mode::Bf16Master);
    let f16_curve = train(&init, Mode::F16MasterScaler);
    let pure_curve = train(&init, Mode::F16Pure);

    let first = f32_curve[0];
    let last = f32_curve[STEPS - 1];
    let dev_bf16 = max_rel_dev(&bf16_curve, &f32_curve);
    let dev_f16 = max_rel_dev(&f16_curve, &f32_curve);
    let dev_pure = max_rel_dev(&pure_curve, &f32_curve);
    eprintln!("f32 loss {first:.5} -> {last:.5}");
    eprintln!(
        "bf16+master -> {:.5} (max rel dev {dev_bf16:.2e}); f16+scaler+master -> {:.5} ({dev_f16:.2e}); pure f16 -> {:.5} ({dev_pure:.2e})",
        bf16_curve[STEPS - 1],
        f16_curve[STEPS - 1],
        pure_curve[STEPS - 1]
    );
    assert!(last < 0.7 * first, "f32 training learns: {first} -> {last}");
    assert!(dev_bf16 < 0.02, "bf16 + master tracks f32: {dev_bf16}");
    assert!(
        dev_f16 < 0.005,
        "f16 + scaler + master tracks f32: {dev_f16}"
    );
    assert!(
        dev_pure > 5.0 * dev_f16.max(1e-3),
        "pure f16 degrades: {dev_pure}"
    );
}
