//! RMSNorm.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::error::Result;
use crate::source::{Init, ParamSource};

/// `w * x / sqrt(mean(x²) + eps)`, computed in f32 as HF does, returned in the input's dtype.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(source: &mut impl ParamSource, key: &str, size: usize, eps: f64) -> Result<Self> {
        let weight = source.tensor(&format!("{key}.weight"), [size], Init::Ones)?;
        Ok(Self {
            weight: Param::from_tensor(weight),
            eps,
        })
    }

    /// # Shapes
    /// `x: [batch, seq, hidden]` -> same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        kiln_kernels::rms_norm(x, self.weight.val(), self.eps)
    }
}
