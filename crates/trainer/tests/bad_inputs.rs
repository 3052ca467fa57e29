//! Generated bad inputs (proptest): configs and `--set` overrides, HF `config.json` fields,
//! safetensors headers and bodies, PEFT adapters, JSONL lines and checkpoint manifests. Every
//! one must give an `Err` that names where the problem is, or load correctly; none may panic
//! (proptest turns a panic into a failure), abort or allocate what the file does not hold.
//! Sized to run in seconds: tiny models, a few dozen cases per property.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::{DType, Device};
use kiln_lora::{LoraModel, PeftAdapter};
use kiln_models::{Llama, LlamaConfig};
use kiln_trainer::config::TrainConfig;
use kiln_trainer::data::{Tokenizer, load_jsonl};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A folder that lives for the whole test binary, under cargo's `target/tmp` (reused by the
/// next run rather than left behind in the system's temporary folder).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("bad-inputs")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// TOML values of every kind a user could type, the hostile ones first.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("1e300".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1000000000000".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("\"\"".to_string()),
        Just("\"big\"".to_string()),
        Just("[]".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        (0u64..100_000).prop_map(|v| v.to_string()),
        "\"[a-z0-9/._-]{0,12}\"".prop_map(|s| s),
    ]
}

/// The config's dotted keys, a few misspelt ones and section names.
const KEYS: &[&str] = &[
    "model.preset",
    "model.config",
    "model.pretrained",
    "data.task",
    "data.paths",
    "data.seq_len",
    "data.tokenizer",
    "data.digits",
    "data.operation",
    "data.eval_examples",
    "precision.compute",
    "precision.reduce",
    "zero.stage",
    "zero.recompute",
    "dist.world_size",
    "dist.backend",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_rslora",
    "lora.adapter",
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.max_grad_norm",
    "train.steps",
    "train.global_batch",
    "train.micro_batch",
    "train.seed",
    "train.eval_interval",
    "train.checkpoint_interval",
    "train.log_interval",
    "optim.lrr",
    "train",
    "nope.x",
];

fn overrides() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        (prop::sample::select(KEYS), toml_value()).prop_map(|(k, v)| format!("{k}={v}")),
        1..4,
    )
}

proptest! {
    #![proptest_config(cases(256))]

    /// `--set key=value` with any value: a config, or an error naming a field, the `--set`
    /// argument or the schema path; never a panic. An accepted config is usable: its
    /// accumulation is defined and its model config builds.
    #[test]
    fn set_overrides_error_or_give_a_usable_config(sets in overrides()) {
        match TrainConfig::load(None, &sets) {
            Ok(c) => {
                prop_assert!(c.accumulation_steps().is_ok());
                // The model's own limits (data.seq_len against max_position_embeddings) are
                // checked when the model config is known, naming the field.
                if c.model.config.is_none() && c.model.pretrained.is_none()
                    && let Err(e) = c.model_config()
                {
                    prop_assert!(e.to_string().contains("data.seq_len"), "{sets:?}: {e}");
                }
                prop_assert!(c.optim.lr.is_finite() && c.optim.lr > 0.0, "{sets:?}: lr {}", c.optim.lr);
            }
            Err(e) => {
                let msg = e.to_string();
                let names_it = KEYS.iter().any(|k| msg.contains(k))
                    || sets.iter().any(|s| msg.contains(s.as_str()))
                    || msg.contains("config field")
                    || msg.contains("--set");
                prop_assert!(names_it, "{sets:?} -> {msg}");
            }
        }
    }

    /// A TOML file of random lines, or a valid one with a random field changed: an error with
    /// the file or a field, never a panic.
    #[test]
    fn config_files_error_with_the_file(
        key in prop::sample::select(KEYS),
        value in toml_value(),
        junk in "[ -~\n]{0,80}",
    ) {
        let dir = scratch_once("toml");
        let (section, field) = key.split_once('.').unwrap_or((key, "x"));
        for (i, text) in [format!("[{section}]\n{field} = {value}\n"), junk.clone()].iter().enumerate() {
            let path = dir.join(format!("c{i}.toml"));
            std::fs::write(&path, text).unwrap();
            if let Err(e) = TrainConfig::load(Some(&path), &[]) {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("c0.toml") || msg.contains("c1.toml") || msg.contains("config"),
                    "{text:?} -> {msg}"
                );
            }
        }
    }
}

