//! Step time of the reference Llama (hidden 256, intermediate 688, 4 layers, 8 heads, vocab 4096,
//! global batch 8x128, bf16 compute, fp32 master + AdamW) under DDP and ZeRO-1, 2, 3 on 1, 2
//! and 4 thread ranks, with the model-state bytes each rank holds and its traffic per step.
//!
//! `cargo bench --profile dev -p kiln-benches --bench zero` prints the table (2 timed steps per
//! row); `KILN_ZERO_CRITERION=1` adds criterion samples (about 75 s per row on 2 cores). Thread
//! ranks share the machine's cores, so N ranks do not run N times faster here; the table shows the engine's overhead
//! and the memory/traffic trade of each stage. A second table runs the flagship recipe (ZeRO-3 +
//! LoRA r=8 on q, v, bf16) against full fine-tuning under ZeRO-3 on the same ranks.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Device};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kiln_dist::LocalWorld;
use kiln_lora::{LoraConfig, LoraModel};
use kiln_models::{Llama, LlamaConfig};
use kiln_precision::Policy;
use kiln_zero::llama::{Batch, LlamaUnits};
use kiln_zero::{Engine, Stage, ZeroConfig, ZeroError};

const BATCH: usize = 8;
const SEQ: usize = 128;

fn config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0}"#,
    )
    .unwrap()
}

/// Per-rank step time (max over ranks), rank 0's model-state bytes and traffic per step.
fn run(stage: Stage, world: usize, iters: u64) -> (Duration, u64, u64) {
    run_with(stage, world, iters, false)
}

/// [`run`], with `lora`: PEFT's default adapter (r = 8, alpha 16, q_proj and v_proj) on a frozen
/// base, the base sharded in the compute dtype under stage 3.
fn run_with(stage: Stage, world: usize, iters: u64, lora: bool) -> (Duration, u64, u64) {
    let cfg = config();
    let policy = Policy::bf16();
    let out = LocalWorld::run(world, |comm| {
        let device = Device::flex().autodiff();
        let rank = comm.rank();
        let rows = BATCH / world;
        let ids: Vec<i64> = (0..rows * SEQ)
            .map(|i| ((i * 31 + rank * 7 + 3) % cfg.vocab_size) as i64)
            .collect();
        let batch = Batch::new(&cfg, ids.clone(), ids, SEQ, &device, policy.compute)
            .map_err(|e| ZeroError::Model(e.to_string()))?;
        let model = Llama::random(&cfg, 1, &device, DType::F32)
            .map_err(|e| ZeroError::Model(e.to_string()))?;
        let zc = ZeroConfig {
            stage,
            policy,
            ..Default::default()
        };
        let (model, trainable): (Llama, fn(&str) -> bool) = match lora {
            false => (model, |_| true),
            true => {
                let mut lora = LoraModel::new(model);
                lora.add_adapter("default", LoraConfig::default(), 1)
                    .map_err(|e| ZeroError::Model(e.to_string()))?;
                (lora.into_model(), |p| p.contains(".lora."))
            }
        };
        let mut engine = Engine::new(LlamaUnits::new(model), comm, zc, trainable)?;
        let bytes = engine.step(std::slice::from_ref(&batch))?.model_bytes_sent;
        let t = Instant::now();
        for _ in 0..iters {
            engine.step(std::slice::from_ref(&batch))?;
        }
        Ok::<_, ZeroError>((t.elapsed(), engine.memory().total(), bytes))
    })
    .unwrap();
    let time = out.iter().map(|o| o.0).max().unwrap();
    (time, out[0].1, out[0].2)
}

/// Timed steps per table row (after one warm-up step). A step takes seconds on a 2-core CPU,
/// so the table is the result; criterion samples only run with `KILN_ZERO_CRITERION=1`.
const STEPS: u64 = 2;

fn zero(c: &mut Criterion) {
    println!("\n| stage | N | step | model state / rank | traffic / step / rank |");
    println!("| --- | --- | --- | --- | --- |");
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        for world in [1, 2, 4] {
            let (t, mem, traffic) = run(stage, world, STEPS);
            println!(
                "| {stage:?} | {world} | {:.0} ms | {:.1} MB | {:.1} MB |",
                t.as_secs_f64() * 1e3 / STEPS as f64,
                mem as f64 / 1e6,
                traffic as f64 / 1e6
            );
        }
    }
    println!("\n| ZeRO-3, bf16 | N | step | model state / rank | traffic / step / rank |");
    println!("| --- | --- | --- | --- | --- |");
    for world in [2, 4] {
        for (name, lora) in [("full fine-tune", false), ("LoRA r=8 q,v", true)] {
            let (t, mem, traffic) = run_with(Stage::Three, world, STEPS, lora);
            println!(
                "| {name} | {world} | {:.0} ms | {:.2} MB | {:.2} MB |",
                t.as_secs_f64() * 1e3 / STEPS as f64,
                mem as f64 / 1e6,
                traffic as f64 / 1e6
            );
        }
    }
    if std::env::var_os("KILN_ZERO_CRITERION").is_none() {
        return;
    }
    let mut g = c.benchmark_group("zero/llama-h256-l4-b8x128");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        for world in [1, 2, 4] {
            g.bench_with_input(
                BenchmarkId::new(format!("{stage:?}"), world),
                &world,
                |b, &w| b.iter_custom(|iters| run(stage, w, iters).0),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, zero);
criterion_main!(benches);
