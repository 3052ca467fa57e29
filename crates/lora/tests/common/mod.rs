#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Gradients, Int, Tensor, TensorData};
use kiln_models::{Context, Llama, LlamaConfig};
use safetensors::SafeTensors;

/// The fixture root: `$KILN_FIXTURES` when set, else the repository's `fixtures/`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// `fixtures/lora/meta.json`'s `cases`: (adapter folder, io file) pairs.
pub fn lora_cases() -> Vec<(PathBuf, PathBuf)> {
    let root = fixtures().join("lora");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("meta.json")).unwrap()).unwrap();
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                root.join(c["adapter_dir"].as_str().unwrap()),
                root.join(c["io_file"].as_str().unwrap()),
            )
        })
        .collect()
}

/// A reference tensor file, read without shape expectations.
pub struct Io {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

impl Io {
    pub fn open(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Io { path, bytes }
    }
    pub fn keys(&self) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
        keys.sort();
        keys
    }
    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(key)
            .is_ok()
    }
    pub fn raw(&self, key: &str) -> TensorData {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no tensor {key}", self.path.display()));
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::I64 => DType::I64,
            other => panic!("{key}: dtype {other:?}"),
        };
        TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype)
    }
    pub fn ints<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        Tensor::from_data(self.raw(key), device)
    }
    pub fn floats(&self, key: &str) -> Vec<f32> {
        self.raw(key)
            .convert_dtype(DType::F32)
            .try_into_vec::<f32>()
            .unwrap()
    }
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The fixture Llama on `device`, with its config.
pub fn fixture_llama(device: &Device) -> (LlamaConfig, Llama) {
    Llama::from_pretrained(fixtures().join("llama/model"), device, DType::F32).unwrap()
}

/// A rotary/mask context for `ids`.
pub fn context(config: &LlamaConfig, ids: &Tensor<2, Int>, device: &Device) -> Context {
    let [batch, seq] = ids.dims();
    Context::new(config, batch, seq, None, device, DType::F32).unwrap()
}

/// Every float parameter of a module with its path and value, in module order.
pub fn params<M: Module>(module: &M) -> Vec<(String, Vec<f32>)> {
    visit(module, None)
}

/// The parameters (by path) that received a gradient.
pub fn params_with_grad<M: Module>(module: &M, grads: &Gradients) -> Vec<String> {
    visit(module, Some(grads))
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Values of all float parameters, or the gradients of those that have one.
fn visit<M: Module>(module: &M, grads: Option<&Gradients>) -> Vec<(String, Vec<f32>)> {
    struct V<'g> {
        path: Vec<String>,
        grads: Option<&'g Gradients>,
        out: Vec<(String, Vec<f32>)>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = match self.grads {
                None => Some(param.val()),
                Some(g) => param.val().grad(g),
            };
            if let Some(v) = value {
                self.out.push((self.path.join("."), to_vec(v)));
            }
        }
    }
    let mut v = V {
        path: vec![],
        grads,
        out: vec![],
    };
    module.visit(&mut v);
    v.out
}

/// A fresh, empty scratch folder under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
