//! The SwiGLU feed-forward block.

use burn::module::Module;
use burn::tensor::Tensor;

use super::dropout::AdapterDropout;
use super::linear::Linear;

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
