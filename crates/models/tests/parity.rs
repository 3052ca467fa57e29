//! The Llama against Hugging Face transformers: logits, loss and gradients from the fixtures.

mod common;

use burn::tensor::{DType, Device, Tensor};
use common::*;
use kiln_models::{Context, Llama, causal_lm_loss};

/// Runs the fixture model on one io file on `device` (with autodiff) and checks logits, loss
/// and every listed gradient.
fn check_io(io_name: &str, device: Device) {
    let root = fixtures().join("llama");
    let (config, model) = Llama::from_pretrained(root.join("model"), &device, DType::F32).unwrap();
    let io = Io::open(root.join(io_name));
    let ids = io.ints::<2>("input_ids", &device);
    let labels = io.ints::<2>("labels", &device);
    let [batch, seq] = ids.dims();
    let mask: Option<Vec<i64>> = io
        .has("attention_mask")
        .then(|| io.raw("attention_mask").try_into_vec::<i64>().unwrap());
    let ctx = Context::new(&config, batch, seq, mask.as_deref(), &device, DType::F32).unwrap();

    let logits = model.forward(ids, &ctx);
    let (ref_logits, shape) = io.floats("logits");
    assert_eq!(
        logits.dims().as_slice(),
        shape.as_slice(),
        "{io_name}: logits shape"
    );
    let ours = to_vec(logits.clone());
    let vocab = config.vocab_size;
    let mut worst = 0.0f32;
    for (pos, (a, b)) in ours.chunks(vocab).zip(ref_logits.chunks(vocab)).enumerate() {
        if mask.as_ref().is_none_or(|m| m[pos] == 1) {
            worst = worst.max(max_abs_diff(a, b));
        }
    }
    eprintln!("{io_name}: logits max abs diff {worst:e}");
    assert!(worst <= 1e-4, "{io_name}: logits max abs diff {worst}");

    let loss = causal_lm_loss(logits, labels);
    let ref_loss = io.floats("loss").0[0];
    let ours_loss = to_vec(loss.clone())[0];
    eprintln!("{io_name}: loss {ours_loss} vs {ref_loss}");
    assert!(
        (ours_loss - ref_loss).abs() <= 1e-5,
        "{io_name}: loss {ours_loss} vs {ref_loss}"
    );

    let grads = loss.backward();
    let ours_grads = named_grads(&model, &grads);
    let grad_keys: Vec<String> = config
        .param_table()
        .into_iter()
        .map(|(k, _)| format!("grad.{k}"))
        .filter(|k| io.has(k))
        .collect();
    assert!(!grad_keys.is_empty(), "{io_name} lists no gradients");
    for key in grad_keys {
        let path = &key["grad.".len()..];
        let (reference, _) = io.floats(&key);
        let (_, ours) = ours_grads
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("no gradient for {path}"));
        let diff = max_abs_diff(ours, &reference);
        let bound = 1e-4 * max_abs(&reference);
        eprintln!(
            "{io_name}: {path} gradient max diff {:e} of max|ref|",
            diff / max_abs(&reference)
        );
        assert!(
            diff <= bound,
            "{io_name}: {path} gradient max diff {diff} > {bound}"
        );
    }
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    check_io("io.safetensors", Device::flex().autodiff());
}

#[test]
fn left_padded_batch_matches_transformers_where_attended() {
    check_io("io_padded.safetensors", Device::flex().autodiff());
}

/// The same on a wgpu adapter (burn's composed ops instead of the fused CPU kernels), with the
/// same tolerances; CI runs it on lavapipe.
#[cfg(feature = "wgpu")]
#[test]
fn on_wgpu_logits_loss_and_gradients_match_transformers() {
    if let Some(device) = wgpu_device("on_wgpu") {
        check_io("io.safetensors", device.clone().autodiff());
        check_io("io_padded.safetensors", device.autodiff());
    }
}

#[test]
fn tensor_shapes_come_from_the_config() {
    let root = fixtures().join("llama/model");
    let (config, model) = Llama::from_pretrained(&root, &Device::flex(), DType::F32).unwrap();
    let tensors = kiln_models::named_tensors(&model);
    let table = config.param_table();
    assert_eq!(tensors.len(), table.len());
    for ((name, data), (key, shape)) in tensors.iter().zip(&table) {
        assert_eq!(name, key);
        assert_eq!(data.shape().as_slice(), shape.as_slice(), "{key}");
    }
    let _ = Tensor::<1>::zeros([1], &Device::flex());
}
