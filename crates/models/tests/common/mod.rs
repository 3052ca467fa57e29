#![allow(dead_code)]

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Gradients;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use kiln_models::SafetensorsSource;

/// The fixture root: `$KILN_FIXTURES` when set, else the repository's `fixtures/`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// A reference tensor file (`io.safetensors`), read without shape expectations.
pub struct Io(pub SafetensorsSource);

impl Io {
    pub fn open(path: PathBuf) -> Self {
        Io(SafetensorsSource::open(path, &Device::flex(), DType::F32).unwrap())
    }
    pub fn raw(&self, key: &str) -> TensorData {
        let file = self.0.data(key);
        file.unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn has(&self, key: &str) -> bool {
        self.0.data(key).is_ok()
    }
    pub fn ints<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        Tensor::from_data(self.raw(key), device)
    }
    pub fn floats(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let d = self.raw(key);
        let shape = d.shape().to_vec();
        (d.try_into_vec::<f32>().unwrap(), shape)
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

/// The gradient of every float parameter, keyed by its module path (= HF name).
pub fn named_grads<M: Module>(module: &M, grads: &Gradients) -> Vec<(String, Vec<f32>)> {
    struct Collect<'a> {
        path: Vec<String>,
        grads: &'a Gradients,
        out: Vec<(String, Vec<f32>)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.out.push((self.path.join("."), to_vec(g)));
            }
        }
    }
    let mut c = Collect {
        path: vec![],
        grads,
        out: vec![],
    };
    module.visit(&mut c);
    c.out
}

/// The first wgpu adapter, or `None` (see [`kiln_models::testing::wgpu_device_or_skip`]).
#[cfg(feature = "wgpu")]
pub fn wgpu_device(test: &str) -> Option<Device> {
    kiln_models::testing::wgpu_device_or_skip(test)
}
