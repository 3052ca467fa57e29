//! The three parameterised layers of a Llama, with weights in Hugging Face layout.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Int, Tensor};

use crate::error::Result;
use crate::source::ParamSource;

/// `y = x W^T` with `W` stored as HF's `[out_features, in_features]`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    pub fn load(
        source: &mut impl ParamSource,
        key: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        let weight = source.tensor(
            &format!("{key}.weight"),
            [out_features, in_features],
            Init::Normal,
        )?;
        Ok(Self {
            weight: Param::from_tensor(weight),
        })
    }

    /// # Shapes
    /// `x: [..., in_features]` -> `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.matmul(self.weight.val().transpose().unsqueeze())
    }

    /// [`Linear::forward`] for the few rows of a decoding step, as `(W xᵀ)ᵀ`, which reads `W` in
    /// its stored layout: on flex `x Wᵀ` costs about as much for 1 row as for 64 (8 ms vs 0.9 ms
    /// for 1 x 256 x 4096), while at training sizes (1024 rows) it is the faster form. The same
    /// products, rounded differently, so only the cached (inference) path uses it: training keeps
    /// one form whatever the number of rows per rank (ZeRO's N-rank vs 1-rank equivalence).
    pub fn forward_few_rows<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        if dims[..D - 1].iter().product::<usize>() > Self::FEW_ROWS {
            return self.forward(x);
        }
        let w = self.weight.val().unsqueeze::<D>();
        w.matmul(x.swap_dims(D - 2, D - 1)).swap_dims(D - 2, D - 1)
    }

    /// Up to this many rows, [`Linear::forward_few_rows`] multiplies as `(W xᵀ)ᵀ`.
    pub const FEW_ROWS: usize = 64;
}

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
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let rms = (x.clone().square().mean_dim(2) + self.eps).sqrt();
        let normed = (x / rms).cast(dtype);
        normed * self.weight.val().unsqueeze()
    }
}

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
        burn::tensor::module::embedding(self.weight.val(), ids)
    }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with(x, false)
    }

    /// `few_rows`: the projections use [`Linear::forward_few_rows`] (decoding).
    pub fn forward_with(&self, x: Tensor<3>, few_rows: bool) -> Tensor<3> {
        let linear = |l: &Linear, x: Tensor<3>| match few_rows {
            true => l.forward_few_rows(x),
            false => l.forward(x),
        };
        let gate = silu(linear(&self.gate_proj, x.clone()));
        linear(&self.down_proj, gate * linear(&self.up_proj, x))
    }
}

/// How a parameter is initialised when a model is created from scratch (HF `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, initializer_range²).
    Normal,
    /// All ones (RMSNorm gains).
    Ones,
}
