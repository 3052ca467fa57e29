//! Loading from disk: dtypes, shards, and the errors bad files must give.

mod common;

use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::*;
use kiln_models::{Context, Llama, LlamaConfig, ModelError, named_tensors, save_safetensors};

fn fixture_model() -> std::path::PathBuf {
    fixtures().join("llama/model")
}

fn logits(model: &Llama, config: &LlamaConfig, device: &Device) -> Vec<f32> {
    let io = Io::open(fixtures().join("llama/io.safetensors"));
    let ids: Tensor<2, Int> = io.ints("input_ids", device);
    let [b, s] = ids.dims();
    let ctx = Context::new(config, b, s, None, device, model.dtype()).unwrap();
    to_vec(model.forward(ids, &ctx))
}

/// Copies the fixture's config and writes its weights in `dtype`, split over `shards` files.
fn write_model(dir: &Path, dtype: DType, shards: usize) {
    std::fs::copy(fixture_model().join("config.json"), dir.join("config.json")).unwrap();
    let (_, model) = Llama::from_pretrained(fixture_model(), &Device::flex(), DType::F32).unwrap();
    let tensors = named_tensors(&model);
    if shards == 1 {
        save_safetensors(&tensors, dtype, dir.join("model.safetensors")).unwrap();
        return;
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        save_safetensors(chunk, dtype, dir.join(&name)).unwrap();
        for (key, _) in chunk {
            weight_map.insert(key.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn bf16_weights_on_disk_give_logits_close_to_f32() {
    let device = Device::flex();
    let (config, reference) = Llama::from_pretrained(fixture_model(), &device, DType::F32).unwrap();
    let expected = logits(&reference, &config, &device);
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DType::BF16, 1);
    let (_, model) = Llama::from_pretrained(dir.path(), &device, DType::F32).unwrap();
    let got = logits(&model, &config, &device);
    let diff = max_abs_diff(&got, &expected);
    // bf16 keeps 8 bits of mantissa: weights move by up to 2^-9 relative, logits by about 1%.
    assert!(diff > 0.0, "bf16 rounding must change something");
    assert!(
        diff <= 0.03 * max_abs(&expected),
        "bf16 logits off by {diff}"
    );
}

#[test]
fn a_model_runs_in_bf16_and_f16_compute() {
    let device = Device::flex();
    let (config, reference) = Llama::from_pretrained(fixture_model(), &device, DType::F32).unwrap();
    let expected = logits(&reference, &config, &device);
    for dtype in [DType::BF16, DType::F16] {
        let (_, model) = Llama::from_pretrained(fixture_model(), &device, dtype).unwrap();
        assert_eq!(model.dtype(), dtype);
        let got = logits(&model, &config, &device);
        let diff = max_abs_diff(&got, &expected);
        assert!(
            diff <= 0.05 * max_abs(&expected),
            "{dtype:?} logits off by {diff}"
        );
    }
}

#[test]
fn sharded_checkpoint_loads_identically() {
    let device = Device::flex();
    let (config, reference) = Llama::from_pretrained(fixture_model(), &device, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DType::F32, 3);
    assert!(!dir.path().join("model.safetensors").exists());
    let (_, model) = Llama::from_pretrained(dir.path(), &device, DType::F32).unwrap();
    assert_eq!(
        logits(&model, &config, &device),
        logits(&reference, &config, &device)
    );
}

fn load_err(dir: &Path) -> String {
    let err: ModelError = Llama::from_pretrained(dir, &Device::flex(), DType::F32).unwrap_err();
    err.to_string()
}

/// A model folder whose safetensors file holds `tensors` instead of the fixture's.
fn with_tensors(edit: impl FnOnce(&mut Vec<(String, TensorData)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_model().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let (_, model) = Llama::from_pretrained(fixture_model(), &Device::flex(), DType::F32).unwrap();
    let mut tensors = named_tensors(&model);
    edit(&mut tensors);
    save_safetensors(&tensors, DType::F32, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn missing_tensor_is_named() {
    let dir = with_tensors(|t| t.retain(|(k, _)| k != "model.layers.1.mlp.up_proj.weight"));
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    // The expected shape is the fixture's hidden size, read from its config.
    let hidden = LlamaConfig::from_file(fixture_model().join("config.json"))
        .unwrap()
        .hidden_size;
    let wrong = hidden + 1;
    let dir = with_tensors(|t| {
        let slot = t
            .iter_mut()
            .find(|(k, _)| k == "model.norm.weight")
            .unwrap();
        slot.1 = TensorData::new(vec![1.0f32; wrong], [wrong]);
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("`model.norm.weight`")
            && err.contains(&format!("[{wrong}]"))
            && err.contains(&format!("[{hidden}]")),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = with_tensors(|t| {
        t.push((
            "model.layers.9.extra.weight".into(),
            TensorData::new(vec![0.0f32], [1]),
        ))
    });
    let err = load_err(dir.path());
    assert!(err.contains("model.layers.9.extra.weight"), "{err}");
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DType::F32, 1);
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for keep in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..keep]).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("model.safetensors"), "{keep} bytes: {err}");
    }
}

#[test]
fn bad_config_values_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DType::F32, 1);
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (field, value) in [
        ("num_key_value_heads", serde_json::json!(3)),
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("hidden_size", serde_json::json!("big")),
    ] {
        let mut bad = json.clone();
        bad[field] = value;
        std::fs::write(dir.path().join("config.json"), bad.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(
            err.contains(field) || err.contains("config.json"),
            "{field}: {err}"
        );
    }
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
}
