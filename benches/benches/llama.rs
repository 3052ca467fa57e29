//! One Llama training step (forward + backward + AdamW) on flex, at the size of
//! `shared/reference/bench_torch_llama.py`: hidden 256, intermediate 688, 4 layers, 8 heads,
//! vocab 4096, untied, batch 8 x 128 tokens, f32. Throughput is reported in tokens.

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_models::{Context, Llama, LlamaConfig, causal_lm_loss};

const BATCH: usize = 8;
const SEQ: usize = 128;

fn reference_config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}"#,
    )
    .expect("reference config")
}

fn token_ids(config: &LlamaConfig, device: &Device) -> Tensor<2, Int> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % config.vocab_size as u64) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [BATCH, SEQ]), device)
}

fn training_step(c: &mut Criterion) {
    let config = reference_config();
    let device = Device::flex().autodiff();
    let ids = token_ids(&config, &device);
    let ctx = Context::new(&config, BATCH, SEQ, None, &device, DType::F32).expect("context");
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
    let mut model = Some(Llama::random(&config, 0, &device, DType::F32).expect("model"));

    let mut group = c.benchmark_group("llama_train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.bench_function("f32_flex_h256_l4_v4096_b8x128", |b| {
        b.iter(|| {
            let m = model.take().expect("model");
            let loss = causal_lm_loss(m.forward(ids.clone(), &ctx), ids.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            model = Some(optim.step(1e-3, m, grads));
        })
    });
    group.finish();
}

criterion_group!(benches, training_step);
criterion_main!(benches);
