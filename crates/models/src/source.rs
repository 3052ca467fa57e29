//! Where parameter values come from: a checkpoint on disk, or a seeded random init.

use std::collections::HashMap;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::rng::{SplitMix64, fnv1a};

/// How a parameter is initialised when a model is created from scratch (HF `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, initializer_range²).
    Normal,
    /// All ones (RMSNorm gains).
    Ones,
}

/// Supplies each parameter by its HF name; models are built by asking for every key in turn,
/// so a source sees exactly the key table of the model.
pub trait ParamSource {
    /// The tensor named `key` with the given shape, in the source's dtype, on its device.
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<D>>;
}

/// Deterministic random init: every tensor's values depend only on the seed and its name, so a rank
/// that builds one unit gets the same values as a rank that builds the whole model.
pub struct RandomInit {
    pub seed: u64,
    /// Standard deviation of `Init::Normal` parameters (HF `initializer_range`, default 0.02).
    pub std: f64,
    pub device: Device,
    pub dtype: DType,
}

impl RandomInit {
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            seed,
            std: 0.02,
            device: device.clone(),
            dtype,
        }
    }
}

impl ParamSource for RandomInit {
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<D>> {
        let n: usize = shape.iter().product();
        let values = match init {
            Init::Ones => vec![1.0f32; n],
            Init::Normal => {
                let mut rng = SplitMix64(self.seed ^ fnv1a(key.as_bytes()));
                (0..n).map(|_| (rng.normal() * self.std) as f32).collect()
            }
        };
        let data = TensorData::new(values, shape).convert_dtype(self.dtype);
        Ok(Tensor::from_data(data, (&self.device, self.dtype)))
    }
}

/// Tensors already in memory, by HF name (a gathered or assembled checkpoint): each is moved out
/// as the model asks for it, cast to `dtype`, so building a model from it holds every value once.
/// What the model never asked for stays in [`TensorMap::rest`].
pub struct TensorMap {
    tensors: HashMap<String, TensorData>,
    device: Device,
    dtype: DType,
    /// Names this source in errors.
    pub source_name: String,
}

impl TensorMap {
    pub fn new(
        tensors: impl IntoIterator<Item = (String, TensorData)>,
        device: &Device,
        dtype: DType,
        source_name: &str,
    ) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
            device: device.clone(),
            dtype,
            source_name: source_name.into(),
        }
    }

    /// The tensors not yet taken.
    pub fn rest(self) -> HashMap<String, TensorData> {
        self.tensors
    }
}

impl ParamSource for TensorMap {
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<D>> {
        let data = self
            .tensors
            .remove(key)
            .ok_or_else(|| ModelError::MissingKey {
                key: key.into(),
                expected: shape.to_vec(),
                source_name: self.source_name.clone(),
            })?;
        if data.shape()[..] != shape[..] {
            return Err(ModelError::ShapeMismatch {
                key: key.into(),
                expected: shape.to_vec(),
                found: data.shape().to_vec(),
                source_name: self.source_name.clone(),
            });
        }
        let data = data.convert_dtype(self.dtype);
        Ok(Tensor::from_data(data, (&self.device, self.dtype)))
    }
}
