//! kiln's engine trains like torch + transformers: the K-step trajectory of `fixtures/train/`
//! (a tied, GQA Llama; micro-batches with right padding and ignored labels; AdamW with weight
//! decay on matrices only; global-norm clipping; a per-step learning rate), replayed under every
//! ZeRO stage on 1 rank and on every rank count that divides the micro-batch rows, through the
//! Llama units the trainer ships.
//!
//! Every shape, count and hyperparameter comes from the fixture (`meta.json`, the safetensors
//! files); the root is `KILN_FIXTURES` when set, so other trajectories (untied, other shapes and
//! step counts) run the same test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, TensorData};
use kiln_dist::LocalWorld;
use kiln_models::{Context, Llama};
use kiln_precision::{AdamWConfig, ParamGroup, Policy};
use kiln_zero::llama::{Batch, LlamaUnits};
use kiln_zero::{Engine, Stage, ZeroConfig};
use safetensors::SafeTensors;

fn root() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join("train")
}

struct Fixture {
    meta: serde_json::Value,
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Fixture {
    fn load() -> Self {
        let dir = root();
        let meta = std::fs::read_to_string(dir.join("meta.json")).expect("train/meta.json");
        let bytes = std::fs::read(dir.join("train.safetensors")).expect("train/train.safetensors");
        let st = SafeTensors::deserialize(&bytes).expect("train.safetensors parses");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => bytemuck_f32(view.data()),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Self {
            meta: serde_json::from_str(&meta).expect("meta.json is JSON"),
            tensors,
        }
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("train.safetensors has no {name}"))
    }

    fn num(&self, key: &str) -> f64 {
        self.meta[key]
            .as_f64()
            .unwrap_or_else(|| panic!("meta.json: {key}"))
    }
}

fn bytemuck_f32(data: &[u8]) -> Vec<f64> {
    data.chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
        .collect()
}

struct Run {
    losses: Vec<f32>,
    grad_norms: Vec<f32>,
    step1: HashMap<String, Vec<f32>>,
    last: HashMap<String, Vec<f32>>,
}

/// The trajectory on `world` thread ranks under `stage`: every micro-batch of every step is
/// split by rows, rank r taking rows `[r·R/N, (r+1)·R/N)`.
fn replay(f: &Fixture, stage: Stage, world: usize) -> Run {
    let ids = f.get("input_ids");
    let labels = f.get("labels");
    let mask = f.get("attention_mask");
    let lrs = &f.get("lr").1;
    let [steps, micro, rows, seq] = ids.0[..] else {
        panic!(
            "input_ids is [steps, micro_batches, rows, seq], got {:?}",
            ids.0
        )
    };
    let adamw = &f.meta["adamw"];
    let zero = ZeroConfig {
        stage,
        policy: Policy::f32(),
        adamw: AdamWConfig {
            beta1: adamw["betas"][0].as_f64().unwrap(),
            beta2: adamw["betas"][1].as_f64().unwrap(),
            eps: adamw["eps"].as_f64().unwrap(),
        },
        group: ParamGroup {
            lr: lrs[0],
            weight_decay: adamw["weight_decay"].as_f64().unwrap(),
        },
        max_grad_norm: f.meta["max_grad_norm"].as_f64().map(|v| v as f32),
        recompute: None,
    };
    let out = LocalWorld::run(world, |comm| {
        let device = Device::flex().autodiff();
        let (config, model) =
            Llama::from_pretrained(root().join("model"), &device, DType::F32).unwrap();
        let rank = comm.rank();
        let mut engine = Engine::new(LlamaUnits::new(model), comm, zero, |_| true)?;
        let mut run = Run {
            losses: vec![],
            grad_norms: vec![],
            step1: HashMap::new(),
            last: HashMap::new(),
        };
        let (lo, hi) = (rank * rows / world, (rank + 1) * rows / world);
        for (step, &lr) in lrs.iter().enumerate().take(steps) {
            engine.set_lr(lr)?;
            let batches: Vec<Batch> = (0..micro)
                .map(|m| {
                    let at = |t: &(Vec<usize>, Vec<f64>)| -> Vec<i64> {
                        let start = ((step * micro + m) * rows + lo) * seq;
                        t.1[start..start + (hi - lo) * seq]
                            .iter()
                            .map(|&v| v as i64)
                            .collect()
                    };
                    let mut b =
                        Batch::new(&config, at(ids), at(labels), seq, &device, DType::F32).unwrap();
                    let attention = at(mask);
                    b.ctx =
                        Context::new(&config, hi - lo, seq, Some(&attention), &device, DType::F32)
                            .unwrap();
                    b
                })
                .collect();
            let report = engine.step(&batches)?;
            run.losses.push(report.loss);
            run.grad_norms.push(report.grad_norm.unwrap_or(f32::NAN));
            if step == 0 {
                run.step1 = params(&mut engine)?;
            }
        }
        run.last = params(&mut engine)?;
        Ok::<_, kiln_zero::ZeroError>(run)
    })
    .expect("the trajectory runs");
    out.into_iter().next().unwrap()
}

