//! LoRA's adapter dropout: a mask that depends on the element's place in the global batch only.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;

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
