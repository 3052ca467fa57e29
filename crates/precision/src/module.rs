//! The precision policy and what it does to a burn module from the outside: casts, and the
//! (HF path → tensor) views that the master weights work from.
//!
//! Paths come from burn's `enter_module`/`exit_module` hooks, which pass struct field names and
//! `Vec` indices, so a model whose fields are named like the HF checkpoint
//! (`model.layers.0.self_attn.q_proj.weight`) yields HF paths. (burn's `ParamId` is random per
//! process and never used as a key here.)

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Gradients, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{PrecisionError, Result};
use crate::master::{MasterWeights, cast_to_data};
use crate::scaler::DynamicLossScaler;

/// Which dtype each stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Master weights and optimizer state (f32 by default; `compute` means pure low precision).
    pub param: DType,
    /// Forward and backward.
    pub compute: DType,
    /// Gradient reduction across ranks and the loss.
    pub reduce: DType,
}

impl Default for Policy {
    /// `{ f32, bf16, f32 }`: fp32 master weights, bf16 compute, no loss scaling.
    fn default() -> Self {
        Self::bf16()
    }
}

impl Policy {
    /// Full f32 everywhere (the reference).
    pub fn f32() -> Self {
        Self {
            param: DType::F32,
            compute: DType::F32,
            reduce: DType::F32,
        }
    }

    /// bf16 compute with f32 master weights; no loss scaling (bf16 has f32's exponent range).
    pub fn bf16() -> Self {
        Self {
            compute: DType::BF16,
            ..Self::f32()
        }
    }

    /// f16 compute with f32 master weights; needs the dynamic loss scaler.
    pub fn fp16() -> Self {
        Self {
            compute: DType::F16,
            ..Self::f32()
        }
    }

    /// Checks every field is F32, F16 or BF16.
    pub fn validate(&self) -> Result<()> {
        for (what, dtype) in [
            ("policy.param", self.param),
            ("policy.compute", self.compute),
            ("policy.reduce", self.reduce),
        ] {
            if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
                return Err(PrecisionError::UnsupportedDType {
                    what: what.to_string(),
                    dtype,
                });
            }
        }
        Ok(())
    }

    /// The loss scaler is on exactly when compute is f16.
    pub fn needs_loss_scaling(&self) -> bool {
        self.compute == DType::F16
    }

    /// A scaler with torch's defaults when [`needs_loss_scaling`](Self::needs_loss_scaling).
    pub fn loss_scaler(&self) -> Option<DynamicLossScaler> {
        self.needs_loss_scaling().then(DynamicLossScaler::default)
    }

    /// Whether f32 master weights are kept apart from the compute copy.
    pub fn has_master_weights(&self) -> bool {
        self.param != self.compute
    }
}

/// Casts every float parameter of `module` to `dtype`. Gradient tracking and parameter ids are
/// kept; each cast parameter is a new leaf.
pub fn cast_module<M: Module>(module: M, dtype: DType) -> M {
    module.map(&mut CastMapper { dtype })
}

struct CastMapper {
    dtype: DType,
}

impl ModuleMapper for CastMapper {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = self.dtype;
        param.map(|t| {
            if t.dtype() == dtype {
                return t;
            }
            let require_grad = t.is_require_grad();
            let t = t.cast(dtype).detach();
            if require_grad { t.require_grad() } else { t }
        })
    }
}

/// Keeps the current path in a module traversal.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

/// A float parameter of a module, by HF path.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Dotted path from the module's field names.
    pub path: String,
    /// Its values (in the parameter's current dtype) and shape.
    pub data: TensorData,
    /// Whether it is trainable (tracked for gradients). Frozen parameters get no master copy.
    pub require_grad: bool,
}

/// Paths of every float parameter, in visit order.
pub fn param_paths<M: Module>(module: &M) -> Vec<String> {
    param_counts(module)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// Path and element count of every float parameter, in visit order: the values are not read
/// (counting a model's parameters copies none of them).
pub fn param_counts<M: Module>(module: &M) -> Vec<(String, usize)> {
    struct V {
        stack: PathStack,
        out: Vec<(String, usize)>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let numel = param.shape().num_elements();
            self.out.push((self.stack.path(), numel));
        }
    }
    let mut v = V {
        stack: PathStack::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Every float parameter of `module` with its path, values and trainability, in visit order.
pub fn collect_params<M: Module>(module: &M) -> Result<Vec<NamedParam>> {
    collect_params_where(module, &|_| true)
}

/// The float parameters of `module` whose path satisfies `select`, with their values and
/// trainability, in visit order; the values of the others are not read (a ZeRO-3 adapter reads
/// one unit at a time).
pub fn collect_params_where<M: Module>(
    module: &M,
    select: &dyn Fn(&str) -> bool,
) -> Result<Vec<NamedParam>> {
    struct V<'a> {
        stack: PathStack,
        out: Vec<NamedParam>,
        err: Option<PrecisionError>,
        select: &'a dyn Fn(&str) -> bool,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.stack.path();
            if !(self.select)(&path) {
                return;
            }
            let t = param.val();
            let require_grad = t.is_require_grad();
            match t.try_into_data() {
                Ok(data) => self.out.push(NamedParam {
                    path,
                    data,
                    require_grad,
                }),
                Err(e) => {
                    self.err.get_or_insert(PrecisionError::Data {
                        path,
                        msg: format!("{e:?}"),
                    });
                }
            }
        }
    }
    let mut v = V {
        stack: PathStack::default(),
        out: Vec::new(),
        err: None,
        select,
    };
    module.visit(&mut v);
    match v.err {
        Some(e) => Err(e),
        None => Ok(v.out),
    }
}