/// A folder made once per test binary (proptest runs a property's cases on one thread).
fn scratch_once(name: &'static str) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<std::collections::HashMap<&'static str, PathBuf>>> =
        OnceLock::new();
    let mut dirs = DIRS.get_or_init(Default::default).lock().unwrap();
    dirs.entry(name).or_insert_with(|| scratch(name)).clone()
}

/// A tiny Llama's `config.json`: vocab 16, hidden 8, one layer.
fn tiny_config_json() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "eos_token_id": 2,
    })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(-5.5)),
        Just(json!(1e300)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(4294967296u64)),
        Just(json!("big")),
        Just(json!([2, 3])),
        Just(json!([])),
        Just(json!({"rope_type": "llama3", "factor": 0})),
        Just(
            json!({"rope_type": "llama3", "factor": -2, "low_freq_factor": 1,
                    "high_freq_factor": 4, "original_max_position_embeddings": -5})
        ),
        Just(json!({"rope_type": "yarn"})),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        (0u64..70000).prop_map(|v| json!(v)),
    ]
}

const HF_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "eos_token_id",
    "bos_token_id",
];

proptest! {
    #![proptest_config(cases(256))]

    /// An HF `config.json` with one or two fields replaced: an error naming the file, or a config
    /// whose sizes are consistent (its parameter count does not overflow, rope is finite).
    #[test]
    fn hf_config_fields_error_or_validate(
        edits in prop::collection::vec((prop::sample::select(HF_FIELDS), json_value()), 1..3)
    ) {
        let mut json = tiny_config_json();
        for (k, v) in &edits {
            json[*k] = v.clone();
        }
        let dir = scratch_once("hfconfig");
        let path = dir.join("config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        match LlamaConfig::from_file(&path) {
            Ok(c) => {
                prop_assert!(c.unit_sizes().is_ok());
                prop_assert!(c.rope_theta.is_finite() && c.rope_theta > 1.0);
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("config.json"), "{edits:?} -> {msg}");
            }
        }
    }
}

/// The tiny model's folder (config.json + model.safetensors), written once.
fn tiny_model() -> &'static (PathBuf, Vec<u8>) {
    static MODEL: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = scratch("tiny-model");
        let json = tiny_config_json();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let config = LlamaConfig::from_json(&json.to_string()).unwrap();
        let model = Llama::random(&config, 7, &Device::flex(), DType::F32).unwrap();
        let tensors = kiln_models::named_tensors(&model);
        let path = dir.join("model.safetensors");
        kiln_models::save_safetensors(&tensors, DType::F32, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (dir, bytes)
    })
}

