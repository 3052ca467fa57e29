//! `Linear`: `y = x Wᵀ` in HF layout, with an attached LoRA adapter run on activations.

use burn::module::{LoraAdapter, Module, Param};
use burn::tensor::Tensor;

use super::dropout::AdapterDropout;
use crate::error::Result;
use crate::rng::fnv1a;
use crate::source::{Init, ParamSource};

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
