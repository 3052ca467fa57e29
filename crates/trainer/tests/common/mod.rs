//! What the binary-level tests share: running `kiln`, a run that must succeed, the fixture root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `kiln args...`, its status and output.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln")
}

/// Runs kiln, which must succeed; its stdout and stderr.
pub fn ok(args: &[&str]) -> String {
    let out = kiln(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kiln {args:?} failed:\n{text}");
    text
}

/// `KILN_FIXTURES`, or the repository's `fixtures/`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// `--set` pairs of a few steps of the tiny addition job writing to `out` (8 rows of 16 tokens a
/// step, micro-batches of 2, a loss line every step, 8 held-out pairs), then those of `extra`.
pub fn tiny(out: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    [
        format!("train.output_dir={}", out.display()),
        format!("train.steps={steps}"),
        "train.global_batch=8".into(),
        "train.micro_batch=2".into(),
        "train.log_interval=1".into(),
        "data.digits=2".into(),
        "data.seq_len=16".into(),
        "data.eval_examples=8".into(),
    ]
    .into_iter()
    .chain(extra.iter().map(|s| s.to_string()))
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// (step, value) of every record of `<out>/metrics.jsonl` that has one of `keys` (the first of
/// them it has).
pub fn metric(out: &Path, keys: &[&str]) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let value = keys.iter().find_map(|k| v.get(k))?;
            Some((v.get("step")?.as_u64()?, value.as_f64()?))
        })
        .collect()
}