/// Ways to damage a safetensors file: its header length, its header JSON, its body.
#[derive(Debug, Clone)]
enum Damage {
    /// The 8-byte little-endian header length.
    HeaderLen(u64),
    /// Cut the file at this fraction.
    Truncate(f64),
    /// Overwrite a byte of the header JSON.
    HeaderByte(usize, u8),
    /// Replace a JSON field of a tensor entry (`dtype`, `shape`, `data_offsets`).
    Entry(usize, &'static str, serde_json::Value),
    /// Write a float pattern (NaN, inf, huge) over body bytes at this fraction.
    Body(f64, [u8; 4]),
}

/// f32 NaN, inf and -inf as bytes (also NaN or inf in f16 and bf16 halves).
const NON_FINITE: &[[u8; 4]] = &[
    0x7fc0_0000u32.to_le_bytes(),
    0x7f80_0000u32.to_le_bytes(),
    0xff80_0000u32.to_le_bytes(),
];

fn damage() -> impl Strategy<Value = Damage> {
    use serde_json::json;
    prop_oneof![
        prop_oneof![Just(0u64), Just(u64::MAX), Just(1u64 << 40), 0u64..5000]
            .prop_map(Damage::HeaderLen),
        (0.0f64..1.0).prop_map(Damage::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::HeaderByte(i, b)),
        (
            any::<usize>(),
            prop::sample::select(&["dtype", "shape", "data_offsets"][..]),
            prop_oneof![
                Just(json!("I64")),
                Just(json!("I32")),
                Just(json!("U8")),
                Just(json!("BOOL")),
                Just(json!("F64")),
                Just(json!("F8_E4M3")),
                Just(json!([1u64 << 40, 1u64 << 40])),
                Just(json!([0, 8])),
                Just(json!([])),
                Just(json!([u64::MAX, 0])),
                Just(json!([16, 8])),
                Just(json!(-1)),
                Just(json!("x")),
            ]
        )
            .prop_map(|(i, f, v)| Damage::Entry(i, f, v)),
        (0.0f64..1.0, prop::sample::select(NON_FINITE)).prop_map(|(at, b)| Damage::Body(at, b)),
    ]
}

/// `bytes` (a safetensors file) with `d` done to it; whether the result still holds only
/// finite values is not tracked here (the loader must check).
fn damaged(bytes: &[u8], d: &Damage) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (header, body) = (&bytes[8..8 + n], &bytes[8 + n..]);
    let mut out = bytes.to_vec();
    match d {
        Damage::HeaderLen(len) => {
            let len = if *len == n as u64 { len + 1 } else { *len };
            out[..8].copy_from_slice(&len.to_le_bytes())
        }
        Damage::Truncate(f) => out.truncate((out.len() as f64 * f) as usize),
        Damage::HeaderByte(i, b) => out[8 + i % n] = *b,
        Damage::Entry(i, field, v) => {
            let mut json: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(header).unwrap();
            let keys: Vec<String> = json
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let key = &keys[i % keys.len()];
            json.get_mut(key).unwrap()[*field] = v.clone();
            let text = serde_json::to_vec(&json).unwrap();
            out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text);
            out.extend(body);
        }
        Damage::Body(at, pattern) => {
            // Aligned to an f32 element of the body.
            let i = 8 + n + ((body.len() as f64 * at) as usize / 4) * 4;
            if i + 4 <= out.len() {
                out[i..i + 4].copy_from_slice(pattern);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(cases(200))]

    /// A damaged `model.safetensors`: an error naming the file or the tensor, never a panic or an
    /// allocation of what the header claims; NaN or inf written into the weights is refused.
    #[test]
    fn damaged_safetensors_are_refused(d in damage()) {
        let (clean, bytes) = tiny_model();
        let dir = scratch_once("st");
        std::fs::copy(clean.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::write(dir.join("model.safetensors"), damaged(bytes, &d)).unwrap();
        match Llama::from_pretrained(&dir, &Device::flex(), DType::F32) {
            Ok(_) => prop_assert!(
                !matches!(d, Damage::Body(..) | Damage::HeaderLen(..) | Damage::Truncate(..)),
                "{d:?} was accepted"
            ),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("model.safetensors") || msg.contains('`'),
                    "{d:?} -> {msg}"
                );
            }
        }
    }
}

/// The PEFT adapter fixture (for the fixture Llama) and its safetensors bytes.
fn adapter_fixture() -> (PathBuf, Vec<u8>, serde_json::Value) {
    let dir = fixtures().join("lora/adapter");
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    (dir, bytes, config)
}

const ADAPTER_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "bias",
    "fan_in_fan_out",
    "peft_type",
    "task_type",
    "use_dora",
    "modules_to_save",
    "layers_to_transform",
];

proptest! {
    #![proptest_config(cases(128))]

    /// A PEFT adapter with a field of `adapter_config.json` replaced or its safetensors damaged:
    /// an error naming the file or the key when loaded and attached to the fixture Llama, never
    /// a panic; a non-finite factor never loads.
    #[test]
    fn damaged_adapters_are_refused(
        field in prop::sample::select(ADAPTER_FIELDS),
        value in json_value(),
        d in damage(),
        which in 0u8..2,
    ) {
        static MODEL: OnceLock<Llama> = OnceLock::new();
        let (src, bytes, mut config) = adapter_fixture();
        let dir = scratch_once("adapter");
        let (config_text, weights) = match which {
            0 => {
                config[field] = value.clone();
                (config.to_string(), bytes.clone())
            }
            _ => (
                std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
                damaged(&bytes, &d),
            ),
        };
        std::fs::write(dir.join("adapter_config.json"), &config_text).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
        let base = MODEL.get_or_init(|| {
            Llama::from_pretrained(fixtures().join("llama/model"), &Device::flex(), DType::F32)
                .unwrap()
                .1
        });
        let loaded = PeftAdapter::load(&dir).and_then(|_| {
            let mut m = LoraModel::new(base.clone());
            m.load_adapter("default", &dir)
        });
        match loaded {
            Ok(()) => prop_assert!(
                which == 0 || !matches!(d, Damage::Body(..) | Damage::HeaderLen(..) | Damage::Truncate(..)),
                "{d:?} was accepted"
            ),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("adapter") || msg.contains('`'),
                    "{field}={value} / {d:?} -> {msg}"
                );
            }
        }
    }
}

