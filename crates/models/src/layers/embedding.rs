//! Token embeddings.

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor};

use crate::error::Result;
use crate::source::{Init, ParamSource};

/// Token embeddings `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn load(
        source: &mut impl ParamSource,
        key: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Self> {
        let weight = source.tensor(&format!("{key}.weight"), [vocab, hidden], Init::Normal)?;
        Ok(Self {
            weight: Param::from_tensor(weight),
        })
    }

    /// # Shapes
    /// `ids: [batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        kiln_kernels::embedding(self.weight.val(), ids)
    }
}
