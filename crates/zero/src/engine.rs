//! The unit engine: forward and backward unit by unit, gradients to the communicator as soon as
//! a unit's backward is done, the optimizer step on this rank's shard, parameters back.

use burn::tensor::{DType, Gradients, Tensor, TensorData};
use half::{bf16, f16};
use kiln_dist::{Communicator, ReduceOp};
use kiln_precision::{AdamWConfig, DynamicLossScaler, MasterWeights, ParamGroup, Policy};

use crate::error::{Result, ZeroError};
use crate::layout::UnitLayout;
use crate::units::Units;

/// What each rank keeps (DESIGN.md, ZeRO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Stage 0: full gradients, master weights and optimizer state on every rank.
    Ddp,
    /// Stage 1: optimizer state and master weights sharded.
    One,
    /// Stage 2: gradients sharded too, reduce-scattered unit by unit during backward.
    Two,
    /// Stage 3 (FSDP): parameters sharded too. Not implemented yet.
    Three,
}

impl Stage {
    /// Whether master weights and optimizer state are sharded.
    pub fn shards_optimizer(self) -> bool {
        !matches!(self, Stage::Ddp)
    }
}

/// Training configuration of the engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroConfig {
    pub stage: Stage,
    /// Compute dtype (f32, bf16 or f16); master weights are f32; gradients are reduced in f32.
    pub policy: Policy,
    pub adamw: AdamWConfig,
    pub group: ParamGroup,
    /// Clip gradients to this global L2 norm (after unscaling), torch's `clip_grad_norm_`.
    pub max_grad_norm: Option<f32>,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Two,
            policy: Policy::default(),
            adamw: AdamWConfig::default(),
            group: ParamGroup::default(),
            max_grad_norm: None,
        }
    }
}

/// What a step did, identical on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Mean loss over the global batch (all ranks, all micro-batches).
    pub loss: f32,
    /// Tokens that counted, over all ranks.
    pub tokens: u64,
    /// Some gradient was inf/NaN on some rank; every rank skipped the step.
    pub found_inf: bool,
    /// Global gradient norm before clipping (when clipping is on and the step ran).
    pub grad_norm: Option<f32>,
    /// Loss scale used for this step (f16).
    pub scale: Option<f32>,
    /// Bytes this rank sent in gradient and parameter collectives this step (dist counters).
    pub model_bytes_sent: u64,
}

/// Bytes of model state this rank holds, read from its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Compute copy of all parameters (frozen included), compute dtype.
    pub params: u64,
    /// Peak bytes of f32 gradient buffers during the last step (accumulators + owned shard).
    pub grads_peak: u64,
    /// fp32 master weights.
    pub master: u64,
    /// AdamW moments.
    pub optimizer: u64,
}

impl MemoryReport {
    pub fn total(&self) -> u64 {
        self.params + self.grads_peak + self.master + self.optimizer
    }
}

/// One unit's state on this rank.
struct UnitState {
    layout: UnitLayout,
    master: MasterWeights,
    /// Full-length f32 gradient accumulator (One: whole backward; Two: only across micro-batches
    /// and for the unit being reduced).
    accum: Option<Vec<f32>>,
}

/// Data-parallel training of a [`Units`] model on one rank.
pub struct Engine<U: Units> {
    units: U,
    comm: Communicator,
    config: ZeroConfig,
    scaler: Option<DynamicLossScaler>,
    state: Vec<UnitState>,
    param_bytes: u64,
    grad_live: u64,
    grad_peak: u64,
    model_bytes: u64,
}

