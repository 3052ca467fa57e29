//! Fixture access shared by the tests.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// `$KILN_FIXTURES`, else `<repo>/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("KILN_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

pub fn read_json(rel: &str) -> Value {
    let p = fixtures_dir().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn read_bytes(rel: &str) -> Vec<u8> {
    let p = fixtures_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A JSON number, or one of the strings "inf", "-inf", "nan".
pub fn f(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => match s.as_str() {
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            "nan" => f64::NAN,
            other => panic!("not a float: {other}"),
        },
        other => panic!("not a float: {other}"),
    }
}

/// A (possibly nested) JSON array of floats, flattened, as f32.
pub fn flat_f32(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn go(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| go(x, out)),
            x => out.push(f(x) as f32),
        }
    }
    go(v, &mut out);
    out
}

/// Same bits, or both NaN.
pub fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// A tensor of a safetensors file as f32 values plus its shape (F32 only).
pub fn st_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v, t.shape().to_vec())
}

/// A 16-bit tensor's raw bits.
pub fn st_u16(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<u16> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// What a training comparison runs: f32, the two mixed-precision recipes, and pure f16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    F32,
    Bf16Master,
    F16MasterScaler,
    /// Weights live in f16 and every update is rounded into them; no loss scaling. (The AdamW
    /// moments are still f32, which is kinder than true pure f16.)
    F16Pure,
}

/// Without master weights, the weights are whatever the f16 model holds after each update.
pub fn reload_from_model<M: burn::module::Module>(
    master: &mut kiln_precision::MasterWeights,
    model: &M,
) {
    for p in kiln_precision::collect_params(model).unwrap() {
        master.load_param_data(&p.path, &p.data).unwrap();
    }
}

/// Largest |a - b| / ref over a loss curve.
pub fn max_rel_dev(a: &[f32], reference: &[f32]) -> f32 {
    a.iter()
        .zip(reference)
        .map(|(a, r)| (a - r).abs() / r.abs())
        .fold(0.0, f32::max)
}