fn params(engine: &mut Engine<LlamaUnits>) -> kiln_zero::Result<HashMap<String, Vec<f32>>> {
    Ok(engine
        .full_params()?
        .into_iter()
        .map(|(p, d): (String, TensorData)| (p, d.iter::<f32>().collect()))
        .collect())
}

fn check_params(f: &Fixture, prefix: &str, got: &HashMap<String, Vec<f32>>, what: &str) {
    let tol = f.meta["tolerances"]["params_rel"].as_f64().unwrap_or(1e-4);
    let names: Vec<&String> = f.tensors.keys().filter(|k| k.starts_with(prefix)).collect();
    assert!(!names.is_empty(), "no {prefix}* tensors in the fixture");
    for name in names {
        let path = &name[prefix.len()..];
        let want = &f.get(name).1;
        let ours = got
            .get(path)
            .unwrap_or_else(|| panic!("{what}: kiln has no parameter {path}"));
        assert_eq!(ours.len(), want.len(), "{what}: {path} size");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
        assert!(
            worst <= tol * scale,
            "{what}: {path} differs by {worst:e} (tolerance {:e})",
            tol * scale
        );
    }
}

#[test]
fn the_engine_follows_the_torch_trajectory_under_every_stage_and_rank_count() {
    let f = Fixture::load();
    let rows = f.num("batch") as usize;
    let loss_tol = f.meta["tolerances"]["loss_rel"].as_f64().unwrap_or(1e-5);
    let (want_loss, want_norm) = (&f.get("loss").1, &f.get("grad_norm").1);
    let worlds: Vec<usize> = (1..=rows).filter(|n| rows.is_multiple_of(*n)).collect();
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        for &world in &worlds {
            let what = format!("{stage:?} N={world}");
            let run = replay(&f, stage, world);
            for (s, (a, b)) in run.losses.iter().zip(want_loss).enumerate() {
                let rel = (f64::from(*a) - b).abs() / b.abs();
                assert!(
                    rel <= loss_tol,
                    "{what}: step {s} loss {a} vs torch {b} ({rel:e})"
                );
            }
            for (s, (a, b)) in run.grad_norms.iter().zip(want_norm).enumerate() {
                let rel = (f64::from(*a) - b).abs() / b.abs();
                assert!(
                    rel <= 1e-4 && a.is_finite(),
                    "{what}: step {s} grad norm {a} vs torch {b} ({rel:e})"
                );
            }
            check_params(&f, "step1.", &run.step1, &format!("{what} after step 1"));
            check_params(
                &f,
                "final.",
                &run.last,
                &format!("{what} after the last step"),
            );
            eprintln!("{what}: losses, grad norms and parameters match torch");
        }
    }
}
