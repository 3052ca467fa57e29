//! Sharded checkpoints: resume continues bit-identically, a checkpoint loads into another
//! world size and stage, corruption and truncation are detected naming the file, and an
//! interrupted save leaves the previous checkpoint intact.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use kiln_dist::LocalWorld;
use kiln_precision::{ParamGroup, Policy};
use kiln_zero::{Engine, Stage, ZeroConfig, ZeroError, latest_checkpoint, read_full_checkpoint};

type Params = HashMap<String, Vec<f32>>;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(stage: Stage, policy: Policy) -> ZeroConfig {
    ZeroConfig {
        stage,
        policy,
        group: ParamGroup {
            lr: 1e-2,
            weight_decay: 0.1,
        },
        max_grad_norm: Some(1.0),
        ..Default::default()
    }
}

fn engine(comm: kiln_dist::Communicator, zc: ZeroConfig) -> kiln_zero::Result<Engine<LlamaUnits>> {
    Engine::new(llama_units(&tiny()), comm, zc, |_| true)
}

/// Steps `from..to` on the engine; returns the losses.
fn train(
    e: &mut Engine<LlamaUnits>,
    from: usize,
    to: usize,
    dtype: burn::tensor::DType,
) -> kiln_zero::Result<Vec<f32>> {
    let (rank, world) = (e.comm().rank(), e.comm().world_size());
    (from..to)
        .map(|s| {
            Ok(e.step(&rank_batches(&tiny(), s, rank, world, 1, dtype))?
                .loss)
        })
        .collect()
}

