//! `LoraModel`: a frozen burn module with named adapters attached by parameter path.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ParamId};
use burn::tensor::{Gradients, Tensor, TensorData};
use kiln_models::rng::{SplitMix64, fnv1a};

use crate::adapter::{Adapter, Layer, WeightInfo, burn_to_peft, tensor};
use crate::config::{LoraConfig, LoraInit};
use crate::error::{LoraError, Result};
use crate::mappers::{AddDelta, Attach, Count, Discover, Factors, Freeze};
use crate::peft::{Factor, PeftAdapter, peft_key};

/// PEFT's `print_trainable_parameters`: trainable / all, where all counts base and adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableParams {
    pub trainable: usize,
    pub all: usize,
}

impl std::fmt::Display for TrainableParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = 100.0 * self.trainable as f64 / self.all.max(1) as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A burn module with frozen base weights and any number of named LoRA adapters, at most one
/// active. The active adapter is attached to its target weights as a burn reparameterization, so
/// the module's own `forward` computes with `W0 + scaling · B A` unchanged (a layer that knows the
/// attached factors, such as kiln-models' `Linear`, computes the same on activations, with
/// `lora_dropout`).
///
/// Train by running [`model`](Self::model), then stepping an optimizer through
/// [`map_model`](Self::map_model); only `lora_A` / `lora_B` have gradients.
#[derive(Debug)]
pub struct LoraModel<M: Module> {
    /// The frozen base without adapters (holding the merged weights while merged).
    base: M,
    /// What runs: `base` with the active adapter attached, or `base` itself.
    live: M,
    weights: BTreeMap<String, WeightInfo>,
    adapters: BTreeMap<String, Adapter>,
    active: Option<String>,
    merged: bool,
}

impl<M: Module> LoraModel<M> {
    /// Freezes every float parameter of `model` (as PEFT does) and finds its 2-D `weight`s.
    pub fn new(model: M) -> Self {
        let base = model.map(&mut Freeze);
        let mut discover = Discover::default();
        base.visit(&mut discover);
        Self {
            live: base.clone(),
            base,
            weights: discover.out,
            adapters: BTreeMap::new(),
            active: None,
            merged: false,
        }
    }

    /// The module to run: base plus the active adapter (or merged, or bare when disabled).
    pub fn model(&self) -> &M {
        &self.live
    }

    /// The running module (the base with the active adapter attached), for a caller that owns
    /// the parameters from then on, such as a ZeRO engine that shards them: it keeps no second
    /// copy of the base. The adapter factors are parameters at `<weight>.lora.a` (= PEFT's
    /// `lora_B`) and `<weight>.lora.b` (= `lora_A`), see [`burn_factor_path`].
    pub fn into_model(self) -> M {
        self.live
    }

    /// The frozen base weights without adapters (with the active adapter folded in while merged).
    pub fn base(&self) -> &M {
        &self.base
    }

    /// Replaces the running module by `f(module)`, e.g. `|m| optim.step(lr, m, grads)`.
    /// `f` must keep the module's structure; it may change parameter values.
    pub fn map_model(&mut self, f: impl FnOnce(M) -> M) {
        let live = std::mem::replace(&mut self.live, self.base.clone());
        self.live = f(live);
    }

    /// Every module with a 2-D `weight`, by module path (`model.layers.0.self_attn.q_proj`).
    pub fn weights(&self) -> &BTreeMap<String, WeightInfo> {
        &self.weights
    }

    /// The modules `config.target_modules` selects, in path order.
    pub fn targets(&self, config: &LoraConfig) -> Result<Vec<String>> {
        let matches = config.target_modules.matcher()?;
        let mut out = vec![];
        for (module, info) in &self.weights {
            if !matches(module, info.is_linear()) {
                continue;
            }
            if info.container.ends_with("Embedding") {
                return Err(LoraError::Unsupported(format!(
                    "target_modules {} select the embedding `{module}`; kiln adapts linear layers only",
                    config.target_modules
                )));
            }
            out.push(module.clone());
        }
        if out.is_empty() {
            return Err(LoraError::NoTargets {
                targets: config.target_modules.to_string(),
            });
        }
        Ok(out)
    }