/// JSONL lines of every shape: valid records, wrong types, broken JSON, arbitrary text.
fn jsonl_line() -> impl Strategy<Value = String> {
    prop_oneof![
        ("[ -~]{0,20}", "[ -~]{0,20}")
            .prop_map(|(p, r)| serde_json::json!({"prompt": p, "response": r}).to_string()),
        json_value().prop_map(|v| serde_json::json!({"prompt": v, "response": "x"}).to_string()),
        json_value().prop_map(|v| v.to_string()),
        Just("{\"prompt\": \"a\"".to_string()),
        Just(String::new()),
        "[ -~]{0,40}",
        "\\PC{0,20}",
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    /// JSONL files of random lines: rows, or an error naming the file and the line of the
    /// first bad record (or the file, when it has no record); never a panic.
    #[test]
    fn jsonl_lines_error_with_file_and_line(
        lines in prop::collection::vec(jsonl_line(), 0..6),
        seq_len in 2usize..40,
    ) {
        let dir = scratch_once("jsonl");
        let path = dir.join("data.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        match load_jsonl(std::slice::from_ref(&path), &Tokenizer::Byte, None, seq_len) {
            Ok(d) => {
                for row in &d.examples {
                    prop_assert!(row.ids.len() <= seq_len);
                    prop_assert!(row.ids.iter().all(|&t| (0..259).contains(&t)));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("data.jsonl"), "{lines:?} -> {msg}");
            }
        }
    }
}

/// A checkpoint of the tiny addition job (one step, 2 ranks, ZeRO-3), made once by the binary.
fn checkpoint() -> &'static PathBuf {
    static CKPT: OnceLock<PathBuf> = OnceLock::new();
    CKPT.get_or_init(|| {
        let out = scratch("ckpt-run");
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", "--world-size", "2"])
            .args(
                [
                    format!("train.output_dir={}", out.display()),
                    "train.steps=1".into(),
                    "train.global_batch=4".into(),
                    "train.micro_batch=2".into(),
                    "data.digits=2".into(),
                    "data.seq_len=16".into(),
                    "data.eval_examples=4".into(),
                    "zero.stage=3".into(),
                ]
                .iter()
                .flat_map(|s| ["--set".to_string(), s.clone()]),
            )
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        kiln_zero::latest_checkpoint(out.join("checkpoints"))
            .unwrap()
            .unwrap()
    })
}

