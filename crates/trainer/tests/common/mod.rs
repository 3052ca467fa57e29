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
