//! The cases of the hostile-user review, end to end through the `kiln` binary: each exits
//! non-zero with a message naming the file, field or flag (or behaves correctly where the input
//! is valid), never a panic; a diverging run stops with the previous checkpoint the newest.

#[allow(dead_code)]
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{fixtures, kiln, ok, tiny};

/// Runs kiln, which must fail cleanly: non-zero, not a panic (101), `kiln: error:` on stderr.
fn fails(args: &[&str]) -> String {
    let out = kiln(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "kiln {args:?} should fail:\n{}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "kiln {args:?} panicked:\n{err}"
    );
    assert!(!err.contains("panicked"), "kiln {args:?} panicked:\n{err}");
    assert!(err.contains("kiln: error:"), "kiln {args:?}:\n{err}");
    err
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn args<'a>(head: &[&'a str], rest: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(rest.iter().map(String::as_str))
        .collect()
}

/// The fixture Llama copied with `edit` applied to its `config.json`.
fn fixture_model_with(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures().join("llama/model");
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
    dir
}

#[test]
fn a_diverging_run_stops_and_keeps_the_previous_checkpoint_newest() {
    // lr 1e300 after a warm-up step of lr 0: step 1 trains and is checkpointed, step 2's update
    // makes the weights infinite; the run must stop instead of checkpointing them.
    let out = scratch("diverge");
    let sets = tiny(
        &out,
        4,
        &[
            "optim.lr=1e300",
            "optim.warmup_steps=1",
            "train.checkpoint_interval=1",
            "precision.compute=f32",
        ],
    );
    let e = fails(&args(&["train"], &sets));
    assert!(e.contains("not finite") || e.contains("diverged"), "{e}");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000001", "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_nan_weight_in_a_pretrained_model_is_refused() {
    let dir = fixture_model_with("nan-weights", |_| {});
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let e = fails(&["eval", "--pretrained", dir.to_str().unwrap()]);
    assert!(
        e.contains("not finite") && e.contains("model.safetensors"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_with_nothing_to_resume_is_an_error() {
    let out = scratch("resume-nothing");
    let sets = tiny(&out, 1, &[]);
    let e = fails(&args(&["train", "--resume"], &sets));
    assert!(e.contains("--resume") && e.contains("no checkpoint"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn special_ids_outside_the_vocabulary_name_the_file_and_key() {
    // A byte-level model (vocab 256 < 259) takes its special ids from config.json.
    for (key, value) in [
        ("eos_token_id", serde_json::json!(300)),
        ("eos_token_id", serde_json::json!(-1)),
        ("bos_token_id", serde_json::json!(1000)),
    ] {
        let dir = fixture_model_with("special-ids", |j| j[key] = value.clone());
        let out = scratch("special-ids-out");
        let sets = tiny(&out, 1, &[&format!("model.pretrained={}", dir.display())]);
        let e = fails(&args(&["train"], &sets));
        assert!(
            e.contains("config.json") && e.contains(key),
            "{key}={value}: {e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&out);
    }
    // HF allows several end-of-sequence ids: the list is valid.
    let dir = fixture_model_with("eos-list", |j| {
        j["eos_token_id"] = serde_json::json!([2, 3])
    });
    let text = dir.join("text.txt");
    std::fs::write(&text, "the quick brown fox. ".repeat(30)).unwrap();
    let out = ok(&[
        "eval",
        "--pretrained",
        dir.to_str().unwrap(),
        "--set",
        "data.seq_len=32",
        "--data",
        text.to_str().unwrap(),
    ]);
    assert!(out.contains("perplexity"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_json_fields_name_the_file_and_field() {
    for (key, value, field) in [
        ("rope_theta", serde_json::json!("big"), "rope_theta"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 0,
                "low_freq_factor": 1, "high_freq_factor": 4,
                "original_max_position_embeddings": 64}),
            "factor",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8,
                "low_freq_factor": 1, "high_freq_factor": 4,
                "original_max_position_embeddings": -5}),
            "original_max_position_embeddings",
        ),
        ("hidden_size", serde_json::json!(u64::MAX), "hidden_size"),
    ] {
        let dir = fixture_model_with("config-fields", |j| j[key] = value.clone());
        let e = fails(&["eval", "--pretrained", dir.to_str().unwrap()]);
        assert!(
            e.contains("config.json") && e.contains(field),
            "{key}={value}: {e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sizes_are_checked_before_allocating() {
    let out = scratch("sizes");
    for set in [
        "data.eval_examples=1000000000000",
        "data.seq_len=1000000000000",
    ] {
        let sets = tiny(&out, 1, &[set]);
        let field = set.split('=').next().unwrap();
        let started = std::time::Instant::now();
        let e = fails(&args(&["train"], &sets));
        assert!(e.contains(field), "{set}: {e}");
        assert!(
            started.elapsed().as_secs() < 30,
            "{set}: took {:?}",
            started.elapsed()
        );
    }
    for a in [
        &[
            "estimate",
            "--psi",
            "1e9",
            "--batch",
            "1",
            "--seq",
            "5000000000",
        ][..],
        &["estimate", "--psi", "NaN"],
        &["estimate", "--psi", "inf"],
        &["estimate", "--psi", "-1e9"],
        &["estimate", "--psi", "1e9", "-n", "0"],
        &["estimate", "--psi", "1e9", "--k", "NaN"],
        &["estimate", "--psi", "1e9", "--frozen", "-1e12"],
    ] {
        let o = kiln(a);
        let text = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{a:?}: {err}");
        let negative = (0..10).any(|d| text.contains(&format!("| -{d}")));
        assert!(
            !text.contains("NaN") && !text.contains("inf") && !negative,
            "{a:?}: {text}"
        );
    }
    let model = fixtures().join("llama/model");
    let started = std::time::Instant::now();
    let e = fails(&[
        "generate",
        "--pretrained",
        model.to_str().unwrap(),
        "--prompt",
        &"x".repeat(100_000),
    ]);
    assert!(e.contains("max_position_embeddings"), "{e}");
    assert!(started.elapsed().as_secs() < 30);
    // Negative numbers are values, checked as such.
    let e = fails(&[
        "generate",
        "--pretrained",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--temperature",
        "-1",
    ]);
    assert!(e.contains("temperature"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn no_held_out_rows_is_said_not_reported_as_a_loss_of_zero() {
    let out = scratch("no-eval");
    let sets = tiny(&out, 1, &["data.eval_examples=0"]);
    let text = ok(&args(&["train"], &sets));
    assert!(text.contains("no held-out evaluation"), "{text}");
    assert!(!text.contains("perplexity 1.000"), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let model = fixtures().join("llama/model");
    let text = scratch("pipe").join("text.txt");
    std::fs::write(&text, "the quick brown fox. ".repeat(30)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "eval",
            "--pretrained",
            model.to_str().unwrap(),
            "--set",
            "data.seq_len=32",
            "--data",
            text.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before kiln writes its result (`kiln eval ... | true`).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(141), "{err}");
}

#[test]
fn a_file_where_a_folder_goes_is_named() {
    let dir = scratch("not-a-folder");
    let file = dir.join("out");
    std::fs::write(&file, "x").unwrap();
    let sets = tiny(&file, 1, &[]);
    let e = fails(&args(&["train"], &sets));
    assert!(
        e.contains("train.output_dir") && e.contains("not a folder"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f16_keeps_skipping_non_finite_steps_warns_and_never_checkpoints_them() {
    // f16 with the loss scaler: steps with inf/NaN gradients are skipped (torch's GradScaler);
    // weights made infinite by lr 1e300 keep every later step skipped, which is warned about, and
    // the final checkpoint of those weights is refused.
    let out = scratch("f16-skips");
    let sets = tiny(
        &out,
        14,
        &[
            "optim.lr=1e300",
            "optim.warmup_steps=1",
            "precision.compute=f16",
            "dist.world_size=1",
        ],
    );
    let e = fails(&args(&["train"], &sets));
    assert!(e.contains("steps in a row skipped"), "{e}");
    assert!(e.contains("not finite"), "{e}");
    assert!(!out.join("checkpoints/latest").exists(), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}