    /// Adds a fresh adapter: A from `config.init` (seeded per module, so the values do not depend
    /// on which modules are targeted), B zero. Activates it when no adapter is active.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        self.check_new(name)?;
        config.validate()?;
        let mut layers = BTreeMap::new();
        for module in self.targets(&config)? {
            let info = &self.weights[&module];
            let (out, inp) = info.out_in(config.fan_in_fan_out);
            let mut rng = SplitMix64(seed ^ fnv1a(module.as_bytes()));
            let a: Vec<f32> = match config.init {
                // torch `kaiming_uniform_(a=sqrt(5))`: bound = sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in).
                LoraInit::Kaiming => {
                    let bound = 1.0 / (inp as f64).sqrt();
                    (0..config.r * inp)
                        .map(|_| ((2.0 * rng.uniform_midpoint() - 1.0) * bound) as f32)
                        .collect()
                }
                LoraInit::Gaussian => {
                    let std = 1.0 / config.r as f64;
                    (0..config.r * inp)
                        .map(|_| (rng.normal_midpoint() * std) as f32)
                        .collect()
                }
            };
            let a = tensor(TensorData::new(a, [config.r, inp]), info);
            let b = tensor(TensorData::zeros::<f32, _>([out, config.r]), info);
            layers.insert(module, Layer::new(a, b));
        }
        self.insert(name, Adapter { config, layers })
    }

    /// Adds an adapter read from a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn load_adapter(&mut self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let peft = PeftAdapter::load(dir)?;
        self.add_peft(name, &peft, &dir.display().to_string())
            .map_err(|e| match e {
                // Errors about the adapter's target_modules come from its config file.
                LoraError::NoTargets { .. } | LoraError::Unsupported(_) => LoraError::InFile {
                    path: dir.join(crate::peft::CONFIG_FILE),
                    source: Box::new(e),
                },
                other => other,
            })
    }

    /// Adds an adapter from PEFT tensors, refusing one whose modules or shapes do not match the
    /// model; `source_name` names it in errors.
    pub fn add_peft(&mut self, name: &str, peft: &PeftAdapter, source_name: &str) -> Result<()> {
        self.check_new(name)?;
        let config = &peft.config;
        let pairs = peft.pairs(source_name)?;
        let unknown: Vec<String> = pairs
            .keys()
            .filter(|m| !self.weights.contains_key(*m))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(LoraError::UnknownModules {
                modules: unknown,
                source_name: source_name.into(),
            });
        }
        let selected = self.targets(config)?;
        let missing: Vec<String> = selected
            .iter()
            .filter(|m| !pairs.contains_key(*m))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(LoraError::MissingModules {
                modules: missing,
                targets: config.target_modules.to_string(),
                source_name: source_name.into(),
            });
        }
        let mut layers = BTreeMap::new();
        for (module, (a, b)) in pairs {
            if !selected.contains(&module) {
                return Err(LoraError::UnexpectedKey {
                    key: peft_key(&module, Factor::A),
                    reason: format!(
                        "target_modules {} do not select `{module}`",
                        config.target_modules
                    ),
                    source_name: source_name.into(),
                });
            }
            let info = &self.weights[&module];
            let (out, inp) = info.out_in(config.fan_in_fan_out);
            for (data, factor, expected) in [
                (a, Factor::A, [config.r, inp]),
                (b, Factor::B, [out, config.r]),
            ] {
                // `pairs` checked that every factor is 2-D.
                let found = [data.shape()[0], data.shape()[1]];
                if found != expected {
                    return Err(LoraError::ShapeMismatch {
                        key: peft_key(&module, factor),
                        module: module.clone(),
                        found,
                        expected,
                        base: info.shape,
                        source_name: source_name.into(),
                    });
                }
            }
            let layer = Layer::new(tensor(a.clone(), info), tensor(b.clone(), info));
            layers.insert(module, layer);
        }
        self.insert(
            name,
            Adapter {
                config: config.clone(),
                layers,
            },
        )
    }

    /// The adapter as PEFT files would hold it, with its current (trained) values.
    pub fn to_peft(&self, name: &str) -> Result<PeftAdapter> {
        let adapter = self.adapter(name)?;
        let mut tensors = BTreeMap::new();
        for (module, layer) in self.current_layers(name)? {
            tensors.insert(peft_key(&module, Factor::A), layer.a.into_data());
            tensors.insert(peft_key(&module, Factor::B), layer.b.into_data());
        }
        let peft = PeftAdapter {
            config: adapter.config.clone(),
            tensors,
        };
        let expected = self.targets(&adapter.config)?;
        let pairs = peft.pairs(name)?;
        if pairs.len() != expected.len() {
            return Err(LoraError::State(format!(
                "adapter `{name}` has {} of the {} modules its config targets",
                pairs.len(),
                expected.len()
            )));
        }
        Ok(peft)
    }

    /// Saves the adapter as a PEFT folder (atomically per file; refuses empty or partial adapters).
    pub fn save_adapter(&self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let peft = self.to_peft(name).map_err(|e| LoraError::Incomplete {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        peft.save(dir)
    }

    /// Makes `name` the active adapter (unmerging first if merged).
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.adapter(name)?;
        if self.merged {
            self.unmerge()?;
        }
        self.sync()?;
        self.live = self.attach(name);
        self.active = Some(name.to_string());
        Ok(())
    }

    /// Runs the bare base model (unmerging first if merged); [`set_adapter`](Self::set_adapter)
    /// turns an adapter back on.
    pub fn disable_adapters(&mut self) -> Result<()> {
        if self.merged {
            self.unmerge()?;
        }
        self.sync()?;
        self.live = self.base.clone();
        self.active = None;
        Ok(())
    }

    /// Forgets an adapter (disabling it first if it is active).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.adapter(name)?;
        if self.active.as_deref() == Some(name) {
            self.disable_adapters()?;
        }
        self.adapters.remove(name);
        Ok(())
    }

    /// Adds `scaling · B A` of the active adapter into the base weights: inference then costs
    /// exactly the base model's. A no-op when already merged.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Ok(());
        }
        let name = self
            .active
            .clone()
            .ok_or_else(|| LoraError::State("no active adapter to merge".into()))?;
        self.sync()?;
        self.base = self
            .base
            .clone()
            .map(&mut AddDelta::new(&self.adapters[&name], 1.0));
        self.live = self.base.clone();
        self.merged = true;
        Ok(())
    }

    /// Subtracts the merged adapter from the base weights and attaches it again.
    /// A no-op when not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let Some(name) = self.active.clone().filter(|_| self.merged) else {
            return Ok(());
        };
        self.base = self
            .base
            .clone()
            .map(&mut AddDelta::new(&self.adapters[&name], -1.0));
        self.merged = false;
        self.live = self.attach(&name);
        Ok(())
    }

    /// Merges the active adapter (if any) and returns the plain module.
    pub fn merge_and_unload(mut self) -> Result<M> {
        if self.active.is_some() {
            self.merge()?;
        }
        Ok(self.base)
    }

    pub fn active_adapter(&self) -> Option<&str> {
        self.active.as_deref()
    }

    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    pub fn is_merged(&self) -> bool {
        self.merged
    }

    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        Ok(&self.adapter(name)?.config)
    }

    /// PEFT's `print_trainable_parameters` of the running module: the active, unmerged adapter's
    /// factors are the trainable parameters; all = base + those factors.
    pub fn trainable_parameters(&self) -> TrainableParams {
        let mut count = Count::default();
        self.live.visit(&mut count);
        TrainableParams {
            trainable: count.adapter,
            all: count.all,
        }
    }

    /// The gradient of every factor of the active adapter, by PEFT key, in PEFT orientation.
    pub fn adapter_grads(&self, grads: &Gradients) -> BTreeMap<String, Tensor<2>> {
        let fifo = self.active_config().is_some_and(|c| c.fan_in_fan_out);
        let mut factors = Factors::new(Some(grads));
        self.live.visit(&mut factors);
        let mut out = BTreeMap::new();
        for (module, (a, b)) in factors.pairs() {
            let (a, b) = burn_to_peft(a.0, b.0, fifo);
            out.insert(peft_key(&module, Factor::A), a);
            out.insert(peft_key(&module, Factor::B), b);
        }
        out
    }

    /// The ids of the active adapter's factor parameters (what an optimizer should hold state for).
    pub fn adapter_param_ids(&self) -> Vec<ParamId> {
        let mut factors = Factors::new(None);
        self.live.visit(&mut factors);
        factors
            .pairs()
            .into_values()
            .flat_map(|(a, b)| [a.1, b.1])
            .collect()
    }

    fn active_config(&self) -> Option<&LoraConfig> {
        self.active.as_ref().map(|n| &self.adapters[n].config)
    }

    fn adapter(&self, name: &str) -> Result<&Adapter> {
        self.adapters
            .get(name)
            .ok_or_else(|| LoraError::UnknownAdapter {
                name: name.into(),
                loaded: self.adapters.keys().cloned().collect(),
            })
    }

    fn check_new(&self, name: &str) -> Result<()> {
        match self.adapters.contains_key(name) {
            true => Err(LoraError::DuplicateAdapter(name.into())),
            false => Ok(()),
        }
    }

    fn insert(&mut self, name: &str, adapter: Adapter) -> Result<()> {
        self.adapters.insert(name.to_string(), adapter);
        if self.active.is_none() {
            self.set_adapter(name)?;
        }
        Ok(())
    }

    /// The adapter's values: read from the running module while it trains there.
    fn current_layers(&self, name: &str) -> Result<BTreeMap<String, Layer>> {
        let adapter = self.adapter(name)?;
        if self.active.as_deref() != Some(name) || self.merged {
            return Ok(adapter.layers.clone());
        }
        let mut factors = Factors::new(None);
        self.live.visit(&mut factors);
        let fifo = adapter.config.fan_in_fan_out;
        Ok(factors
            .pairs()
            .into_iter()
            .map(|(module, ((a, a_burn_id), (b, b_burn_id)))| {
                let (ids_a, ids_b) = match fifo {
                    false => (b_burn_id, a_burn_id),
                    true => (a_burn_id, b_burn_id),
                };
                let (a, b) = burn_to_peft(a, b, fifo);
                let layer = Layer {
                    a: a.detach(),
                    b: b.detach(),
                    a_id: ids_a,
                    b_id: ids_b,
                };
                (module, layer)
            })
            .collect())
    }

    /// Copies the running adapter's trained values back into the store before it is detached.
    fn sync(&mut self) -> Result<()> {
        if let Some(name) = self.active.clone().filter(|_| !self.merged) {
            let layers = self.current_layers(&name)?;
            if let Some(adapter) = self.adapters.get_mut(&name) {
                adapter.layers = layers;
            }
        }
        Ok(())
    }

    fn attach(&self, name: &str) -> M {
        let adapter = &self.adapters[name];
        self.base.clone().apply_reparameterization(Attach {
            layers: &adapter.layers,
            scaling: adapter.config.scaling(),
            fan_in_fan_out: adapter.config.fan_in_fan_out,
        })
    }
}

/// Where burn's `LoraAdapter` keeps PEFT factor `factor` of the target `module` in a model from
/// [`LoraModel::into_model`]: `<module>.weight.lora.a` holds `lora_B` and `.lora.b` holds
/// `lora_A` (HF `[out, in]` layout; transposed under `fan_in_fan_out`).
pub fn burn_factor_path(module: &str, factor: crate::peft::Factor) -> String {
    match factor {
        crate::peft::Factor::A => format!("{module}.weight.lora.b"),
        crate::peft::Factor::B => format!("{module}.weight.lora.a"),
    }
}