/// Copies checkpoint folder `from` to a fresh `to`.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Edits of a manifest that keep it valid JSON.
#[derive(Debug, Clone)]
enum Edit {
    WorldSize(usize),
    Stage(serde_json::Value),
    Shape(usize, Vec<usize>),
    FileName(usize, String),
    FileBytes(usize, u64),
    DropFile(usize),
    Step(u64),
    Extra(serde_json::Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    use serde_json::json;
    prop_oneof![
        prop_oneof![Just(0usize), Just(1), Just(3), Just(usize::MAX)].prop_map(Edit::WorldSize),
        prop_oneof![Just(json!(7)), Just(json!("Four")), Just(json!(null))].prop_map(Edit::Stage),
        (
            any::<usize>(),
            prop::collection::vec(
                prop_oneof![Just(0usize), Just(1 << 31), Just(usize::MAX), 1usize..300],
                0..4
            )
        )
            .prop_map(|(i, s)| Edit::Shape(i, s)),
        (
            any::<usize>(),
            prop_oneof![
                Just("../x".to_string()),
                Just("/etc/passwd".to_string()),
                Just(String::new()),
                Just(".".to_string()),
                "[a-z.]{1,8}"
            ]
        )
            .prop_map(|(i, s)| Edit::FileName(i, s)),
        (
            any::<usize>(),
            prop_oneof![Just(0u64), Just(u64::MAX), 1u64..1000]
        )
            .prop_map(|(i, b)| Edit::FileBytes(i, b)),
        any::<usize>().prop_map(Edit::DropFile),
        any::<u64>().prop_map(Edit::Step),
        prop_oneof![
            Just(json!(null)),
            Just(json!({"step": "x"})),
            Just(json!([1]))
        ]
        .prop_map(Edit::Extra),
    ]
}

fn apply(m: &mut serde_json::Value, e: &Edit) {
    match e {
        Edit::WorldSize(n) => m["world_size"] = (*n).into(),
        Edit::Stage(s) => m["stage"] = s.clone(),
        Edit::Shape(i, shape) => {
            let units = m["units"].as_array_mut().unwrap();
            let n = units.len();
            let unit = &mut units[i % n]["trainable"];
            if let Some(list) = unit.as_array_mut()
                && !list.is_empty()
            {
                let k = (i / n) % list.len();
                list[k][1] = serde_json::json!(shape);
            }
        }
        Edit::FileName(i, name) => {
            let files = m["files"].as_array_mut().unwrap();
            let n = files.len();
            files[i % n]["file"] = name.clone().into();
        }
        Edit::FileBytes(i, b) => {
            let files = m["files"].as_array_mut().unwrap();
            let n = files.len();
            files[i % n]["bytes"] = (*b).into();
        }
        Edit::DropFile(i) => {
            let files = m["files"].as_array_mut().unwrap();
            let n = files.len();
            files.remove(i % n);
        }
        Edit::Step(s) => {
            if let Some(extra) = m["extra"].as_object_mut() {
                extra.insert("step".into(), (*s).into());
            }
        }
        Edit::Extra(v) => m["extra"] = v.clone(),
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Any byte of `manifest.json` changed (an edited step, a flipped bit): the checksum refuses
    /// it, naming the file.
    #[test]
    fn an_edited_manifest_fails_its_checksum(at in any::<usize>(), byte in any::<u8>()) {
        let ckpt = checkpoint();
        let dir = scratch_once("manifest-bytes").join("step");
        copy_dir(ckpt, &dir);
        let path = dir.join("manifest.json");
        let mut text = std::fs::read(&path).unwrap();
        let i = at % text.len();
        prop_assume!(text[i] != byte);
        text[i] = byte;
        std::fs::write(&path, &text).unwrap();
        let e = kiln_zero::read_full_checkpoint(&dir);
        prop_assert!(e.is_err(), "byte {i} -> {byte} accepted");
        let msg = e.err().unwrap().to_string();
        prop_assert!(msg.contains("manifest.json"), "{msg}");
    }

    /// A manifest edited and given a matching checksum (a hostile or buggy writer): the
    /// checkpoint loads only when it is consistent, else an error naming the folder or file;
    /// never a panic or an allocation of the shapes it claims.
    #[test]
    fn a_resealed_hostile_manifest_errors(edits in prop::collection::vec(edit(), 1..3)) {
        let ckpt = checkpoint();
        let dir = scratch_once("manifest-edit").join("step");
        copy_dir(ckpt, &dir);
        let path = dir.join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for e in &edits {
            apply(&mut m, e);
        }
        // Reseal: parse as a Manifest where possible and write it with its checksum.
        let sealed = serde_json::from_value::<kiln_zero::Manifest>(m.clone())
            .ok()
            .and_then(|m| kiln_zero::manifest_text(&m).ok())
            .unwrap_or_else(|| serde_json::to_vec_pretty(&m).unwrap());
        std::fs::File::create(&path).unwrap().write_all(&sealed).unwrap();
        if let Err(e) = kiln_zero::read_full_checkpoint(&dir) {
            let msg = e.to_string();
            prop_assert!(msg.contains(dir.to_str().unwrap()), "{edits:?} -> {msg}");
        }
        if let Err(e) = kiln_trainer::train::checkpoint_config(&dir) {
            let msg = e.to_string();
            prop_assert!(msg.contains("manifest.json"), "{edits:?} -> {msg}");
        }
    }
}
