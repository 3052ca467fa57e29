//! Every stage on N ranks, each on its slice of the global batch, trains exactly like one rank
//! on the whole batch (f32 compute), also with gradient accumulation and clipping.

mod common;

use std::collections::HashMap;

use common::*;
use kiln_dist::LocalWorld;
use kiln_precision::{ParamGroup, Policy};
use kiln_zero::{Engine, Stage, ZeroConfig};

const STEPS: usize = 5;

type RankOut = (Vec<f32>, HashMap<String, Vec<f32>>);

fn run(
    world: usize,
    stage: Stage,
    micro: usize,
    clip: Option<f32>,
    policy: Policy,
) -> Vec<RankOut> {
    let config = tiny();
    LocalWorld::run(world, |comm| {
        let zc = ZeroConfig {
            stage,
            policy,
            max_grad_norm: clip,
            group: group(),
            ..Default::default()
        };
        let rank = comm.rank();
        let mut engine = Engine::new(llama_units(&config), comm, zc, |_| true)?;
        let mut losses = vec![];
        for step in 0..STEPS {
            let b = rank_batches(&config, step, rank, world, micro, policy.compute);
            losses.push(engine.step(&b)?.loss);
        }
        Ok::<_, kiln_zero::ZeroError>((losses, full_params_f32(&mut engine)?))
    })
    .unwrap()
}

fn group() -> ParamGroup {
    ParamGroup {
        lr: 1e-2,
        weight_decay: 0.1,
    }
}

fn check(out: &[RankOut], reference: &RankOut, what: &str) {
    let (ref_losses, ref_params) = reference;
    for (rank, (losses, params)) in out.iter().enumerate() {
        assert_eq!(params, &out[0].1, "{what}: rank {rank} differs from rank 0");
        for (s, (a, b)) in losses.iter().zip(ref_losses).enumerate() {
            assert!(rel(*a, *b) <= 1e-5, "{what}: step {s} loss {a} vs {b}");
        }
    }
    let mut worst = 0.0f32;
    for (path, want) in ref_params {
        let got = &out[0].1[path];
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs() / w.abs().max(1e-2));
        }
    }
    assert!(
        worst <= 1e-4,
        "{what}: parameters differ by {worst:e} (relative)"
    );
    eprintln!("{what}: worst parameter difference {worst:e} (relative)");
}

#[test]
fn every_stage_on_n_ranks_equals_one_rank_on_the_whole_batch() {
    let reference = reference(Policy::f32(), STEPS, None, group());
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        for world in 1..=4 {
            let out = run(world, stage, 1, None, Policy::f32());
            check(&out, &reference, &format!("{stage:?} N={world}"));
        }
    }
}

#[test]
fn gradient_accumulation_and_clipping_keep_the_equivalence() {
    let clip = Some(0.5);
    let unclipped = reference(Policy::f32(), STEPS, None, group());
    let reference = reference(Policy::f32(), STEPS, clip, group());
    assert!(
        rel(reference.0[STEPS - 1], unclipped.0[STEPS - 1]) > 1e-4,
        "clipping must be active in this test"
    );
    for stage in [Stage::Ddp, Stage::One, Stage::Two, Stage::Three] {
        for world in [1, 3, 4] {
            let out = run(world, stage, 2, clip, Policy::f32());
            check(
                &out,
                &reference,
                &format!("{stage:?} N={world} accum 2 clip"),
            );
        }
    }
}
