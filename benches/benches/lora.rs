//! LoRA vs full fine-tuning on the reference Llama (hidden 256, intermediate 688, 4 layers,
//! 8 heads, vocab 4096, untied; batch 8 x 128; f32, random init):
//! forward+backward time (LoRA with and without `lora_dropout`), and trainable / gradient /
//! AdamW-state bytes; plus inference forward time of the base, the unmerged adapter and the merged
//! adapter. Group `lora layer`: one adapted linear layer, forward+backward computed on
//! activations (`x W0ᵀ + s·x Aᵀ Bᵀ`, what kiln-models' `Linear` runs) vs through the dense
//! weight (`x (W0 + s·B A)ᵀ`, what `weight.val()` of burn's reparameterization gives any module).
//!
//! `cargo bench -p kiln-benches --bench lora` (prints the bytes table first).

use std::time::Duration;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_lora::{LoraConfig, LoraModel};
use kiln_models::{AdapterDropout, Context, Linear, Llama, LlamaConfig, causal_lm_loss};

const BATCH: usize = 8;
const SEQ: usize = 128;

fn reference_config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 32, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false}"#,
    )
    .expect("reference config")
}

fn inputs(config: &LlamaConfig, device: &Device) -> (Tensor<2, Int>, Context) {
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| ((i * 2_654_435_761) % config.vocab_size) as i64)
        .collect();
    let ids = Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), device);
    let ctx = Context::new(config, BATCH, SEQ, None, device, DType::F32).expect("context");
    (ids, ctx)
}

/// r = 8 on q_proj and v_proj (PEFT's Llama default targets), alpha 16.
fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 16.0,
        ..LoraConfig::default()
    }
}

/// One AdamW step on `model`'s gradients; returns the bytes of optimizer state it then holds.
fn adamw_state_bytes<M: Module>(model: M, grads: GradientsParams) -> usize {
    let mut optim = AdamWConfig::new().init();
    let _ = optim.step(1e-3, model, grads);
    optim.to_record().into_bytes().map(|b| b.len()).unwrap_or(0)
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

fn print_bytes_table(config: &LlamaConfig) {
    let device = Device::flex().autodiff();
    let (ids, ctx) = inputs(config, &device);
    let model = Llama::random(config, 0, &device, DType::F32).expect("model");
    let all = model.num_params();

    let loss = causal_lm_loss(model.forward(ids.clone(), &ctx), ids.clone());
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let full_grads = grads.len();
    let full_state = adamw_state_bytes(model.clone(), grads);

    let mut lora = LoraModel::new(model);
    lora.add_adapter("bench", lora_config(), 0)
        .expect("adapter");
    let counts = lora.trainable_parameters();
    let loss = causal_lm_loss(lora.model().forward(ids.clone(), &ctx), ids);
    let grads = GradientsParams::from_grads(loss.backward(), lora.model());
    let lora_grads = grads.len();
    let lora_state = adamw_state_bytes(lora.model().clone(), grads);

    println!("\nLoRA vs full fine-tune, reference Llama ({all} parameters, f32, AdamW)");
    println!(
        "| setup | trainable params | trainable % | tensors with grads | grad bytes | AdamW state bytes (measured) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| full fine-tune | {all} | 100.0000 | {full_grads} | {} | {} |",
        mib(4 * all),
        mib(full_state)
    );
    println!(
        "| LoRA r=8 q,v | {} | {:.4} | {lora_grads} | {} | {} |",
        counts.trainable,
        100.0 * counts.trainable as f64 / counts.all as f64,
        mib(4 * counts.trainable),
        mib(lora_state)
    );
    println!("({counts})\n");
}

fn bench(c: &mut Criterion) {
    let config = reference_config();
    print_bytes_table(&config);

    let mut group = c.benchmark_group("lora");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15));

    let train = Device::flex().autodiff();
    let (ids, ctx) = inputs(&config, &train);
    let full = Llama::random(&config, 0, &train, DType::F32).expect("model");
    group.bench_function("full fine-tune fwd+bwd", |b| {
        b.iter(|| {
            let loss = causal_lm_loss(full.forward(ids.clone(), &ctx), ids.clone());
            GradientsParams::from_grads(loss.backward(), &full)
        })
    });
    let mut lora = LoraModel::new(full.clone());
    lora.add_adapter("bench", lora_config(), 0)
        .expect("adapter");
    group.bench_function("LoRA r=8 q,v fwd+bwd", |b| {
        b.iter(|| {
            let loss = causal_lm_loss(lora.model().forward(ids.clone(), &ctx), ids.clone());
            GradientsParams::from_grads(loss.backward(), lora.model())
        })
    });
    let mut seed = 0;
    group.bench_function("LoRA r=8 q,v fwd+bwd, lora_dropout 0.05", |b| {
        b.iter(|| {
            seed += 1;
            let dropout = AdapterDropout::new(0.05, seed, 0).expect("dropout");
            let ctx = ctx.clone().with_adapter_dropout(dropout);
            let loss = causal_lm_loss(lora.model().forward(ids.clone(), &ctx), ids.clone());
            GradientsParams::from_grads(loss.backward(), lora.model())
        })
    });

    let infer = Device::flex();
    let (ids, ctx) = inputs(&config, &infer);
    let base = Llama::random(&config, 0, &infer, DType::F32).expect("model");
    let mut lora = LoraModel::new(base.clone());
    lora.add_adapter("bench", lora_config(), 0)
        .expect("adapter");
    group.bench_function("base forward", |b| {
        b.iter(|| base.forward(ids.clone(), &ctx).sum().into_data())
    });
    group.bench_function("LoRA unmerged forward", |b| {
        b.iter(|| lora.model().forward(ids.clone(), &ctx).sum().into_data())
    });
    lora.merge().expect("merge");
    group.bench_function("LoRA merged forward", |b| {
        b.iter(|| lora.model().forward(ids.clone(), &ctx).sum().into_data())
    });
    group.finish();
}

/// The q_proj of a one-block Llama of hidden size `hidden` with an r = 8 adapter (B zero as PEFT
/// initialises it; the cost does not depend on the values), on the autodiff device.
fn adapted_layer(hidden: usize, device: &Device) -> Linear {
    let config = LlamaConfig::from_json(&format!(
        r#"{{"vocab_size": 8, "hidden_size": {hidden}, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-5}}"#
    ))
    .expect("layer config");
    let mut lora = LoraModel::new(Llama::random(&config, 0, device, DType::F32).expect("model"));
    let config = LoraConfig {
        init: kiln_lora::LoraInit::Gaussian,
        ..lora_config()
    };
    lora.add_adapter("bench", config, 0).expect("adapter");
    lora.into_model().model.layers.remove(0).self_attn.q_proj
}

fn bench_layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora layer");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    let device = Device::flex().autodiff();
    let rows = BATCH * SEQ;
    for hidden in [256, 2048] {
        let layer = adapted_layer(hidden, &device);
        let x = Tensor::<2>::random(
            [rows, hidden],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let lora = layer.weight.adapter().expect("adapter attached");
        let grads_of = |y: Tensor<2>| {
            let grads = y.sum().backward();
            (lora.a.val().grad(&grads), lora.b.val().grad(&grads))
        };
        group.bench_function(
            format!("{rows}x{hidden}x{hidden} activations fwd+bwd"),
            |b| b.iter(|| grads_of(layer.forward(x.clone()))),
        );
        group.bench_function(
            format!("{rows}x{hidden}x{hidden} dense weight fwd+bwd"),
            |b| b.iter(|| grads_of(x.clone().matmul(layer.weight.val().transpose()))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench, bench_layer);
criterion_main!(benches);