impl<U: Units> Engine<U> {
    /// Builds the flat layouts, loads this rank's master shard from the model's current values
    /// and casts the model to the compute dtype. Every rank must start from the same weights.
    pub fn new(
        mut units: U,
        comm: Communicator,
        config: ZeroConfig,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        if config.stage == Stage::Three {
            return Err(ZeroError::NotImplemented(
                "ZeRO stage 3 (parameter sharding with per-unit all-gather)",
            ));
        }
        config.policy.validate()?;
        config.adamw.validate()?;
        if config.policy.reduce != DType::F32 {
            return Err(ZeroError::Config {
                field: "policy.reduce",
                msg: format!(
                    "{:?}: gradients are reduced in f32 only",
                    config.policy.reduce
                ),
            });
        }
        let n = units.num_units();
        if n < 2 {
            return Err(ZeroError::Config {
                field: "units",
                msg: format!("{n} units: need at least an input unit and a loss unit"),
            });
        }
        let (rank, world) = (comm.rank(), comm.world_size());
        let compute = config.policy.compute;
        let mut state = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        let mut param_bytes = 0;
        for u in 0..n {
            let params = units.unit_params(u)?;
            for (p, _) in &params {
                if !seen.insert(p.clone()) {
                    return Err(ZeroError::Model(format!(
                        "{p} is listed by two units (tied weights are not supported)"
                    )));
                }
            }
            let layout = UnitLayout::new(
                &params,
                &trainable,
                rank,
                world,
                config.stage.shards_optimizer(),
            )?;
            let mut master = MasterWeights::new(
                layout.flat.clone(),
                layout.shard,
                vec![config.group],
                config.adamw,
            )?;
            let mut cast = Vec::with_capacity(params.len());
            for (p, d) in params {
                if layout.flat.get(&p).is_some() {
                    master.load_param_data(&p, &d)?;
                }
                let d = d.convert_dtype(compute);
                param_bytes += d.as_bytes().len() as u64;
                cast.push((p, d));
            }
            units.set_unit_params(u, cast)?;
            state.push(UnitState {
                layout,
                master,
                accum: None,
            });
        }
        let mut engine = Self {
            scaler: config.policy.loss_scaler(),
            units,
            comm,
            config,
            state,
            param_bytes,
            grad_live: 0,
            grad_peak: 0,
            model_bytes: 0,
        };
        engine.grad_live = engine.shard_grad_bytes();
        engine.grad_peak = engine.grad_live;
        Ok(engine)
    }

    /// The model.
    pub fn units(&self) -> &U {
        &self.units
    }

    /// The model, mutably (e.g. to inject a fault in a test).
    pub fn units_mut(&mut self) -> &mut U {
        &mut self.units
    }

    /// This rank's communicator.
    pub fn comm(&self) -> &Communicator {
        &self.comm
    }

    /// The loss scaler (f16 compute only).
    pub fn scaler(&self) -> Option<&DynamicLossScaler> {
        self.scaler.as_ref()
    }

    /// Layout and shard of every unit.
    pub fn layouts(&self) -> Vec<&UnitLayout> {
        self.state.iter().map(|s| &s.layout).collect()
    }

    /// This rank's fp32 master shard of `unit`.
    pub fn master(&self, unit: usize) -> &MasterWeights {
        &self.state[unit].master
    }

    /// Model-state bytes this rank holds.
    pub fn memory(&self) -> MemoryReport {
        let f = std::mem::size_of::<f32>() as u64;
        let mut m = MemoryReport {
            params: self.param_bytes,
            grads_peak: self.grad_peak,
            ..Default::default()
        };
        for s in &self.state {
            let opt = s.master.optimizer_state();
            m.master += s.master.params().len() as u64 * f;
            m.optimizer += (opt.exp_avg.len() + opt.exp_avg_sq.len()) as u64 * f;
        }
        m
    }

    fn shard_grad_bytes(&self) -> u64 {
        let bytes = self
            .state
            .iter()
            .map(|s| s.master.grads().len())
            .sum::<usize>();
        (bytes * std::mem::size_of::<f32>()) as u64
    }

    /// One optimizer step over this rank's micro-batches (gradient accumulation when more than
    /// one; no communication until the last). The loss is normalised by the global token count,
    /// so N ranks on slices of a batch train exactly like one rank on the whole batch.
    pub fn step(&mut self, micro_batches: &[U::Batch]) -> Result<StepReport> {
        if micro_batches.is_empty() {
            return Err(ZeroError::Config {
                field: "micro_batches",
                msg: "a step needs at least one micro-batch".into(),
            });
        }
        self.model_bytes = 0;
        self.grad_live = self.shard_grad_bytes();
        self.grad_peak = self.grad_live;
        let local: usize = micro_batches.iter().map(|b| self.units.tokens(b)).sum();
        let mut tokens = [local as i64];
        self.comm.all_reduce(&mut tokens, ReduceOp::Sum)?;
        let tokens = tokens[0] as u64;
        if tokens == 0 {
            return Err(ZeroError::Config {
                field: "batch",
                msg: "no token counts in the loss on any rank".into(),
            });
        }
        let scale = self.scaler.as_ref().map(|s| s.scale());
        let factor = scale.unwrap_or(1.0) / tokens as f32;
        let mut loss_sum = 0.0f32;
        let last = micro_batches.len() - 1;
        for (k, batch) in micro_batches.iter().enumerate() {
            loss_sum += self.forward_backward(batch, factor, k == last)?;
        }
        if self.config.stage == Stage::One {
            for u in 0..self.state.len() {
                self.reduce_scatter_unit(u)?;
            }
        }
        let mut loss = [loss_sum];
        self.comm.all_reduce(&mut loss, ReduceOp::Sum)?;
        let (found_inf, grad_norm) = self.update()?;
        if !found_inf {
            self.gather_params()?;
        }
        Ok(StepReport {
            loss: loss[0] / tokens as f32,
            tokens,
            found_inf,
            grad_norm,
            scale,
            model_bytes_sent: self.model_bytes,
        })
    }

