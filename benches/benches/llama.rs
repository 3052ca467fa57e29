//! One Llama training step (forward + backward + AdamW) on flex, at the size of
//! `shared/reference/bench_torch_llama.py`: hidden 256, intermediate 688, 4 layers, 8 heads,
//! vocab 4096, untied, batch 8 x 128 tokens. Throughput is reported in tokens.
//!
//! - `burn_adamw_f32`: plain f32 training with burn's AdamW, the figure to set next to PyTorch's.
//! - `master_{f32,bf16,f16_scaler}`: kiln-precision's recipe (fp32 master weights and torch-exact
//!   AdamW, compute in the given dtype, loss scaling for f16). A counting allocator measures each
//!   mode's peak heap during one step; the table is printed at the end.
//!
//! `llama_generate`: greedy decoding of 32 tokens after a 32-token prompt (batch 1, f32) with the
//! same model: `cached_concat` (the KV cache grows by concatenation, as `generate` does),
//! `cached_prealloc` (buffers preallocated and written with `slice_assign`) and `uncached` (the
//! full forward re-run on the whole sequence for every token). Throughput is new tokens.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_models::{Context, KvCache, Llama, LlamaConfig, causal_lm_loss};
use kiln_precision::{
    ParamGroup, Policy, cast_module, collect_grads, master_weights_for, write_back,
};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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

fn burn_adamw_f32(c: &mut Criterion) {
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
    group.bench_function("burn_adamw_f32", |b| {
        b.iter(|| {
            let m = model.take().expect("model");
            let loss = causal_lm_loss(m.forward(ids.clone(), &ctx), ids.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            model = Some(optim.step(1e-3, m, grads));
        })
    });
    group.finish();
}

fn master_weights(c: &mut Criterion) {
    let config = reference_config();
    let device = Device::flex().autodiff();
    let ids = token_ids(&config, &device);
    let mut table = vec![];
    let mut group = c.benchmark_group("llama_train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, policy) in [
        ("master_f32", Policy::f32()),
        ("master_bf16", Policy::bf16()),
        ("master_f16_scaler", Policy::fp16()),
    ] {
        let init = Llama::random(&config, 0, &device, DType::F32).expect("model");
        let groups = vec![ParamGroup {
            lr: 1e-3,
            weight_decay: 0.1,
        }];
        let mut master =
            master_weights_for(&init, |_| 0, groups, Default::default()).expect("master");
        let mut scaler = policy.loss_scaler();
        let mut model = Some(cast_module(init, policy.compute));
        let ctx =
            Context::new(&config, BATCH, SEQ, None, &device, policy.compute).expect("context");
        let mut step = || {
            let m = model.take().expect("model");
            let loss = causal_lm_loss(m.forward(ids.clone(), &ctx), ids.clone());
            let loss = match &scaler {
                Some(s) => s.scale_loss(loss),
                None => loss,
            };
            let grads = collect_grads(&m, &loss.backward()).expect("grads");
            master
                .set_grads(grads.iter().map(|(p, g)| (p.as_str(), g)))
                .expect("set grads");
            drop(grads);
            master.step(scaler.as_mut()).expect("step");
            model = Some(write_back(&master, m, policy.compute).expect("write back"));
        };
        step();
        let resident = LIVE.load(Ordering::Relaxed);
        PEAK.store(resident, Ordering::Relaxed);
        step();
        let peak = PEAK.load(Ordering::Relaxed);
        table.push((name, resident, peak));
        group.bench_function(name, |b| b.iter(&mut step));
    }
    group.finish();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!("\n| mode | heap between steps (MiB) | peak heap during a step (MiB) |");
    eprintln!("| --- | --- | --- |");
    for (name, resident, peak) in table {
        eprintln!("| {name} | {:.1} | {:.1} |", mib(resident), mib(peak));
    }
}

const PROMPT: usize = 32;
const NEW_TOKENS: usize = 32;

fn argmax_last(logits: Tensor<3>) -> i64 {
    let [_, seq, vocab] = logits.dims();
    let row = logits
        .narrow(1, seq - 1, 1)
        .reshape([vocab])
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 logits");
    (0..vocab).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as i64
}

fn generation(c: &mut Criterion) {
    let config = reference_config();
    let device = Device::flex();
    let model = Llama::random(&config, 0, &device, DType::F32).expect("model");
    let prompt: Vec<i64> = (0..PROMPT as i64).map(|i| (i * 37 + 11) % 4096).collect();
    let ids = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<2, Int>::from_data(TensorData::new(v, [1, n]), &device)
    };
    let cached = |mut cache: KvCache| {
        let mut logits = model
            .forward_cached(ids(prompt.clone()), None, &mut cache)
            .expect("prefill");
        let mut out = Vec::with_capacity(NEW_TOKENS);
        loop {
            let next = argmax_last(logits);
            out.push(next);
            if out.len() == NEW_TOKENS {
                return out;
            }
            logits = model
                .forward_cached(ids(vec![next]), None, &mut cache)
                .expect("step");
        }
    };
    let uncached = || {
        let mut seq = prompt.clone();
        for _ in 0..NEW_TOKENS {
            let ctx = Context::new(&config, 1, seq.len(), None, &device, DType::F32).expect("ctx");
            seq.push(argmax_last(model.forward(ids(seq.clone()), &ctx)));
        }
        seq.split_off(PROMPT)
    };
    let reference = uncached();
    assert_eq!(cached(KvCache::new(&config, 1)), reference);
    assert_eq!(
        cached(KvCache::with_capacity(&config, 1, PROMPT + NEW_TOKENS + 1)),
        reference
    );

    let mut group = c.benchmark_group("llama_generate");
    group.sample_size(10);
    group.throughput(Throughput::Elements(NEW_TOKENS as u64));
    group.bench_function("cached_concat", |b| {
        b.iter(|| cached(KvCache::new(&config, 1)))
    });
    group.bench_function("cached_prealloc", |b| {
        b.iter(|| cached(KvCache::with_capacity(&config, 1, PROMPT + NEW_TOKENS + 1)))
    });
    group.bench_function("uncached", |b| b.iter(uncached));
    group.finish();
}

criterion_group!(benches, burn_adamw_f32, master_weights, generation);
criterion_main!(benches);
