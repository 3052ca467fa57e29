//! PEFT adapter folders: kiln writes PEFT's names, shapes and config fields, round-trips exactly,
//! and refuses empty, partial or mismatched adapters with errors that name the culprit.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Device, TensorData};
use common::*;
use kiln_lora::{LoraConfig, LoraError, LoraModel, PeftAdapter, TargetModules};

fn read_json(path: std::path::PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_same_tensors(
    what: &str,
    a: &BTreeMap<String, TensorData>,
    b: &BTreeMap<String, TensorData>,
) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: keys"
    );
    for (key, x) in a {
        let y = &b[key];
        assert_eq!(x.shape(), y.shape(), "{what}: {key} shape");
        assert_eq!(x.dtype(), y.dtype(), "{what}: {key} dtype");
        assert_eq!(x.as_bytes(), y.as_bytes(), "{what}: {key} values");
    }
}

#[test]
fn a_loaded_peft_adapter_is_written_back_identically() {
    for (adapter_dir, _) in lora_cases() {
        let name = adapter_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let device = Device::flex();
        let (_, model) = fixture_llama(&device);
        let mut lora = LoraModel::new(model);
        lora.load_adapter(&name, &adapter_dir).unwrap();
        let out = scratch(&format!("roundtrip-{name}"));
        lora.save_adapter(&name, &out).unwrap();

        let (theirs, ours) = (
            PeftAdapter::load(&adapter_dir).unwrap(),
            PeftAdapter::load(&out).unwrap(),
        );
        assert_same_tensors(&name, &theirs.tensors, &ours.tensors);
        assert_eq!(
            read_json(out.join("adapter_config.json")),
            read_json(adapter_dir.join("adapter_config.json")),
            "{name}: adapter_config.json"
        );
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert_eq!(names.len(), 2, "{name}: no temporary files left: {names:?}");
    }
}

#[test]
fn a_kiln_adapter_has_peft_names_shapes_and_fields_and_round_trips_exactly() {
    let (fixture_dir, _) = lora_cases().remove(0);
    let fixture = PeftAdapter::load(&fixture_dir).unwrap();
    let fixture_json = read_json(fixture_dir.join("adapter_config.json"));
    let device = Device::flex();
    let (_, model) = fixture_llama(&device);
    let mut lora = LoraModel::new(model);
    let config = LoraConfig {
        r: fixture.config.r,
        alpha: fixture.config.alpha,
        target_modules: fixture.config.target_modules.clone(),
        task_type: Some("CAUSAL_LM".into()),
        ..LoraConfig::default()
    };
    lora.add_adapter("kiln", config, 7).unwrap();
    // Give B values so that the round trip checks both factors.
    let mut with_b = lora.to_peft("kiln").unwrap();
    for (key, data) in with_b.tensors.iter_mut() {
        if key.contains("lora_B") {
            let n = data.shape().iter().product::<usize>();
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            *data = TensorData::new(values, data.shape().to_vec());
        }
    }
    let dir = scratch("kiln-made");
    with_b.save(&dir).unwrap();
    let mut lora2 = LoraModel::new(fixture_llama(&device).1);
    lora2.load_adapter("again", &dir).unwrap();
    let reread = lora2.to_peft("again").unwrap();
    assert_same_tensors("kiln -> files -> kiln", &with_b.tensors, &reread.tensors);
    assert_eq!(with_b.config, reread.config);

    // PEFT's key names and shapes, as in the fixture adapter for the same targets and rank.
    let ours = PeftAdapter::load(&dir).unwrap();
    for (key, data) in &fixture.tensors {
        assert_eq!(ours.tensors[key].shape(), data.shape(), "{key}");
    }
    assert_eq!(ours.tensors.len(), fixture.tensors.len());
    // Every field PEFT writes, with PEFT's JSON types.
    let json = read_json(dir.join("adapter_config.json"));
    for (field, value) in fixture_json.as_object().unwrap() {
        if field == "peft_version" {
            continue;
        }
        let mine = json
            .get(field)
            .unwrap_or_else(|| panic!("adapter_config.json lacks `{field}`"));
        let same_kind = std::mem::discriminant(mine) == std::mem::discriminant(value);
        assert!(same_kind, "`{field}`: {mine} vs PEFT's {value}");
    }
    for field in [
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "lora_dropout",
        "bias",
        "task_type",
        "fan_in_fan_out",
    ] {
        assert_eq!(json[field], fixture_json[field], "{field}");
    }
}

