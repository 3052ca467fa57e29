//! kiln's LoRA against Hugging Face PEFT: logits, loss, adapter gradients and merged weights
//! from the fixtures (standard and rsLoRA adapters on the tiny Llama).

mod common;

use burn::tensor::Device;
use common::*;
use kiln_lora::{LoraModel, PeftAdapter};
use kiln_models::causal_lm_loss;

fn check_logits(what: &str, ours: Vec<f32>, reference: &[f32], tol: f32) {
    let diff = max_abs_diff(&ours, reference);
    eprintln!("{what}: logits max abs diff {diff:e}");
    assert!(diff <= tol, "{what}: logits max abs diff {diff} > {tol}");
}

#[test]
fn peft_adapters_reproduce_logits_loss_gradients_and_merge() {
    let cases = lora_cases();
    assert!(!cases.is_empty(), "meta.json lists no cases");
    for (adapter_dir, io_path) in cases {
        let name = adapter_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let device = Device::flex().autodiff();
        let (config, model) = fixture_llama(&device);
        let base_params = params(&model);
        let mut lora = LoraModel::new(model);
        lora.load_adapter(&name, &adapter_dir).unwrap();
        let io = Io::open(&io_path);
        // The fixture stores `scaling` in f32: compare at f32 precision (12/sqrt(6) rounded to
        // f32 is 1.8e-7 away from the f64 value).
        let scaling = io.floats("scaling")[0];
        let ours = lora.config(&name).unwrap().scaling() as f32;
        assert!(
            (ours - scaling).abs() <= f32::EPSILON * scaling.abs(),
            "{name}: scaling {ours} vs {scaling}"
        );

        let ids = io.ints::<2>("input_ids", &device);
        let labels = io.ints::<2>("labels", &device);
        let ctx = context(&config, &ids, &device);
        let logits = lora.model().forward(ids.clone(), &ctx);
        check_logits(&name, to_vec(logits.clone()), &io.floats("logits"), 1e-4);

        let loss = causal_lm_loss(logits, labels);
        let (ours_loss, ref_loss) = (to_vec(loss.clone())[0], io.floats("loss")[0]);
        eprintln!("{name}: loss {ours_loss} vs {ref_loss}");
        assert!(
            (ours_loss - ref_loss).abs() <= 1e-5,
            "{name}: loss {ours_loss} vs {ref_loss}"
        );

        let grads = loss.backward();
        let ours = lora.adapter_grads(&grads);
        let peft = PeftAdapter::load(&adapter_dir).unwrap();
        assert_eq!(
            ours.len(),
            peft.tensors.len(),
            "{name}: one gradient per adapter tensor"
        );
        for key in peft.tensors.keys() {
            let reference = io.floats(&format!("grad.{key}"));
            let diff = max_abs_diff(&to_vec(ours[key].clone()), &reference);
            let bound = 1e-4 * max_abs(&reference);
            eprintln!(
                "{name}: {key} gradient max diff {:e} of max|ref|",
                diff / max_abs(&reference)
            );
            assert!(
                diff <= bound,
                "{name}: {key} gradient max diff {diff} > {bound}"
            );
        }
        let with_grad = params_with_grad(lora.model(), &grads);
        let base_with_grad: Vec<&String> =
            with_grad.iter().filter(|p| !p.contains(".lora.")).collect();
        assert!(
            base_with_grad.is_empty(),
            "{name}: base parameters got gradients: {base_with_grad:?}"
        );
        assert_eq!(
            with_grad.len(),
            peft.tensors.len(),
            "{name}: exactly the factors have gradients"
        );

        lora.merge().unwrap();
        let merged_logits = lora.model().forward(ids.clone(), &ctx);
        check_logits(
            &format!("{name} merged"),
            to_vec(merged_logits),
            &io.floats("logits_merged"),
            1e-4,
        );
        let merged = params(lora.model());
        let mut checked = 0;
        for (path, value) in &merged {
            let key = format!("merged.{path}");
            if io.has(&key) {
                let reference = io.floats(&key);
                let diff = max_abs_diff(value, &reference);
                eprintln!("{name}: {key} max abs diff {diff:e}");
                assert!(diff <= 1e-6, "{name}: {key} max abs diff {diff}");
                checked += 1;
            }
        }
        let listed = io
            .keys()
            .iter()
            .filter(|k| k.starts_with("merged."))
            .count();
        assert!(
            checked > 0 && checked == listed,
            "{name}: checked {checked} of {listed} merged weights"
        );
        assert_eq!(
            merged.len(),
            base_params.len(),
            "{name}: merged model holds no adapter parameters"
        );

        lora.unmerge().unwrap();
        let mut worst = 0.0f32;
        for ((p, before), (q, after)) in base_params.iter().zip(params(lora.base())) {
            assert_eq!(p, &q);
            worst = worst.max(max_abs_diff(before, &after));
        }
        eprintln!("{name}: merge + unmerge changes base weights by at most {worst:e}");
        assert!(
            worst <= 1e-6,
            "{name}: unmerge left base weights {worst} off"
        );
        let again = lora.model().forward(ids, &ctx);
        check_logits(
            &format!("{name} unmerged"),
            to_vec(again),
            &io.floats("logits"),
            1e-4,
        );
    }
}
