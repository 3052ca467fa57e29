//! Mixed precision under ZeRO-2 and ZeRO-3: bf16 and f16 (with the loss scaler) match single-rank runs of
//! the same policy within their precision; an inf on one rank makes every rank skip together.

mod common;

use std::collections::HashMap;

use burn::tensor::DType;
use common::*;
use kiln_dist::LocalWorld;
use kiln_precision::{ParamGroup, Policy};
use kiln_zero::{Engine, Stage, ZeroConfig, ZeroError};

const STEPS: usize = 5;

fn group() -> ParamGroup {
    ParamGroup {
        lr: 1e-2,
        weight_decay: 0.1,
    }
}

fn config(stage: Stage, policy: Policy) -> ZeroConfig {
    ZeroConfig {
        stage,
        policy,
        group: group(),
        ..Default::default()
    }
}

/// ‖Δ_ours − Δ_ref‖ / ‖Δ_ref‖ over all parameters, Δ = final − initial.
fn update_error(
    init: &HashMap<String, Vec<f32>>,
    ours: &HashMap<String, Vec<f32>>,
    reference: &HashMap<String, Vec<f32>>,
) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (path, r) in reference {
        for ((o, r), i) in ours[path].iter().zip(r).zip(&init[path]) {
            diff += f64::from(o - r).powi(2);
            norm += f64::from(r - i).powi(2);
        }
    }
    (diff / norm).sqrt()
}

#[test]
fn bf16_and_f16_under_stages_two_and_three_match_one_rank_of_the_same_policy() {
    let cfg = tiny();
    let init = params_f32(&llama_units(&cfg).model);
    for (name, policy, loss_tol, update_tol) in [
        ("bf16", Policy::bf16(), 2e-2, 0.1),
        ("f16", Policy::fp16(), 5e-3, 1e-2),
    ] {
        let (ref_losses, ref_params) = reference(policy, STEPS, None, group());
        for (stage, world) in [
            (Stage::Two, 2),
            (Stage::Two, 4),
            (Stage::Three, 2),
            (Stage::Three, 4),
        ] {
            let out = LocalWorld::run(world, |comm| {
                let rank = comm.rank();
                let mut engine =
                    Engine::new(llama_units(&cfg), comm, config(stage, policy), |_| true)?;
                let mut losses = vec![];
                for step in 0..STEPS {
                    let b = rank_batches(&cfg, step, rank, world, 1, policy.compute);
                    let r = engine.step(&b)?;
                    assert!(!r.found_inf, "{name}: unexpected overflow at step {step}");
                    losses.push(r.loss);
                }
                Ok::<_, ZeroError>((losses, full_params_f32(&mut engine)?))
            })
            .unwrap();
            for (losses, params) in &out {
                assert_eq!(
                    params, &out[0].1,
                    "{name} {stage:?} N={world}: ranks differ"
                );
                for (s, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
                    assert!(
                        rel(*a, *b) <= loss_tol,
                        "{name} {stage:?} N={world} step {s}: {a} vs {b}"
                    );
                }
            }
            let err = update_error(&init, &out[0].1, &ref_params);
            eprintln!("{name} {stage:?} N={world}: relative update error {err:.3e}");
            assert!(
                err <= update_tol,
                "{name} {stage:?} N={world}: update error {err}"
            );
        }
    }
}