#[test]
fn saving_refuses_empty_and_partial_adapters() {
    let (fixture_dir, _) = lora_cases().remove(0);
    let good = PeftAdapter::load(&fixture_dir).unwrap();
    let dir = scratch("refuse");
    let (a_key, b_key) = {
        let a = good
            .tensors
            .keys()
            .find(|k| k.contains("lora_A"))
            .unwrap()
            .clone();
        (a.clone(), a.replace("lora_A", "lora_B"))
    };

    let empty = PeftAdapter {
        config: good.config.clone(),
        tensors: BTreeMap::new(),
    };
    let zero_elements = {
        let mut t = good.clone();
        t.tensors
            .insert(a_key.clone(), TensorData::new(Vec::<f32>::new(), [0]));
        t
    };
    let missing_b = {
        let mut t = good.clone();
        t.tensors.remove(&b_key);
        t
    };
    for (what, adapter, names) in [
        ("empty", empty, "no tensors"),
        ("zero elements", zero_elements, a_key.as_str()),
        ("missing B", missing_b, a_key.as_str()),
    ] {
        let err = adapter.save(&dir).unwrap_err();
        eprintln!("{what}: {err}");
        assert!(matches!(err, LoraError::Incomplete { .. }), "{what}: {err}");
        assert!(
            err.to_string().contains(names),
            "{what}: the error names {names}: {err}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "{what}: nothing written"
        );
    }
}

#[test]
fn loading_refuses_adapters_that_do_not_fit_the_model() {
    let (fixture_dir, _) = lora_cases().remove(0);
    let good = PeftAdapter::load(&fixture_dir).unwrap();
    let device = Device::flex();
    let fresh = || LoraModel::new(fixture_llama(&device).1);
    let a_key = good
        .tensors
        .keys()
        .find(|k| k.contains("lora_A"))
        .unwrap()
        .clone();
    let module = kiln_lora::parse_key(&a_key).unwrap().0.to_string();

    // A factor whose in_features does not match the base weight.
    let mut wrong_shape = good.clone();
    let [r, inp]: [usize; 2] = good.tensors[&a_key].shape().to_vec().try_into().unwrap();
    wrong_shape.tensors.insert(
        a_key.clone(),
        TensorData::new(vec![0.0f32; r * (inp + 1)], [r, inp + 1]),
    );
    let err = fresh()
        .add_peft("x", &wrong_shape, "wrong-shape")
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, LoraError::ShapeMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&a_key) && err.to_string().contains(&module),
        "{err}"
    );

    // A module the model does not have.
    let mut unknown = good.clone();
    let ghost = module.replace("layers.0", "layers.99");
    for key in good
        .tensors
        .keys()
        .filter(|k| k.contains(&format!("{module}.")))
    {
        let data = unknown.tensors.remove(key).unwrap();
        unknown.tensors.insert(key.replace(&module, &ghost), data);
    }
    let err = fresh().add_peft("x", &unknown, "unknown").unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, LoraError::UnknownModules { .. }) && err.to_string().contains(&ghost),
        "{err}"
    );

    // Target names that select modules the file has no weights for.
    let mut other_targets = good.clone();
    other_targets.config.target_modules =
        TargetModules::Names(vec!["k_proj".into(), "q_proj".into(), "v_proj".into()]);
    let err = fresh()
        .add_peft("x", &other_targets, "targets")
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, LoraError::MissingModules { .. }) && err.to_string().contains("k_proj"),
        "{err}"
    );

    // A rank that disagrees with the config.
    let mut wrong_rank = good.clone();
    wrong_rank.config.r += 1;
    let err = fresh().add_peft("x", &wrong_rank, "rank").unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("rank"), "{err}");

    // A config that asks for something kiln does not do.
    let dir = scratch("dora");
    good.save(&dir).unwrap();
    let path = dir.join("adapter_config.json");
    let mut json = read_json(path.clone());
    json["use_dora"] = serde_json::json!(true);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = fresh().load_adapter("x", &dir).unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("use_dora"), "{err}");
}