#[test]
fn resume_continues_bit_identically() {
    for (stage, policy, world) in [
        (Stage::Three, Policy::fp16(), 2),
        (Stage::Two, Policy::bf16(), 2),
        (Stage::Ddp, Policy::f32(), 3),
    ] {
        let root = scratch(&format!("resume-{stage:?}"));
        let zc = config(stage, policy);
        let dtype = policy.compute;
        let straight = LocalWorld::run(world, |comm| {
            let mut e = engine(comm, zc)?;
            let losses = train(&mut e, 0, 6, dtype)?;
            Ok::<_, ZeroError>((losses, full_params_f32(&mut e)?, e.scaler().cloned()))
        })
        .unwrap();
        let resumed = LocalWorld::run(world, |comm| {
            let mut e = engine(comm, zc)?;
            let mut losses = train(&mut e, 0, 3, dtype)?;
            e.save_checkpoint(&root, "step-3", serde_json::json!({"step": 3}))?;
            let (_, comm) = e.into_parts();
            // A fresh engine whose state has drifted elsewhere: the load must replace all of it.
            let mut e = engine(comm, zc)?;
            train(&mut e, 40, 41, dtype)?;
            let extra = e.load_checkpoint(latest_checkpoint(&root)?.unwrap())?;
            assert_eq!(extra["step"], 3);
            losses.extend(train(&mut e, 3, 6, dtype)?);
            Ok::<_, ZeroError>((losses, full_params_f32(&mut e)?, e.scaler().cloned()))
        })
        .unwrap();
        for (rank, (a, b)) in straight.iter().zip(&resumed).enumerate() {
            assert_eq!(
                a.0, b.0,
                "{stage:?} rank {rank}: losses differ after resume"
            );
            assert_eq!(
                a.1, b.1,
                "{stage:?} rank {rank}: parameters differ after resume"
            );
            assert_eq!(
                a.2.as_ref().map(|s| s.state().clone()),
                b.2.as_ref().map(|s| s.state().clone()),
                "{stage:?}: scaler state"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[test]
fn a_checkpoint_of_four_ranks_loads_into_two_and_one_and_another_stage() {
    let root = scratch("reshard");
    let policy = Policy::f32();
    let saved: Vec<(Params, Vec<f32>)> = LocalWorld::run(4, |comm| {
        let mut e = engine(comm, config(Stage::Two, policy))?;
        train(&mut e, 0, 3, policy.compute)?;
        e.save_checkpoint(&root, "step-3", serde_json::Value::Null)?;
        let params = full_params_f32(&mut e)?;
        Ok::<_, ZeroError>((params, train(&mut e, 3, 5, policy.compute)?))
    })
    .unwrap();
    let (want, want_losses) = &saved[0];
    let (_, on_disk) = read_full_checkpoint(root.join("step-3")).unwrap();
    for (p, d) in &on_disk {
        assert_eq!(
            &d.iter::<f32>().collect::<Vec<_>>(),
            &want[p],
            "{p} on disk"
        );
    }
    for (stage, world) in [(Stage::Three, 2), (Stage::Ddp, 1), (Stage::One, 3)] {
        let out = LocalWorld::run(world, |comm| {
            let mut e = engine(comm, config(stage, policy))?;
            e.load_checkpoint(root.join("step-3"))?;
            let params = full_params_f32(&mut e)?;
            Ok::<_, ZeroError>((params, train(&mut e, 3, 5, policy.compute)?))
        })
        .unwrap();
        for (params, losses) in &out {
            assert_eq!(params, want, "{stage:?} N={world}: loaded parameters");
            for (a, b) in losses.iter().zip(want_losses) {
                assert!(rel(*a, *b) <= 1e-5, "{stage:?} N={world}: {a} vs {b}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn save_once(root: &Path, stage: Stage, world: usize) {
    LocalWorld::run(world, |comm| {
        let mut e = engine(comm, config(stage, Policy::bf16()))?;
        train(&mut e, 0, 1, Policy::bf16().compute)?;
        e.save_checkpoint(root, "step-1", serde_json::Value::Null)
    })
    .unwrap();
}

fn load_error(dir: &Path, stage: Stage) -> String {
    LocalWorld::run(1, |comm| {
        let mut e = engine(comm, config(stage, Policy::bf16()))?;
        Ok::<_, ZeroError>(match e.load_checkpoint(dir) {
            Ok(_) => String::new(),
            Err(err) => err.to_string(),
        })
    })
    .unwrap()
    .remove(0)
}

#[test]
fn corrupted_or_truncated_shards_are_named() {
    let root = scratch("corrupt");
    save_once(&root, Stage::Three, 2);
    let dir = root.join("step-1");
    let file = dir.join("rank-00001-of-00002.safetensors");
    let bytes = std::fs::read(&file).unwrap();

    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::write(&file, &flipped).unwrap();
    let e = load_error(&dir, Stage::Three);
    assert!(
        e.contains("rank-00001-of-00002") && e.contains("corrupted"),
        "{e}"
    );

    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(&dir, Stage::Three);
    assert!(
        e.contains("rank-00001-of-00002") && e.contains("truncated"),
        "{e}"
    );

    std::fs::remove_file(&file).unwrap();
    let e = load_error(&dir, Stage::Three);
    assert!(e.contains("rank-00001-of-00002"), "{e}");

    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let e = load_error(&dir, Stage::Three);
    assert!(e.contains("manifest.json"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_intact() {
    let root = scratch("interrupted");
    save_once(&root, Stage::Two, 2);
    let good = std::fs::read(root.join("step-1/manifest.json")).unwrap();
    // A save of step 2 killed after the rank files were written, before the manifest/rename.
    let tmp = root.join("step-2.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        root.join("step-1/rank-00000-of-00002.safetensors"),
        tmp.join("rank-00000-of-00002.safetensors"),
    )
    .unwrap();
    assert_eq!(latest_checkpoint(&root).unwrap(), Some(root.join("step-1")));
    assert_eq!(load_error(&root.join("step-1"), Stage::Two), "");
    assert!(load_error(&tmp, Stage::Two).contains("manifest.json"));
    // The next save replaces the stale temporary folder and moves `latest`.
    LocalWorld::run(2, |comm| {
        let mut e = engine(comm, config(Stage::Two, Policy::bf16()))?;
        e.save_checkpoint(&root, "step-2", serde_json::Value::Null)
    })
    .unwrap();
    assert_eq!(latest_checkpoint(&root).unwrap(), Some(root.join("step-2")));
    assert!(!tmp.exists());
    assert_eq!(
        std::fs::read(root.join("step-1/manifest.json")).unwrap(),
        good
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_checkpoint_of_another_model_is_refused_naming_the_parameter() {
    let root = scratch("mismatch");
    save_once(&root, Stage::Two, 1);
    let e = LocalWorld::run(1, |comm| {
        let frozen = |p: &str| p.contains("embed_tokens");
        let mut e = Engine::new(
            llama_units(&tiny()),
            comm,
            config(Stage::Two, Policy::bf16()),
            |p| !frozen(p),
        )?;
        Ok::<_, ZeroError>(
            e.load_checkpoint(root.join("step-1"))
                .unwrap_err()
                .to_string(),
        )
    })
    .unwrap()
    .remove(0);
    assert!(
        e.contains("unit 0") && e.contains("model.embed_tokens.weight"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