/// The gradient of every float parameter of `module` present in `grads`, by path, in the
/// parameters' own dtype (the compute dtype).
pub fn collect_grads<M: Module>(
    module: &M,
    grads: &Gradients,
) -> Result<Vec<(String, TensorData)>> {
    grads_of(module, GradSource::Read(grads))
}

/// [`collect_grads`] that takes each gradient out of `grads` (`grad_remove`): the tensor's data
/// is then owned by nobody else and becomes the `TensorData` without a copy.
pub fn take_grads<M: Module>(
    module: &M,
    grads: &mut Gradients,
) -> Result<Vec<(String, TensorData)>> {
    grads_of(module, GradSource::Take(grads))
}

/// Where [`grads_of`] gets a parameter's gradient: a clone from the container, or the entry
/// itself, removed.
enum GradSource<'a> {
    Read(&'a Gradients),
    Take(&'a mut Gradients),
}

fn grads_of<M: Module>(module: &M, grads: GradSource<'_>) -> Result<Vec<(String, TensorData)>> {
    struct V<'a> {
        grads: GradSource<'a>,
        stack: PathStack,
        out: Vec<(String, TensorData)>,
        err: Option<PrecisionError>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = match &mut self.grads {
                GradSource::Read(grads) => param.grad(grads),
                GradSource::Take(grads) => param.grad_remove(grads),
            };
            let Some(g) = g else {
                return;
            };
            let path = self.stack.path();
            match g.try_into_data() {
                Ok(data) => self.out.push((path, data)),
                Err(e) => {
                    self.err.get_or_insert(PrecisionError::Data {
                        path,
                        msg: format!("{e:?}"),
                    });
                }
            }
        }
    }
    let mut v = V {
        grads,
        stack: PathStack::default(),
        out: Vec::new(),
        err: None,
    };
    module.visit(&mut v);
    match v.err {
        Some(e) => Err(e),
        None => Ok(v.out),
    }
}

/// Master weights for the trainable parameters of `module` (one rank, whole buffer), in visit
/// order; `group_of(path)` picks each parameter's group.
pub fn master_weights_for<M: Module>(
    module: &M,
    group_of: impl Fn(&str) -> usize,
    groups: Vec<crate::ParamGroup>,
    config: crate::AdamWConfig,
) -> Result<MasterWeights> {
    let params = collect_params(module)?;
    MasterWeights::from_params(
        params
            .iter()
            .filter(|p| p.require_grad)
            .map(|p| (p.path.as_str(), &p.data)),
        group_of,
        groups,
        config,
    )
}

/// Copies the master values of every parameter in `master`'s layout into `module`, cast to
/// `dtype` (the compute copy); other parameters (frozen ones) are left alone. Gradient tracking
/// and parameter ids are kept. Every parameter written must lie wholly in the master's shard.
pub fn write_back<M: Module>(master: &MasterWeights, module: M, dtype: DType) -> Result<M> {
    struct W<'a> {
        master: &'a MasterWeights,
        dtype: DType,
        stack: PathStack,
        err: Option<PrecisionError>,
    }
    impl ModuleMapper for W<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.stack.path();
            let Some(entry) = self.master.layout().get(&path) else {
                return param;
            };
            let data = self
                .master
                .param_values(&path)
                .and_then(|v| cast_to_data(&path, v, entry.shape.clone(), self.dtype));
            let data = match data {
                Ok(d) => d,
                Err(e) => {
                    self.err.get_or_insert(e);
                    return param;
                }
            };
            if param.shape().as_slice() != entry.shape.as_slice() {
                self.err.get_or_insert(PrecisionError::NumelMismatch {
                    path,
                    expected: entry.numel,
                    got: param.shape().num_elements(),
                });
                return param;
            }
            let dtype = self.dtype;
            param.map(|old| {
                let require_grad = old.is_require_grad();
                let t = Tensor::<D>::from_data(data, (&old.device(), dtype));
                if require_grad { t.require_grad() } else { t }
            })
        }
    }
    let mut w = W {
        master,
        dtype,
        stack: PathStack::default(),
        err: None,
    };
    let module = module.map(&mut w);
    match w.err {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_is_on_exactly_for_f16_compute() {
        assert_eq!(Policy::default(), Policy::bf16());
        assert!(Policy::fp16().loss_scaler().is_some());
        assert!(Policy::bf16().loss_scaler().is_none());
        assert!(Policy::f32().loss_scaler().is_none());
        assert!(!Policy::f32().has_master_weights());
        let bad = Policy {
            compute: DType::I32,
            ..Policy::f32()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.compute")
        );
    }

    #[test]
    fn policy_is_serde_data() {
        let json = serde_json::to_string(&Policy::fp16()).unwrap();
        let back: Policy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Policy::fp16());
    }
}