    /// Forward unit by unit keeping only the detached input of each unit, then backward in
    /// reverse, recomputing each unit and feeding it its upstream gradient. Returns the local
    /// loss sum.
    fn forward_backward(&mut self, batch: &U::Batch, factor: f32, last: bool) -> Result<f32> {
        let n = self.units.num_units();
        let mut inputs = Vec::with_capacity(n - 2);
        let mut h = self.units.forward(0, None, batch).detach();
        for u in 1..n - 1 {
            inputs.push(h.clone());
            h = self.units.forward(u, Some(h), batch).detach();
        }
        let h_in = h.require_grad();
        let loss = self.units.loss_sum(h_in.clone(), batch);
        let loss_value = scalar(loss.clone())?;
        let grads = loss.mul_scalar(factor).backward();
        let mut upstream = input_grad(&h_in, &grads, n - 1)?;
        self.unit_done(n - 1, &grads, last)?;
        drop(grads);
        for u in (1..n - 1).rev() {
            let input = inputs
                .pop()
                .expect("one input per middle unit")
                .require_grad();
            let out = self.units.forward(u, Some(input.clone()), batch);
            let grads = (out * upstream).sum().backward();
            upstream = input_grad(&input, &grads, u)?;
            self.unit_done(u, &grads, last)?;
        }
        let out = self.units.forward(0, None, batch);
        let grads = (out * upstream).sum().backward();
        self.unit_done(0, &grads, last)?;
        Ok(loss_value)
    }

    /// A unit's backward is done: its gradients go where the stage says, at once.
    fn unit_done(&mut self, unit: usize, grads: &Gradients, last: bool) -> Result<()> {
        let unit_grads = self.units.unit_grads(unit, grads)?;
        let s = &mut self.state[unit];
        match self.config.stage {
            Stage::Ddp => {
                for (p, g) in &unit_grads {
                    if s.layout.flat.get(p).is_some() {
                        s.master.add_grad(p, g)?;
                    }
                }
                if last {
                    let before = self.comm.traffic().total().bytes_sent;
                    self.comm.all_reduce(s.master.grads_mut(), ReduceOp::Sum)?;
                    self.model_bytes += self.comm.traffic().total().bytes_sent - before;
                }
            }
            Stage::One | Stage::Two => {
                let accum = match &mut s.accum {
                    Some(a) => a,
                    None => {
                        self.grad_live += (s.layout.padded * std::mem::size_of::<f32>()) as u64;
                        self.grad_peak = self.grad_peak.max(self.grad_live);
                        s.accum.insert(vec![0.0; s.layout.padded])
                    }
                };
                add_into(accum, &s.layout, &unit_grads)?;
                drop(unit_grads);
                if last && self.config.stage == Stage::Two {
                    self.reduce_scatter_unit(unit)?;
                }
            }
            Stage::Three => return Err(ZeroError::NotImplemented("ZeRO stage 3")),
        }
        Ok(())
    }

    /// Reduce-scatters a unit's accumulated gradient into its owner's f32 shard and frees it.
    fn reduce_scatter_unit(&mut self, unit: usize) -> Result<()> {
        let s = &mut self.state[unit];
        let Some(accum) = s.accum.take() else {
            return Ok(());
        };
        let before = self.comm.traffic().total().bytes_sent;
        self.comm
            .reduce_scatter_into(&accum, s.master.grads_mut(), ReduceOp::Sum)?;
        self.model_bytes += self.comm.traffic().total().bytes_sent - before;
        self.grad_live -= (accum.len() * std::mem::size_of::<f32>()) as u64;
        Ok(())
    }