#[test]
fn an_inf_on_one_rank_makes_every_rank_skip_the_step() {
    let cfg = tiny();
    let init = params_f32(&llama_units(&cfg).model);
    for (stage, policy) in [
        (Stage::Two, Policy::fp16()),
        (Stage::Two, Policy::bf16()),
        (Stage::Three, Policy::fp16()),
    ] {
        let world = 3;
        let out = LocalWorld::run(world, |comm| {
            let rank = comm.rank();
            let zc = config(stage, policy);
            let units = Poisoned {
                inner: llama_units(&cfg),
                poison: rank == 1,
            };
            let mut engine = Engine::new(units, comm, zc, |_| true)?;
            let first = engine.step(&rank_batches(&cfg, 0, rank, world, 1, policy.compute))?;
            let after_skip = full_params_f32(&mut engine)?;
            let scale = engine.scaler().map(|s| s.scale());
            engine.units_mut().poison = false;
            let second = engine.step(&rank_batches(&cfg, 1, rank, world, 1, policy.compute))?;
            Ok::<_, ZeroError>((first.found_inf, after_skip, scale, second.found_inf))
        })
        .unwrap();
        for (rank, (skipped, params, scale, second)) in out.iter().enumerate() {
            assert!(skipped, "{policy:?}: rank {rank} did not skip");
            assert_eq!(
                params, &init,
                "{stage:?} {policy:?}: rank {rank} changed its (master) weights"
            );
            if policy == Policy::fp16() {
                assert_eq!(*scale, Some(32768.0), "rank {rank}: scale not halved");
            }
            assert!(!second, "rank {rank}: the next step must run");
        }
    }
}

/// FSDP's `reduce_dtype`: gradients that cross ranks in bf16 or f16 train like the f32 reduction
/// within that dtype's precision under every stage, and the gradient reduction sends half the
/// bytes (DDP: all of its traffic; stages 1-3 also gather parameters, in f32 here).
#[test]
fn gradients_reduced_in_bf16_or_f16_train_like_f32_and_halve_the_reduction_traffic() {
    let cfg = tiny();
    let init = params_f32(&llama_units(&cfg).model);
    let world = 2;
    const MICRO: u64 = 2;
    let run = |stage: Stage, reduce: DType| {
        let policy = Policy {
            reduce,
            ..Policy::f32()
        };
        LocalWorld::run(world, |comm| {
            let rank = comm.rank();
            let mut engine = Engine::new(llama_units(&cfg), comm, config(stage, policy), |_| true)?;
            let (mut losses, mut bytes) = (vec![], 0);
            for step in 0..STEPS {
                let b = rank_batches(&cfg, step, rank, world, MICRO as usize, policy.compute);
                let r = engine.step(&b)?;
                losses.push(r.loss);
                bytes = r.model_bytes_sent;
            }
            Ok::<_, ZeroError>((losses, full_params_f32(&mut engine)?, bytes))
        })
        .unwrap()
        .remove(0)
    };
    let ddp_bytes = run(Stage::Ddp, DType::F32).2;
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        let (losses, params, bytes) = run(stage, DType::F32);
        // Tolerances as for bf16 / f16 compute above: 8 and 11 bits of mantissa.
        for (reduce, update_tol) in [(DType::BF16, 0.1), (DType::F16, 1e-2)] {
            let (l, p, b) = run(stage, reduce);
            for (a, r) in l.iter().zip(&losses) {
                assert!(rel(*a, *r) <= 1e-3, "{stage:?} {reduce:?}: loss {a} vs {r}");
            }
            let err = update_error(&init, &p, &params);
            eprintln!("{stage:?} reduce {reduce:?}: update error {err:.2e}, {b} vs {bytes} bytes");
            assert!(
                err <= update_tol,
                "{stage:?} {reduce:?}: update error {err}"
            );
            // Half of the gradient reduction's bytes: DDP's all-reduce moves twice what a
            // reduce-scatter does, so the saving is a quarter of DDP's f32 traffic per
            // reduce-scatter (stage 3 reduce-scatters every micro-batch).
            let saved = bytes - b;
            let want = match stage {
                Stage::Ddp => ddp_bytes / 2,
                Stage::One | Stage::Two => ddp_bytes / 4,
                Stage::Three => MICRO * ddp_bytes / 4,
            };
            assert!(
                saved.abs_diff(want) <= 64 * world as u64,
                "{stage:?} {reduce:?}: saved {saved} bytes, expected {want}"
            );
        }
    }
}
