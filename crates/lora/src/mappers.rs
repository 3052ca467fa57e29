//! The module mappers and visitors LoRA runs over a burn module: attach factors, add a delta
//! to the base weights, freeze, discover targets, collect factors and count parameters.

use std::collections::BTreeMap;

use burn::module::{
    LoraAdapter, ModuleMapper, ModuleVisitor, Param, ParamId, Reparameterization, Reparameterizer,
};
use burn::tensor::{DType, Gradients, Tensor};

use crate::adapter::{Adapter, Layer, WeightInfo, peft_to_burn};

/// Attaches one adapter's factors to the weights they target.
pub(crate) struct Attach<'a> {
    pub(crate) layers: &'a BTreeMap<String, Layer>,
    pub(crate) scaling: f64,
    pub(crate) fan_in_fan_out: bool,
}

impl Reparameterizer for Attach<'_> {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let layer = path
            .strip_suffix(".weight")
            .and_then(|m| self.layers.get(m));
        let (Some(layer), 2) = (layer, D) else {
            return (param, None);
        };
        let ((a, a_id), (b, b_id)) = peft_to_burn(layer, self.fan_in_fan_out);
        let factor = |t: Tensor<2>, id: ParamId| {
            let mut p = Param::from_tensor(t.detach());
            p.id = id;
            p
        };
        let adapter = LoraAdapter {
            a: factor(a, a_id),
            b: factor(b, b_id),
            scale: self.scaling,
        };
        (param, Some(adapter))
    }
}

/// `W += sign · scaling · B A` (transposed under `fan_in_fan_out`), computed in f32.
pub(crate) struct AddDelta<'a> {
    pub(crate) path: Vec<String>,
    pub(crate) adapter: &'a Adapter,
    pub(crate) sign: f64,
}

impl<'a> AddDelta<'a> {
    pub(crate) fn new(adapter: &'a Adapter, sign: f64) -> Self {
        Self {
            path: vec![],
            adapter,
            sign,
        }
    }
}

impl ModuleMapper for AddDelta<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let layer = path
            .strip_suffix(".weight")
            .and_then(|m| self.adapter.layers.get(m));
        let (Some(layer), 2) = (layer, D) else {
            return param;
        };
        let config = &self.adapter.config;
        let factor = self.sign * config.scaling();
        let fifo = config.fan_in_fan_out;
        param.map(|w| {
            let (dtype, dims) = (w.dtype(), w.dims());
            let delta = layer
                .b
                .clone()
                .cast(DType::F32)
                .matmul(layer.a.clone().cast(DType::F32))
                * factor;
            let delta = if fifo { delta.transpose() } else { delta };
            let merged = w.cast(DType::F32).reshape([dims[0], dims[1]]) + delta;
            merged.cast(dtype).reshape(dims).detach()
        })
    }
}

/// Sets every float parameter to need no gradient.
pub(crate) struct Freeze;

impl ModuleMapper for Freeze {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(false)
    }
}

/// Finds every 2-D `weight` with its module path and owning module type.
#[derive(Default)]
pub(crate) struct Discover {
    pub(crate) path: Vec<String>,
    pub(crate) containers: Vec<String>,
    pub(crate) out: BTreeMap<String, WeightInfo>,
}

impl ModuleVisitor for Discover {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.into());
        self.containers.push(container_type.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
        self.containers.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some((last, parent)) = self.path.split_last() else {
            return;
        };
        if D != 2 || last != "weight" || self.containers.iter().any(|c| c == "Reparameterization") {
            return;
        }
        let value = param.base();
        let dims = value.dims();
        let info = WeightInfo {
            shape: [dims[0], dims[1]],
            dtype: value.dtype(),
            device: value.device(),
            container: self.containers.last().cloned().unwrap_or_default(),
        };
        self.out.insert(parent.join("."), info);
    }
}

/// The factor parameters attached by `LoraAdapter` (paths `<module>.weight.lora.{a,b}`): their
/// values, or their gradients when given `Gradients`.
pub(crate) struct Factors<'g> {
    pub(crate) path: Vec<String>,
    pub(crate) grads: Option<&'g Gradients>,
    pub(crate) out: BTreeMap<String, [Option<(Tensor<2>, ParamId)>; 2]>,
}

pub(crate) type BurnPair = ((Tensor<2>, ParamId), (Tensor<2>, ParamId));

impl<'g> Factors<'g> {
    pub(crate) fn new(grads: Option<&'g Gradients>) -> Self {
        Self {
            path: vec![],
            grads,
            out: BTreeMap::new(),
        }
    }

    pub(crate) fn pairs(self) -> BTreeMap<String, BurnPair> {
        self.out
            .into_iter()
            .filter_map(|(m, [a, b])| Some((m, (a?, b?))))
            .collect()
    }
}

impl ModuleVisitor for Factors<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = self.path.len();
        if D != 2 || n < 3 || self.path[n - 2] != LoraAdapter::NAME || self.path[n - 3] != "weight"
        {
            return;
        }
        let index = match self.path[n - 1].as_str() {
            "a" => 0,
            "b" => 1,
            _ => return,
        };
        let value = param.val();
        let value = match self.grads {
            None => value,
            Some(grads) => match value.grad(grads) {
                Some(g) => g,
                None => return,
            },
        };
        let dims = value.dims();
        let module = self.path[..n - 3].join(".");
        self.out.entry(module).or_default()[index] =
            Some((value.reshape([dims[0], dims[1]]), param.id));
    }
}

/// Parameter counts of a module: all, and those inside LoRA adapters.
#[derive(Default)]
pub(crate) struct Count {
    pub(crate) path: Vec<String>,
    pub(crate) all: usize,
    pub(crate) adapter: usize,
}

impl ModuleVisitor for Count {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.all += n;
        if self.path.iter().any(|p| p == LoraAdapter::NAME) {
            self.adapter += n;
        }
    }
}
