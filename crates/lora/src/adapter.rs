//! An adapter's data: the weight it targets, its factors in PEFT orientation, and their layout
//! in burn's `LoraAdapter`.

use std::collections::BTreeMap;

use burn::module::ParamId;
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::config::LoraConfig;

/// A 2-D float parameter named `weight`: what an adapter can attach to.
#[derive(Debug, Clone)]
pub struct WeightInfo {
    /// As stored: `[out, in]` for HF linear layers.
    pub shape: [usize; 2],
    pub dtype: DType,
    pub device: Device,
    /// burn's name of the owning module type, e.g. `Struct:Linear`.
    pub container: String,
}

impl WeightInfo {
    pub(crate) fn is_linear(&self) -> bool {
        self.container.ends_with("Linear")
    }

    /// `(out_features, in_features)` under the adapter's layout.
    pub(crate) fn out_in(&self, fan_in_fan_out: bool) -> (usize, usize) {
        match fan_in_fan_out {
            false => (self.shape[0], self.shape[1]),
            true => (self.shape[1], self.shape[0]),
        }
    }
}

/// One module's factors, in PEFT orientation: `a` is `lora_A` `[r, in]`, `b` is `lora_B` `[out, r]`.
/// The ids stay with the adapter across switches, so optimizer state keyed by them survives.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) a: Tensor<2>,
    pub(crate) b: Tensor<2>,
    pub(crate) a_id: ParamId,
    pub(crate) b_id: ParamId,
}

#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    pub(crate) config: LoraConfig,
    pub(crate) layers: BTreeMap<String, Layer>,
}

impl Layer {
    pub(crate) fn new(a: Tensor<2>, b: Tensor<2>) -> Self {
        Self {
            a,
            b,
            a_id: ParamId::new(),
            b_id: ParamId::new(),
        }
    }
}

pub(crate) fn tensor(data: TensorData, info: &WeightInfo) -> Tensor<2> {
    Tensor::from_data(data.convert_dtype(info.dtype), (&info.device, info.dtype))
}

/// burn's `LoraAdapter` composes `base + scale · (a @ b)`. With HF `[out, in]` weights that is
/// `a = B`, `b = A`; with `fan_in_fan_out` (`[in, out]`) it is `a = Aᵀ`, `b = Bᵀ`.
pub(crate) fn peft_to_burn(
    layer: &Layer,
    fan_in_fan_out: bool,
) -> ((Tensor<2>, ParamId), (Tensor<2>, ParamId)) {
    match fan_in_fan_out {
        false => ((layer.b.clone(), layer.b_id), (layer.a.clone(), layer.a_id)),
        true => (
            (layer.a.clone().transpose(), layer.a_id),
            (layer.b.clone().transpose(), layer.b_id),
        ),
    }
}

/// Inverse of [`peft_to_burn`] on values: `(burn a, burn b)` -> `(A, B)`.
pub(crate) fn burn_to_peft(
    a: Tensor<2>,
    b: Tensor<2>,
    fan_in_fan_out: bool,
) -> (Tensor<2>, Tensor<2>) {
    match fan_in_fan_out {
        false => (b, a),
        true => (a.transpose(), b.transpose()),
    }
}