    /// Unscale, agree on inf/NaN across ranks, clip by the global norm, step AdamW on the shard.
    fn update(&mut self) -> Result<(bool, Option<f32>)> {
        let inv = self.scaler.as_ref().map_or(1.0, |s| s.inv_scale());
        let mut local_inf = false;
        for s in &mut self.state {
            local_inf |= s.master.unscale_grads(inv);
        }
        let mut flag = [if local_inf { 1.0f32 } else { 0.0 }];
        self.comm.all_reduce(&mut flag, ReduceOp::Max)?;
        let found_inf = flag[0] > 0.0;
        let mut grad_norm = None;
        if let (Some(max), false) = (self.config.max_grad_norm, found_inf) {
            let local: f64 = self
                .state
                .iter()
                .flat_map(|s| s.master.grads())
                .map(|&g| f64::from(g) * f64::from(g))
                .sum();
            let mut sq = [local as f32];
            if self.config.stage.shards_optimizer() {
                self.comm.all_reduce(&mut sq, ReduceOp::Sum)?;
            }
            let norm = sq[0].sqrt();
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                for s in &mut self.state {
                    s.master.grads_mut().iter_mut().for_each(|g| *g *= coef);
                }
            }
            grad_norm = Some(norm);
        }
        for s in &mut self.state {
            s.master.apply(found_inf)?;
        }
        if let Some(scaler) = &mut self.scaler {
            scaler.update(found_inf);
        }
        Ok((found_inf, grad_norm))
    }

    /// Puts the updated parameters into the compute model, in the compute dtype: straight from
    /// the full master under DDP, by an all-gather of the shards otherwise.
    fn gather_params(&mut self) -> Result<()> {
        let dtype = self.config.policy.compute;
        for u in 0..self.state.len() {
            let s = &self.state[u];
            if s.layout.flat.entries().is_empty() {
                continue;
            }
            let values = if self.config.stage.shards_optimizer() {
                let before = self.comm.traffic().total().bytes_sent;
                let v = gather(&self.comm, s, dtype)?;
                self.model_bytes += self.comm.traffic().total().bytes_sent - before;
                v
            } else {
                s.layout
                    .flat
                    .entries()
                    .iter()
                    .map(|e| Ok((e.path.clone(), s.master.param_data(&e.path, dtype)?)))
                    .collect::<Result<Vec<_>>>()?
            };
            self.units.set_unit_params(u, values)?;
        }
        Ok(())
    }
}

/// All-gathers a unit's master shard in the compute dtype and cuts it into parameters.
fn gather(comm: &Communicator, s: &UnitState, dtype: DType) -> Result<Vec<(String, TensorData)>> {
    let len = s.layout.shard.len;
    Ok(match dtype {
        DType::F32 => split(&comm.all_gather(s.master.params(), s.layout.padded)?, s),
        DType::BF16 => {
            let mut shard = vec![bf16::ZERO; len];
            s.master.cast_shard_bf16(&mut shard)?;
            split(&comm.all_gather(&shard, s.layout.padded)?, s)
        }
        DType::F16 => {
            let mut shard = vec![f16::ZERO; len];
            s.master.cast_shard_f16(&mut shard)?;
            split(&comm.all_gather(&shard, s.layout.padded)?, s)
        }
        other => {
            return Err(ZeroError::Config {
                field: "policy.compute",
                msg: format!("{other:?} is not a float compute dtype"),
            });
        }
    })
}

fn split<E: burn::tensor::Element>(full: &[E], s: &UnitState) -> Vec<(String, TensorData)> {
    s.layout
        .flat
        .entries()
        .iter()
        .map(|e| {
            let data = TensorData::new(full[e.range()].to_vec(), e.shape.clone());
            (e.path.clone(), data)
        })
        .collect()
}

/// Adds compute-dtype gradients into a unit's f32 flat accumulator; frozen ones are ignored.
fn add_into(accum: &mut [f32], layout: &UnitLayout, grads: &[(String, TensorData)]) -> Result<()> {
    for (p, g) in grads {
        let Some(e) = layout.flat.get(p) else {
            continue;
        };
        if g.num_elements() != e.numel {
            return Err(ZeroError::Model(format!(
                "{p}: gradient has {} elements, parameter {}",
                g.num_elements(),
                e.numel
            )));
        }
        for (a, v) in accum[e.range()].iter_mut().zip(g.iter::<f32>()) {
            *a += v;
        }
    }
    Ok(())
}

fn scalar(t: Tensor<1>) -> Result<f32> {
    let data = t
        .try_into_data()
        .map_err(|e| ZeroError::Model(format!("reading the loss: {e:?}")))?;
    data.iter::<f32>()
        .next()
        .ok_or_else(|| ZeroError::Model("the loss unit returned an empty tensor".into()))
}

fn input_grad(input: &Tensor<3>, grads: &Gradients, unit: usize) -> Result<Tensor<3>> {
    input.grad(grads).ok_or_else(|| {
        ZeroError::Model(format!(
            "unit {unit}: no gradient reached its input (is the input used?)"
        ))
    })
}
