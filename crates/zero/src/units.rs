//! The seam between the engine and a model: a stack of units, parameters by HF path.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::error::{Result, ZeroError};

/// A model seen as a stack of units: unit 0 reads the batch, units `1..n-1` map hidden states to
/// hidden states, and the last unit (final norm + head + loss) returns the loss *sum*.
///
/// The engine never looks inside a unit; it only needs each unit's parameters by HF path, a way
/// to replace them, and the gradients of one unit after a backward pass.
pub trait Units {
    /// This rank's input for one micro-batch (token ids, labels, masks, ...).
    type Batch;

    /// Number of units, at least 2 (the first unit and the loss unit).
    fn num_units(&self) -> usize;

    /// Every float parameter `unit` owns, by HF path, in a fixed order (the same on every rank).
    fn unit_params(&self, unit: usize) -> Result<Vec<(String, TensorData)>>;

    /// Parameters that `unit` also computes with but an earlier unit owns, by HF path: tied
    /// weights, such as the embedding a tied head reuses. The engine gives the owner the
    /// gradient of every use, and under stage 3 gathers them with `unit` too. Default: none.
    fn shared_params(&self, _unit: usize) -> Vec<String> {
        Vec::new()
    }

    /// Replaces parameters of `unit` by path; the data's dtype is the new compute dtype. Under
    /// stage 3 this brings back the whole parameters of a released unit.
    fn set_unit_params(&mut self, unit: usize, values: Vec<(String, TensorData)>) -> Result<()>;

    /// Drops the values of every parameter of `unit`, its shared ones included (stage 3 holds a
    /// unit's whole parameters only while it runs); [`release_params`] does it for a burn
    /// module. Until the next [`set_unit_params`](Self::set_unit_params) the unit is not run.
    fn release_unit(&mut self, unit: usize) -> Result<()>;

    /// Forward of `unit` in `0..num_units() - 1`; `input` is `None` for unit 0.
    ///
    /// # Shapes
    /// `input: [batch, seq, hidden]` -> `[batch, seq, hidden]`
    fn forward(&self, unit: usize, input: Option<Tensor<3>>, batch: &Self::Batch) -> Tensor<3>;

    /// The last unit: the sum of the token losses (not the mean, so ranks can normalise by the
    /// global token count).
    ///
    /// # Shapes
    /// `input: [batch, seq, hidden]` -> `[1]` in f32
    fn loss_sum(&self, input: Tensor<3>, batch: &Self::Batch) -> Tensor<1>;

    /// Number of tokens that count in the loss of `batch`.
    fn tokens(&self, batch: &Self::Batch) -> usize;

    /// Gradients of `unit`'s parameters present in `grads`, by path (compute dtype).
    /// They are taken out of `grads`, which the engine drops right after.
    fn unit_grads(&self, unit: usize, grads: &mut Gradients) -> Result<Vec<(String, TensorData)>>;

    /// The model as it is now, without gradient tracking (burn's `Module::valid`): forward-only
    /// passes through it (evaluation, and the first forward of a unit that is recomputed for its
    /// backward) record no autodiff graph.
    fn detached(&self) -> Self
    where
        Self: Sized;
}

/// Every float parameter of `module`, by path, with its values (a helper for [`Units`] adapters).
pub fn named_params<M: Module>(module: &M) -> Result<Vec<(String, TensorData)>> {
    Ok(kiln_precision::collect_params(module)?
        .into_iter()
        .map(|p| (p.path, p.data))
        .collect())
}

/// The float parameters of `module` whose path satisfies `select`, by path, with their values;
/// only those are read (a unit's [`Units::unit_params`] without copying the whole model).
pub fn named_params_where<M: Module>(
    module: &M,
    select: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, TensorData)>> {
    Ok(kiln_precision::collect_params_where(module, select)?
        .into_iter()
        .map(|p| (p.path, p.data))
        .collect())
}

/// Gradients of every float parameter of `module` present in `grads`, by path, taken out of
/// `grads` (without a copy of their data).
pub fn named_grads<M: Module>(
    module: &M,
    grads: &mut Gradients,
) -> Result<Vec<(String, TensorData)>> {
    Ok(kiln_precision::take_grads(module, grads)?)
}

/// Replaces the parameters of `module` named in `values` (dtype taken from the data); gradient
/// tracking and parameter ids are kept, other parameters are left alone. A released parameter
/// (no elements, see [`release_params`]) takes the data's shape. The values move into the
/// parameters (no copy where the data is aligned for the device).
pub fn load_params<M: Module>(module: M, values: HashMap<String, TensorData>) -> Result<M> {
    struct L {
        values: HashMap<String, TensorData>,
        path: Vec<String>,
        err: Option<ZeroError>,
    }
    impl ModuleMapper for L {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            let Some(data) = self.values.remove(&path) else {
                return param;
            };
            let released = param.shape().num_elements() == 0;
            if !released && param.shape().as_slice() != data.shape().as_slice() {
                self.err.get_or_insert(ZeroError::Model(format!(
                    "{path}: shape {:?} does not match the parameter's {:?}",
                    data.shape().as_slice(),
                    param.shape().as_slice()
                )));
                return param;
            }
            param.map(|old| {
                let dtype = data.dtype();
                let t = Tensor::<D>::from_data(data, (&old.device(), dtype));
                if old.is_require_grad() {
                    t.require_grad()
                } else {
                    t
                }
            })
        }
    }
    let mut l = L {
        values,
        path: vec![],
        err: None,
    };
    let module = module.map(&mut l);
    match l.err {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

/// Replaces every float parameter of `module` whose path satisfies `release` by an empty tensor
/// of the same rank, dtype and device (gradient tracking and ids are kept), freeing its values;
/// [`load_params`] brings them back.
pub fn release_params<M: Module>(module: M, release: &dyn Fn(&str) -> bool) -> M {
    struct R<'a> {
        release: &'a dyn Fn(&str) -> bool,
        path: Vec<String>,
    }
    impl ModuleMapper for R<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !(self.release)(&self.path.join(".")) {
                return param;
            }
            param.map(|old| {
                let (device, dtype) = (old.device(), old.dtype());
                let empty = TensorData::new(Vec::<f32>::new(), [0; D]).convert_dtype(dtype);
                let t = Tensor::<D>::from_data(empty, (&device, dtype));
                if old.is_require_grad() {
                    t.require_grad()
                } else {
                    t
                }
            })
        }
    }
    module.map(&mut R {
        release,
        path: vec![],
    })
}
