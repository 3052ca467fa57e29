//! Mixed precision under ZeRO-2 and ZeRO-3: bf16 and f16 (with the loss scaler) match single-rank runs of
//! the same policy within their precision; an inf on one rank makes every rank skip together.

mod common;

use std::collections::HashMap;

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
    let init = params_f32(&LlamaUnits::new(&cfg).model);
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
                    Engine::new(LlamaUnits::new(&cfg), comm, config(stage, policy), |_| true)?;
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
    let init = params_f32(&LlamaUnits::new(&cfg).model);
    for (stage, policy) in [
        (Stage::Two, Policy::fp16()),
        (Stage::Two, Policy::bf16()),
        (Stage::Three, Policy::fp16()),
    ] {
        let world = 3;
        let out = LocalWorld::run(world, |comm| {
            let rank = comm.rank();
            let zc = config(stage, policy);
            let mut engine = Engine::new(LlamaUnits::new(&cfg), comm, zc, |_| true)?;
            engine.units_mut().poison = rank == 1;
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
