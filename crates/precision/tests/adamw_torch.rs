//! AdamW reproduces torch.optim.AdamW's trajectory (fixtures/adamw) for both parameter groups.

mod common;

use burn::tensor::TensorData;
use common::{read_bytes, read_json, st_f32};
use kiln_precision::{AdamWConfig, MasterWeights, ParamGroup};

#[test]
fn adamw_matches_torch_trajectory_for_all_steps_and_both_groups() {
    let fx = read_json("adamw/adamw.json");
    let hp = &fx["hyperparameters"];
    assert_eq!(hp["amsgrad"], false);
    assert_eq!(hp["maximize"], false);
    let lr = hp["lr"].as_f64().unwrap();
    let config = AdamWConfig {
        beta1: hp["betas"][0].as_f64().unwrap(),
        beta2: hp["betas"][1].as_f64().unwrap(),
        eps: hp["eps"].as_f64().unwrap(),
    };
    // One group per parameter, with the weight decay the fixture gives it.
    let wd = hp["weight_decay_per_param"].as_object().unwrap();
    let names: Vec<String> = wd.keys().cloned().collect();
    let groups: Vec<ParamGroup> = names
        .iter()
        .map(|n| ParamGroup {
            lr,
            weight_decay: wd[n].as_f64().unwrap(),
        })
        .collect();

    let bytes = read_bytes("adamw/adamw.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let init: Vec<(String, TensorData)> = names
        .iter()
        .map(|n| {
            let (v, shape) = st_f32(&st, &format!("init.{n}"));
            (n.clone(), TensorData::new(v, shape))
        })
        .collect();
    let mut mw = MasterWeights::from_params(
        init.iter().map(|(n, d)| (n.as_str(), d)),
        |p| names.iter().position(|n| n == p).unwrap(),
        groups,
        config,
    )
    .unwrap();

    let steps = fx["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    let mut worst = 0f32;
    for s in steps {
        let t = s["step"].as_u64().unwrap();
        for n in &names {
            let (g, shape) = st_f32(&st, &format!("step{t}.{n}.grad"));
            mw.set_grad(n, &TensorData::new(g, shape)).unwrap();
        }
        let out = mw.step(None).unwrap();
        assert!(out.stepped, "step {t}");
        assert_eq!(mw.optimizer_state().step, t);
        for n in &names {
            let e = mw.layout().get(n).unwrap().clone();
            for (field, ours) in [
                ("param", mw.param_values(n).unwrap()),
                ("exp_avg", &mw.optimizer_state().exp_avg[e.range()]),
                ("exp_avg_sq", &mw.optimizer_state().exp_avg_sq[e.range()]),
            ] {
                let (want, _) = st_f32(&st, &format!("step{t}.{n}.{field}"));
                for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                    let d = (a - b).abs();
                    worst = worst.max(d);
                    assert!(d <= 1e-6, "step {t} {n}.{field}[{i}]: {a} vs torch {b}");
                }
            }
        }
    }
    eprintln!("adamw: worst |ours - torch| = {worst:e}");
}

#[test]
fn adamw_state_serializes_and_resumes_identically() {
    let data = TensorData::new(vec![0.5f32, -1.0, 2.0], [3]);
    let grad = TensorData::new(vec![0.1f32, 0.2, -0.3], [3]);
    let new = || {
        MasterWeights::from_params(
            [("w", &data)],
            |_| 0,
            vec![ParamGroup::default()],
            AdamWConfig::default(),
        )
        .unwrap()
    };
    let mut a = new();
    a.set_grad("w", &grad).unwrap();
    a.step(None).unwrap();
    let json = serde_json::to_string(a.optimizer_state()).unwrap();
    let mut b = new();
    b.load_param("w", a.params()).unwrap();
    b.load_optimizer_state(serde_json::from_str(&json).unwrap())
        .unwrap();
    for m in [&mut a, &mut b] {
        m.set_grad("w", &grad).unwrap();
        m.step(None).unwrap();
    }
    assert_eq!(a.params(), b.params());
    assert_eq!(a.optimizer_state(), b.optimizer_state());
}
