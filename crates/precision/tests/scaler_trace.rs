//! The scaler reproduces every step of torch's GradScaler trace (fixtures/scaler/scaler.json):
//! scale, found_inf, whether the step ran, growth tracker, unscaled grads and SGD params.

mod common;

use common::{flat_f32, read_json, same_f32};
use kiln_precision::{DynamicLossScaler, ScalerConfig, unscale_and_check};

#[test]
fn scaler_reproduces_torch_gradscaler_trace_for_every_case() {
    let fx = read_json("scaler/scaler.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opt = &case["optimizer"];
        assert_eq!(opt["type"], "SGD", "{name}: only SGD traces are replayed");
        let lr = opt["lr"].as_f64().unwrap() as f32;
        let mut scaler = DynamicLossScaler::new(ScalerConfig {
            init_scale: case["init_scale"].as_f64().unwrap() as f32,
            growth_factor: case["growth_factor"].as_f64().unwrap() as f32,
            backoff_factor: case["backoff_factor"].as_f64().unwrap() as f32,
            growth_interval: case["growth_interval"].as_u64().unwrap() as u32,
            ..Default::default()
        })
        .unwrap();
        let names: Vec<String> = case["init_params"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut params: Vec<Vec<f32>> = names
            .iter()
            .map(|n| flat_f32(&case["init_params"][n]))
            .collect();
        for s in case["steps"].as_array().unwrap() {
            let step = s["step"].as_u64().unwrap();
            let at = format!("{name} step {step}");
            assert_eq!(
                scaler.scale(),
                s["scale_before"].as_f64().unwrap() as f32,
                "{at}"
            );
            assert_eq!(
                u64::from(scaler.growth_tracker()),
                s["growth_tracker_before"].as_u64().unwrap(),
                "{at}"
            );
            // The caller scaled the loss; we start from the scaled grads torch saw, and check our
            // own scaling of the unscaled input gives them too.
            let mut found_inf = false;
            let mut unscaled = Vec::new();
            for n in &names {
                let input = flat_f32(&s["grad_unscaled_input"][n]);
                let mut g = flat_f32(&s["scaled_grad"][n]);
                for (x, sg) in input.iter().zip(&g) {
                    assert!(same_f32(x * scaler.scale(), *sg), "{at} {n}: scaled grad");
                }
                found_inf |= unscale_and_check(&mut g, scaler.inv_scale());
                let expect = flat_f32(&s["grad_after_unscale"][n]);
                for (a, b) in g.iter().zip(&expect) {
                    assert!(same_f32(*a, *b), "{at} {n}: unscaled {a} vs {b}");
                }
                unscaled.push(g);
            }
            assert_eq!(found_inf, s["found_inf"].as_bool().unwrap(), "{at}");
            let update = scaler.update(found_inf);
            assert_eq!(
                !update.skipped,
                s["optimizer_step_ran"].as_bool().unwrap(),
                "{at}"
            );
            if !update.skipped {
                for (p, g) in params.iter_mut().zip(&unscaled) {
                    p.iter_mut().zip(g).for_each(|(p, g)| *p -= lr * g);
                }
            }
            for (n, p) in names.iter().zip(&params) {
                let expect = flat_f32(&s["params_after"][n]);
                for (a, b) in p.iter().zip(&expect) {
                    assert!((a - b).abs() <= 1e-6, "{at} {n}: param {a} vs {b}");
                }
            }
            assert_eq!(
                scaler.scale(),
                s["scale_after"].as_f64().unwrap() as f32,
                "{at}"
            );
            assert!(scaler.scale().is_finite(), "{at}");
            assert_eq!(
                u64::from(scaler.growth_tracker()),
                s["growth_tracker_after"].as_u64().unwrap(),
                "{at}"
            );
        }
    }
}

#[test]
fn scaler_state_save_restore_resumes_the_trace() {
    let mut a = DynamicLossScaler::new(ScalerConfig {
        growth_interval: 3,
        ..Default::default()
    })
    .unwrap();
    for f in [false, true, false, false] {
        a.update(f);
    }
    let json = serde_json::to_string(a.state()).unwrap();
    let mut b = DynamicLossScaler::new(a.config().clone()).unwrap();
    b.load_state(serde_json::from_str(&json).unwrap()).unwrap();
    for f in [false, false, true, false] {
        assert_eq!(a.update(f), b.update(f));
    }
    assert_eq!(a.state(), b.state());
}
