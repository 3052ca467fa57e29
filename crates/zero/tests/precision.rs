//! Mixed precision under ZeRO-2: bf16 and f16 (with the loss scaler) match single-rank runs of
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

fn config(policy: Policy) -> ZeroConfig {
    ZeroConfig {
        stage: Stage::Two,
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
fn bf16_and_f16_under_stage_two_match_one_rank_of_the_same_policy() {
    let cfg = tiny();
    let init = params_f32(&LlamaUnits::new(&cfg).model);
    for (name, policy, loss_tol, update_tol) in [
        ("bf16", Policy::bf16(), 2e-2, 0.1),
        ("f16", Policy::fp16(), 5e-3, 1e-2),
    ] {
        let (ref_losses, ref_params) = reference(policy, STEPS, None, group());
        for world in [2, 4] {
            let out = LocalWorld::run(world, |comm| {
                let rank = comm.rank();
                let mut engine =
                    Engine::new(LlamaUnits::new(&cfg), comm, config(policy), |_| true)?;
                let mut losses = vec![];
                for step in 0..STEPS {
                    let b = rank_batches(&cfg, step, rank, world, 1, policy.compute);
                    let r = engine.step(&b)?;
                    assert!(!r.found_inf, "{name}: unexpected overflow at step {step}");
                    losses.push(r.loss);
                }
                Ok::<_, ZeroError>((losses, params_f32(&engine.units().model)))
            })
            .unwrap();
            for (losses, params) in &out {
                assert_eq!(params, &out[0].1, "{name} N={world}: ranks differ");
                for (s, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
                    assert!(
                        rel(*a, *b) <= loss_tol,
                        "{name} N={world} step {s}: {a} vs {b}"
                    );
                }
            }
            let err = update_error(&init, &out[0].1, &ref_params);
            eprintln!("{name} N={world}: relative update error {err:.3e}");
            assert!(err <= update_tol, "{name} N={world}: update error {err}");
        }
    }
}

#[test]
fn an_inf_on_one_rank_makes_every_rank_skip_the_step() {
    let cfg = tiny();
    let init = params_f32(&LlamaUnits::new(&cfg).model);
    for policy in [Policy::fp16(), Policy::bf16()] {
        let world = 3;
        let out = LocalWorld::run(world, |comm| {
            let rank = comm.rank();
            let mut engine = Engine::new(LlamaUnits::new(&cfg), comm, config(policy), |_| true)?;
            engine.units_mut().poison = rank == 1;
            let first = engine.step(&rank_batches(&cfg, 0, rank, world, 1, policy.compute))?;
            let after_skip = params_f32(&engine.units().model);
            let scale = engine.scaler().map(|s| s.scale());
            engine.units_mut().poison = false;
            let second = engine.step(&rank_batches(&cfg, 1, rank, world, 1, policy.compute))?;
            Ok::<_, ZeroError>((first.found_inf, after_skip, scale, second.found_inf))
        })
        .unwrap();
        let compute = params_f32(
            &{
                let mut u = LlamaUnits::new(&cfg);
                u.model = kiln_precision::cast_module(u.model, policy.compute);
                u
            }
            .model,
        );
        for (rank, (skipped, params, scale, second)) in out.iter().enumerate() {
            assert!(skipped, "{policy:?}: rank {rank} did not skip");
            assert_eq!(
                params, &compute,
                "{policy:?}: rank {rank} changed its weights"
            );
            if policy == Policy::fp16() {
                assert_eq!(*scale, Some(32768.0), "rank {rank}: scale not halved");
            }
            assert!(!second, "rank {rank}: the next step must run");
        }
        assert_ne!(init, out[0].1, "sanity: compute copy is a cast of init");
    }
}
