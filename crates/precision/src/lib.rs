//! Mixed precision for kiln, applied to a model from the outside.
//!
//! The recipe (fp16): keep fp32 master weights ([`MasterWeights`]); run forward and backward on a
//! compute copy cast with [`cast_module`]; multiply the loss by the [`DynamicLossScaler`]'s scale;
//! copy the compute-dtype gradients into the f32 buffer ([`collect_grads`] →
//! [`MasterWeights::set_grads`]), unscale and check for inf/NaN in one pass
//! ([`unscale_and_check`]); step AdamW in f32 unless a rank found inf/NaN; write the new weights
//! back in the compute dtype ([`write_back`]). With bf16 compute ([`Policy::default`]) the scaler
//! is off.
//!
//! ```no_run
//! # use burn::tensor::{DType, Device};
//! # use kiln_precision::*;
//! # fn demo<M: burn::module::Module>(model: M, loss_of: impl Fn(&M) -> burn::tensor::Tensor<1>) -> Result<()> {
//! let policy = Policy::fp16();
//! let mut scaler = policy.loss_scaler();
//! let mut master = master_weights_for(&model, |_| 0, vec![ParamGroup::default()], AdamWConfig::default())?;
//! let mut model = cast_module(model, policy.compute);
//! let loss = loss_of(&model);
//! let loss = match &scaler { Some(s) => s.scale_loss(loss), None => loss.cast(DType::F32) };
//! let grads = loss.backward();
//! let grads = collect_grads(&model, &grads)?;
//! master.set_grads(grads.iter().map(|(p, g)| (p.as_str(), g)))?;
//! let outcome = master.step(scaler.as_mut())?;
//! model = write_back(&master, model, policy.compute)?;
//! # Ok(()) }
//! ```

mod adamw;
mod error;
mod flat;
mod layout;
mod master;
mod module;
mod scaler;

pub use adamw::{AdamW, AdamWConfig, AdamWState, ParamGroup};
pub use error::{PrecisionError, Result};
pub use flat::{
    bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, has_non_finite, sum_of_squares,
    unscale_and_check,
};
pub use layout::{FlatEntry, FlatLayout, Shard};
pub use master::{MasterWeights, StepOutcome};
pub use module::{
    NamedParam, Policy, cast_module, collect_grads, collect_params, collect_params_where,
    master_weights_for, param_counts, param_paths, take_grads, write_back,
};
pub use scaler::{DynamicLossScaler, ScaleWarning, ScalerConfig, ScalerState, ScalerUpdate};
