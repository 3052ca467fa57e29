//! The seed's recipe on the Llama: bf16 compute + fp32 master weights, and f16 compute + loss
//! scaler + fp32 master weights, follow f32 training's loss curve from the same init and data;
//! pure f16 (weights stored in f16, no scaler) visibly degrades.

mod common;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::{Mode, max_rel_dev, reload_from_model};
use kiln_models::{Context, Llama, LlamaConfig, causal_lm_loss};
use kiln_precision::{
    AdamWConfig, ParamGroup, Policy, cast_module, collect_grads, master_weights_for, write_back,
};

const STEPS: usize = 50;
const BATCH: usize = 4;
const SEQ: usize = 16;
/// Scales the loss down as a mean over many tokens would: raw gradients become small enough to
/// underflow in f16 without loss scaling; AdamW's trajectory does not depend on it.
const LOSS_WEIGHT: f32 = 1e-4;

fn config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}"#,
    )
    .unwrap()
}

/// A learnable sequence task: each token is the previous one plus a row-specific stride.
fn batch(config: &LlamaConfig, device: &Device) -> Tensor<2, Int> {
    let v = config.vocab_size as i64;
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| {
            let (row, t) = ((i / SEQ) as i64, (i % SEQ) as i64);
            (row * 5 + t * (row + 1)) % v
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), device)
}

fn train(init: &Llama, config: &LlamaConfig, mode: Mode) -> Vec<f32> {
    let device = Device::flex().autodiff();
    let policy = match mode {
        Mode::F32 => Policy::f32(),
        Mode::Bf16Master => Policy::bf16(),
        Mode::F16MasterScaler | Mode::F16Pure => Policy::fp16(),
    };
    let mut scaler = if mode == Mode::F16Pure {
        None
    } else {
        policy.loss_scaler()
    };
    // Norm gains take no weight decay, as in most Llama recipes.
    let groups = vec![
        ParamGroup {
            lr: 3e-4,
            weight_decay: 0.1,
        },
        ParamGroup {
            lr: 3e-4,
            weight_decay: 0.0,
        },
    ];
    let group_of = |p: &str| usize::from(p.ends_with("norm.weight"));
    let mut master = master_weights_for(init, group_of, groups, AdamWConfig::default()).unwrap();
    let mut model = cast_module(init.clone(), policy.compute);
    if mode == Mode::F16Pure {
        reload_from_model(&mut master, &model);
    }
    let ids = batch(config, &device);
    let ctx = Context::new(config, BATCH, SEQ, None, &device, policy.compute).unwrap();
    let mut losses = vec![];
    for _ in 0..STEPS {
        let loss = causal_lm_loss(model.forward(ids.clone(), &ctx), ids.clone()) * LOSS_WEIGHT;
        losses.push(loss.clone().into_scalar::<f32>() / LOSS_WEIGHT);
        let loss = match &scaler {
            Some(s) => s.scale_loss(loss),
            None => loss,
        };
        let grads = collect_grads(&model, &loss.backward()).unwrap();
        master
            .set_grads(grads.iter().map(|(p, g)| (p.as_str(), g)))
            .unwrap();
        master.step(scaler.as_mut()).unwrap();
        model = write_back(&master, model, policy.compute).unwrap();
        if mode == Mode::F16Pure {
            reload_from_model(&mut master, &model);
        }
    }
    losses
}

#[test]
fn llama_mixed_precision_tracks_f32_and_pure_f16_degrades() {
    let config = config();
    let init = Llama::random(&config, 3, &Device::flex().autodiff(), DType::F32).unwrap();
    let f32_curve = train(&init, &config, Mode::F32);
    let bf16 = train(&init, &config, Mode::Bf16Master);
    let f16 = train(&init, &config, Mode::F16MasterScaler);
    let pure = train(&init, &config, Mode::F16Pure);
    let (first, last) = (f32_curve[0], f32_curve[STEPS - 1]);
    let (dev_bf16, dev_f16, dev_pure) = (
        max_rel_dev(&bf16, &f32_curve),
        max_rel_dev(&f16, &f32_curve),
        max_rel_dev(&pure, &f32_curve),
    );
    eprintln!(
        "f32 {first:.4} -> {last:.4}; bf16+master -> {:.4} (max rel dev {dev_bf16:.2e}); f16+scaler+master -> {:.4} ({dev_f16:.2e}); pure f16 -> {:.4} ({dev_pure:.2e})",
        bf16[STEPS - 1],
        f16[STEPS - 1],
        pure[STEPS - 1]
    );
    assert!(last < 0.9 * first, "f32 training learns: {first} -> {last}");
    assert!(
        dev_bf16 < 0.02,
        "bf16 + master weights track f32: {dev_bf16}"
    );
    assert!(
        dev_f16 < 0.005,
        "f16 + scaler + master weights track f32: {dev_f16}"
    );
    assert!(
        dev_pure > 3.0 * dev_f16.max(1e-3),
        "pure f16 degrades: {dev_pure}"
    );
}
