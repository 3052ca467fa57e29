//! The trainer's overhead over the bare engine: the default job's model and batches (tiny Llama,
//! synthetic addition, bf16, ZeRO-3, 2 thread ranks), timed per step (a) through `kiln train`'s
//! loop (data, batches, schedule, metrics, progress, the stop flag) and (b) as bare
//! `Engine::step` calls on pre-built batches, in the same run. Target: (a) ≤ 1.05 x (b).
//!
//! `cargo bench --profile dev -p kiln-benches --bench trainer` prints the table.

use std::time::Instant;

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_dist::LocalWorld;
use kiln_trainer::config::TrainConfig;
use kiln_trainer::data::{DataPosition, Dataset, Tokenizer, rank_range};
use kiln_trainer::train::{Resume, batches, build_model, step_dropout, train, zero_config};
use kiln_zero::Engine;
use kiln_zero::llama::{Batch, LlamaUnits};

const STEPS: u64 = 30;

fn config(out: &std::path::Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.train.steps = STEPS;
    c.train.output_dir = out.to_path_buf();
    c.train.log_interval = STEPS;
    c.data.eval_examples = 8;
    c
}

/// Seconds per step of bare engine steps on the same batches.
fn bare(c: &TrainConfig) -> f64 {
    let out = LocalWorld::run(c.dist.world_size, |comm| {
        let (rank, world) = (comm.rank(), comm.world_size());
        let device = Device::flex().autodiff();
        let dataset = Dataset::new(
            &c.data,
            Tokenizer::from_spec(&c.data.tokenizer).unwrap(),
            c.train.seed,
        )
        .unwrap();
        let mc = c.model_config().unwrap();
        let zc = zero_config(c).unwrap();
        let built = build_model(c, &mc, &device).unwrap();
        let lora_dropout = built.lora_dropout();
        let (model, trainable) = (built.model, built.trainable);
        let mut engine = Engine::new(LlamaUnits::new(model), comm, zc, trainable)?;
        let mut pos = DataPosition::default();
        let steps: Vec<Vec<Batch>> = (0..STEPS)
            .map(|step| {
                let rows = dataset
                    .global_batch(&mut pos, c.train.global_batch)
                    .unwrap();
                let mine = rank_range(rows.len(), rank, world).unwrap();
                let dropout = step_dropout(lora_dropout, c.train.seed, step, mine.start).unwrap();
                batches(
                    &mc,
                    &rows[mine],
                    c.train.micro_batch,
                    &device,
                    zc.policy.compute,
                    dropout,
                )
                .unwrap()
            })
            .collect();
        let t = Instant::now();
        for b in &steps {
            engine.set_lr(c.optim.lr)?;
            engine.step(b)?;
        }
        Ok::<_, kiln_zero::ZeroError>(t.elapsed().as_secs_f64())
    })
    .unwrap();
    out.into_iter().fold(0.0, f64::max) / STEPS as f64
}

fn trainer(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("kiln-bench-trainer-{}", std::process::id()));
    let cfg = config(&dir);
    // Alternate to spread machine noise over both.
    let mut rows = vec![];
    for _ in 0..2 {
        let _ = std::fs::remove_dir_all(&dir);
        let s = train(&cfg, &Resume::No).unwrap();
        let kiln = s.wall_s / s.steps as f64;
        let engine = bare(&cfg);
        rows.push((kiln, engine));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n| run | kiln train loop, ms/step | bare Engine::step, ms/step | ratio |");
    println!("| --- | --- | --- | --- |");
    for (i, (k, e)) in rows.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.1} | {:.3} |",
            i + 1,
            k * 1e3,
            e * 1e3,
            k / e
        );
    }
    let _ = c;
}

criterion_group!(benches, trainer);
criterion_main!(benches);
