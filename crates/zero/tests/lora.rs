//! The "ZeRO-3 + LoRA" recipe: a Llama with PEFT-style adapters (kiln-lora) trains under every
//! stage like one rank on the whole batch; the frozen base is sharded under stage 3, never
//! changes, and holds no gradient, master or optimizer state.

mod common;

use common::*;
use kiln_dist::LocalWorld;
use kiln_lora::{LoraConfig, LoraModel, TargetModules};
use kiln_precision::{ParamGroup, Policy};
use kiln_zero::{Engine, MemoryReport, Stage, ZeroConfig, ZeroError};

const STEPS: usize = 4;

fn lora_units() -> LlamaUnits {
    let mut lora = LoraModel::new(llama_units(&tiny()).model);
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        ..Default::default()
    };
    lora.add_adapter("default", config, 11).unwrap();
    LlamaUnits::new(lora.into_model())
}

fn is_adapter(p: &str) -> bool {
    p.contains(".lora.")
}

type Out = (
    Vec<f32>,
    std::collections::HashMap<String, Vec<f32>>,
    MemoryReport,
);

fn run(stage: Stage, world: usize, policy: Policy) -> Vec<Out> {
    run_with_dropout(stage, world, policy, 0.0, 1)
}

/// `STEPS` steps of `micro` micro-batches per rank, with LoRA dropout `p`.
fn run_with_dropout(stage: Stage, world: usize, policy: Policy, p: f64, micro: usize) -> Vec<Out> {
    let cfg = tiny();
    LocalWorld::run(world, |comm| {
        let rank = comm.rank();
        let zc = ZeroConfig {
            stage,
            policy,
            group: ParamGroup {
                lr: 2e-2,
                weight_decay: 0.0,
            },
            ..Default::default()
        };
        let mut engine = Engine::new(lora_units(), comm, zc, is_adapter)?;
        let mut losses = vec![];
        for step in 0..STEPS {
            let b = rank_batches_with_dropout(&cfg, step, rank, world, micro, policy.compute, p);
            losses.push(engine.step(&b)?.loss);
        }
        let m = engine.memory();
        Ok::<_, ZeroError>((losses, full_params_f32(&mut engine)?, m))
    })
    .unwrap()
}

#[test]
fn lora_under_every_stage_equals_one_rank_and_the_base_never_moves() {
    let init = params_f32(&lora_units().model);
    let adapters: usize = init
        .iter()
        .filter(|(p, _)| is_adapter(p))
        .map(|(_, v)| v.len())
        .sum();
    let base: usize = init
        .iter()
        .filter(|(p, _)| !is_adapter(p))
        .map(|(_, v)| v.len())
        .sum();
    assert!(
        adapters > 0 && adapters * 10 < base,
        "{adapters} adapter / {base} base"
    );
    let reference = run(Stage::Ddp, 1, Policy::f32()).remove(0);
    for (p, v) in &reference.1 {
        if p.ends_with(".lora.a") {
            assert_ne!(v, &init[p], "{p}: lora_B (zero-initialised) must train");
        }
    }
    for (stage, world) in [
        (Stage::Two, 2),
        (Stage::Three, 1),
        (Stage::Three, 2),
        (Stage::Three, 3),
    ] {
        for (rank, (losses, params, m)) in run(stage, world, Policy::f32()).iter().enumerate() {
            for (a, b) in losses.iter().zip(&reference.0) {
                assert!(rel(*a, *b) <= 1e-5, "{stage:?} N={world}: loss {a} vs {b}");
            }
            for (p, want) in &reference.1 {
                let got = &params[p];
                if is_adapter(p) {
                    for (g, w) in got.iter().zip(want) {
                        assert!((g - w).abs() <= 1e-4 * w.abs().max(1e-2), "{p}: {g} vs {w}");
                    }
                } else {
                    assert_eq!(got, &init[p], "{stage:?}: base {p} moved");
                }
            }
            // fp32 master + AdamW for the adapters only, sharded.
            let shard = |n: usize| n.div_ceil(world) as u64;
            assert!(
                m.master <= 4 * (shard(adapters) + 8 * world as u64),
                "rank {rank}"
            );
            if stage == Stage::Three {
                // The base's compute copy is sharded too (f32 here), plus padding per unit.
                assert!(
                    m.params <= 4 * (shard(base) + 8 * world as u64),
                    "rank {rank}: {m:?}"
                );
            }
        }
    }
}

#[test]
fn bf16_zero3_lora_holds_two_bytes_per_base_parameter_over_n() {
    let init = params_f32(&lora_units().model);
    let base: u64 = init
        .iter()
        .filter(|(p, _)| !is_adapter(p))
        .map(|(_, v)| v.len() as u64)
        .sum();
    for world in [2u64, 4] {
        let out = run(Stage::Three, world as usize, Policy::bf16());
        for (rank, (losses, _, m)) in out.iter().enumerate() {
            assert!(losses.iter().all(|l| l.is_finite()));
            let want = 2 * base / world;
            assert!(
                m.params.abs_diff(want) <= 2 * 8 * world,
                "rank {rank}: {} B of base vs 2Ψ_base/N = {want}",
                m.params
            );
            eprintln!(
                "bf16 ZeRO-3 + LoRA N={world} rank {rank}: base shard {} B (2Ψ_base/N = {want}), adapter master {} B, AdamW {} B",
                m.params, m.master, m.optimizer
            );
        }
    }
}

/// PEFT's `lora_dropout` under data parallelism: the masks are keyed by global row, so N ranks
/// (and micro-batches, and stage 3's recompute of each block for its backward) drop exactly what
/// one rank drops on the whole batch; dropout changes the trajectory, and the base never moves.
#[test]
fn lora_dropout_under_zero_equals_one_rank_with_the_same_masks() {
    let p = 0.3;
    let init = params_f32(&lora_units().model);
    let reference = run_with_dropout(Stage::Ddp, 1, Policy::f32(), p, 1).remove(0);
    let undropped = run(Stage::Ddp, 1, Policy::f32()).remove(0);
    let moved = reference
        .0
        .iter()
        .zip(&undropped.0)
        .skip(1)
        .any(|(a, b)| rel(*a, *b) > 1e-4);
    assert!(
        moved,
        "dropout {p} left the losses unchanged: {:?} vs {:?}",
        reference.0, undropped.0
    );
    for (stage, world, micro) in [
        (Stage::Ddp, 1, 3),
        (Stage::Two, 2, 1),
        (Stage::Three, 2, 2),
        (Stage::Three, 3, 1),
    ] {
        for (losses, params, _) in run_with_dropout(stage, world, Policy::f32(), p, micro) {
            for (a, b) in losses.iter().zip(&reference.0) {
                assert!(
                    rel(*a, *b) <= 1e-5,
                    "{stage:?} N={world} micro={micro}: loss {a} vs {b}"
                );
            }
            for (name, want) in &reference.1 {
                let got = &params[name];
                if is_adapter(name) {
                    for (g, w) in got.iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1e-2),
                            "{name}: {g} vs {w}"
                        );
                    }
                } else {
                    assert_eq!(got, &init[name], "{stage:?}: base {name} moved");
                }
            }
        }
    }
}
