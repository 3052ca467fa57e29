//! The three parameterised layers of a Llama, with weights in Hugging Face layout.

use burn::module::{LoraAdapter, Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::source::{ParamSource, SplitMix64, fnv1a};

/// `y = x W^T` with `W` stored as HF's `[out_features, in_features]`.
///
/// A LoRA adapter attached to `weight` (burn's [`LoraAdapter`] reparameterization, as kiln-lora
/// attaches it by parameter path) runs on activations, as PEFT's `lora.Linear` does:
/// `y = x W0ᵀ + scaling · drop(x) Aᵀ Bᵀ` with `A = lora_A` `[r, in]` (burn's `b`) and
/// `B = lora_B` `[out, r]` (burn's `a`). That costs `O(rows · r · (in + out))` instead of the dense
/// `W0 + scaling · B A` that `weight.val()` would build, and it is where PEFT's `lora_dropout`
/// acts: on the adapter's input only, never on the frozen base path.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    /// Tells this layer's adapter-dropout masks apart from every other layer's: a hash of its
    /// parameter path (`model.layers.3.self_attn.q_proj`).
    pub salt: u64,
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
            salt: fnv1a(key.as_bytes()),
        })
    }

    /// # Shapes
    /// `x: [..., in_features]` -> `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_with(x, None)
    }

    /// [`Linear::forward`] in training: an attached adapter reads its input through `dropout`
    /// (`None`, or `p = 0`: no dropout, as in evaluation).
    pub fn forward_with<const D: usize>(
        &self,
        x: Tensor<D>,
        dropout: Option<&AdapterDropout>,
    ) -> Tensor<D> {
        match self.adapter() {
            None => kiln_kernels::linear(x, self.weight.val()),
            Some(lora) => {
                let base = kiln_kernels::linear(x.clone(), self.weight.base());
                // `drop(x) = x · m / (1 - p)`: the 0/1 mask is exact in any dtype, and the
                // `1 / (1 - p)` joins the scaling on the rank-r product (no rounded bf16 scale).
                let (x, keep) = match dropout {
                    Some(d) if d.p > 0.0 => {
                        let mask = d.mask(x.dims(), self.salt, &x.device(), x.dtype());
                        (x * mask, d.keep_scale())
                    }
                    _ => (x, 1.0),
                };
                base + low_rank(x, lora, keep)
            }
        }
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
        let product = |w: Tensor<2>, x: Tensor<D>| {
            w.unsqueeze::<D>()
                .matmul(x.swap_dims(D - 2, D - 1))
                .swap_dims(D - 2, D - 1)
        };
        match self.adapter() {
            None => product(self.weight.val(), x),
            Some(lora) => product(self.weight.base(), x.clone()) + low_rank(x, lora, 1.0),
        }
    }

    /// Up to this many rows, [`Linear::forward_few_rows`] multiplies as `(W xᵀ)ᵀ`.
    pub const FEW_ROWS: usize = 64;

    /// The attached LoRA adapter, when its factors are in HF orientation for this weight
    /// (`a: [out, r]`, `b: [r, in]`); any other reparameterization runs through `weight.val()`.
    fn adapter(&self) -> Option<&LoraAdapter> {
        let lora = self.weight.adapter()?;
        let [out, inp] = self.weight.lazy_shape().dims();
        let (a, b) = (
            lora.a.lazy_shape().dims::<2>(),
            lora.b.lazy_shape().dims::<2>(),
        );
        (a[0] == out && b[1] == inp && a[1] == b[0]).then_some(lora)
    }
}

/// `factor · scaling · x Aᵀ Bᵀ`: down to rank r, then up (PEFT's `lora_B(lora_A(x)) * scaling`),
/// in the input's dtype.
fn low_rank<const D: usize>(x: Tensor<D>, lora: &LoraAdapter, factor: f64) -> Tensor<D> {
    let down = kiln_kernels::linear(x, lora.b.val());
    kiln_kernels::linear(down, lora.a.val()).mul_scalar(lora.scale * factor)
}

/// PEFT's `lora_dropout` for one training forward: an adapter reads its layer's input through
/// inverted dropout, `x · m / (1 - p)` with `m ~ Bernoulli(1 - p)` per element; the frozen base
/// path sees `x` unchanged.
///
/// The mask is a function of `(seed, layer, global row, position, feature)` only: not of the
/// rank, the micro-batch or the call. A block recomputed for its backward (ZeRO-3) therefore draws
/// the mask its forward drew, and N ranks drop exactly the elements one rank drops on the whole
/// batch, so data-parallel training stays equal to single-rank training with dropout on.
/// Use a new `seed` per optimizer step; `first_row` is the batch's first row in the step's
/// global batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterDropout {
    /// Probability of zeroing an element, in `[0, 1)`.
    pub p: f64,
    pub seed: u64,
    pub first_row: u64,
}

impl AdapterDropout {
    pub fn new(p: f64, seed: u64, first_row: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(ModelError::Input(format!(
                "adapter dropout p = {p}: must be in [0, 1)"
            )));
        }
        Ok(Self { p, seed, first_row })
    }

    /// The same dropout for the rows from `rows` on (a later micro-batch of the same step).
    pub fn skip_rows(self, rows: u64) -> Self {
        Self {
            first_row: self.first_row + rows,
            ..self
        }
    }

    /// `1 / (1 - p)`: what a kept element is scaled by.
    pub fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }

    /// The keep mask of layer `salt` (1 kept, 0 dropped) of `dims` = `[rows, ...]`: element `i`
    /// of row `b` (row-major within the row) keeps when the 32-bit draw number
    /// `(first_row + b) · len + i` of the layer's stream falls at or above `p · 2³²`. Dropout is
    /// `x · mask · keep_scale()`.
    pub fn mask<const D: usize>(
        &self,
        dims: [usize; D],
        salt: u64,
        device: &Device,
        dtype: DType,
    ) -> Tensor<D> {
        let rows = dims[0];
        let len: usize = dims[1..].iter().product();
        let stream = SplitMix64::at(self.seed, salt);
        let threshold = (self.p * 4_294_967_296.0) as u64;
        let mut values = Vec::with_capacity(rows * len);
        for b in 0..rows {
            let start = (self.first_row + b as u64) * len as u64;
            let end = start + len as u64;
            // Two 32-bit draws per 64-bit output: draw k is half k % 2 of output k / 2.
            let mut k = start;
            while k < end {
                let bits = SplitMix64::at(stream, k / 2);
                for half in k % 2..2 {
                    if k == end {
                        break;
                    }
                    let draw = (bits >> (32 * half)) & 0xffff_ffff;
                    values.push(if draw >= threshold { 1.0f32 } else { 0.0 });
                    k += 1;
                }
            }
        }
        Tensor::<D>::from_data(TensorData::new(values, dims), (device, DType::F32)).cast(dtype)
    }
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
        kiln_kernels::rms_norm(x, self.weight.val(), self.eps)
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
        kiln_kernels::embedding(self.weight.val(), ids)
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
        self.forward_with(x, false, None)
    }

    /// `few_rows`: the projections use [`Linear::forward_few_rows`] (decoding); otherwise
    /// adapters read their input through `dropout` (training).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        few_rows: bool,
        dropout: Option<&AdapterDropout>,
    ) -> Tensor<3> {
        let linear = |l: &Linear, x: Tensor<3>| match few_rows {
            true => l.forward_few_rows(x),
            false => l.forward_with(x, dropout),
        };
        let gate = linear(&self.gate_proj, x.clone());
        linear(
            &self.down_proj,
            kiln_kernels::swiglu(gate, linear(&self.up_proj, x)),
        )
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
