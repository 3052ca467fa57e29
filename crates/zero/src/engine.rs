//! The unit engine: forward and backward unit by unit, gradients to the communicator as soon as
//! a unit's backward is done, the optimizer step on this rank's shard, parameters back.

use burn::tensor::{DType, Gradients, Tensor, TensorData};
use kiln_dist::{Communicator, ReduceOp};
use kiln_precision::{DynamicLossScaler, MasterWeights, ParamGroup};

use crate::error::{Result, ZeroError};
use crate::layout::{DECAY, NO_DECAY, UnitLayout};
use crate::plan::{GradSync, Plan, ZeroConfig};
use crate::shard::ShardBuf;
use crate::units::Units;

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
    /// Stage 3: peak bytes of whole (all-gathered) unit parameters alive at once.
    pub gathered_peak: u64,
}

impl MemoryReport {
    pub fn total(&self) -> u64 {
        self.params + self.grads_peak + self.master + self.optimizer + self.gathered_peak
    }
}

/// One unit's state on this rank.
pub(crate) struct UnitState {
    pub(crate) layout: UnitLayout,
    pub(crate) master: MasterWeights,
    /// Full-length f32 gradient accumulator (One: whole backward; Two: only across micro-batches
    /// and for the unit being reduced).
    pub(crate) accum: Option<Vec<f32>>,
    /// Frozen parameters (no master, no gradient), laid out like the trainable ones; sharded
    /// under stage 3 only.
    pub(crate) frozen: UnitLayout,
    /// Stage 3: this rank's shard of the frozen parameters in the compute dtype. Trainable ones
    /// need no compute shard: their fp32 master shard is cast to the compute dtype just before
    /// each all-gather (as FSDP does), which saves 2Ψ/N bytes and makes stage 3 hold exactly
    /// (4 + K)Ψ/N with f32 gradients, the formula's 16Ψ/N.
    pub(crate) frozen_shard: Option<ShardBuf>,
    /// Bytes of the unit's whole parameters in the compute dtype (what a gather materialises).
    pub(crate) whole_bytes: u64,
    /// Parameters of earlier units this unit computes with (tied weights): (owner, path, bytes
    /// in the compute dtype).
    pub(crate) shared: Vec<(usize, String, u64)>,
    /// Gradients later units computed for this unit's parameters in the current micro-batch,
    /// added to its own when its backward is done.
    pub(crate) pending: Vec<(String, TensorData)>,
}

/// Data-parallel training of a [`Units`] model on one rank.
pub struct Engine<U: Units> {
    pub(crate) units: U,
    pub(crate) comm: Communicator,
    pub(crate) config: ZeroConfig,
    /// What the stage means here (read instead of the stage).
    pub(crate) plan: Plan,
    pub(crate) scaler: Option<DynamicLossScaler>,
    pub(crate) state: Vec<UnitState>,
    pub(crate) param_bytes: u64,
    pub(crate) grad_live: u64,
    pub(crate) grad_peak: u64,
    pub(crate) gathered_live: u64,
    pub(crate) gathered_peak: u64,
    pub(crate) model_bytes: u64,
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
        config.policy.validate()?;
        config.adamw.validate()?;
        let n = units.num_units();
        if n < 2 {
            return Err(ZeroError::Config {
                field: "units",
                msg: format!("{n} units: need at least an input unit and a loss unit"),
            });
        }
        let (rank, world) = (comm.rank(), comm.world_size());
        let compute = config.policy.compute;
        let plan = config.plan();
        let mut state = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        let mut param_bytes = 0;
        for u in 0..n {
            let params = units.unit_params(u)?;
            for (p, _) in &params {
                if !seen.insert(p.clone()) {
                    return Err(ZeroError::Model(format!(
                        "{p} is owned by two units (a tied weight belongs to one unit and is \
                         listed as shared by the others)"
                    )));
                }
            }
            let layout = UnitLayout::new(&params, &trainable, rank, world, plan.shard_optimizer)?;
            let mut master = MasterWeights::new(
                layout.flat.clone(),
                layout.shard,
                param_groups(config.group),
                config.adamw,
            )?;
            let frozen = UnitLayout::new(
                &params,
                &|p: &str| !trainable(p),
                rank,
                world,
                plan.shard_params,
            )?;
            for (p, d) in &params {
                if layout.flat.get(p).is_some() {
                    master.load_param_data(p, d)?;
                }
            }
            let whole_bytes = ((layout.flat.numel() + frozen.flat.numel()) * compute.size()) as u64;
            let frozen_shard = if plan.shard_params {
                let mut base = ShardBuf::zeros(compute, frozen.shard.len)?;
                base.fill(&frozen.flat, frozen.shard, &params)?;
                drop(params);
                param_bytes += base.bytes();
                units.release_unit(u)?;
                Some(base)
            } else {
                let cast: Vec<_> = params
                    .into_iter()
                    .map(|(p, d)| (p, d.convert_dtype(compute)))
                    .collect();
                param_bytes += cast
                    .iter()
                    .map(|(_, d)| d.as_bytes().len() as u64)
                    .sum::<u64>();
                units.set_unit_params(u, cast)?;
                None
            };
            state.push(UnitState {
                layout,
                master,
                accum: None,
                frozen,
                frozen_shard,
                whole_bytes,
                shared: Vec::new(),
                pending: Vec::new(),
            });
        }
        for u in 0..n {
            for path in units.shared_params(u) {
                let owner = (0..u)
                    .find(|&o| {
                        state[o].layout.flat.get(&path).is_some()
                            || state[o].frozen.flat.get(&path).is_some()
                    })
                    .ok_or_else(|| {
                        ZeroError::Model(format!(
                            "unit {u} shares {path}, which no earlier unit owns"
                        ))
                    })?;
                let o = &state[owner];
                let entry = o
                    .layout
                    .flat
                    .get(&path)
                    .or_else(|| o.frozen.flat.get(&path));
                let bytes = entry.map_or(0, |e| e.numel * compute.size()) as u64;
                state[u].shared.push((owner, path, bytes));
            }
        }
        let mut engine = Self {
            scaler: config.policy.loss_scaler(),
            units,
            comm,
            config,
            plan,
            state,
            param_bytes,
            grad_live: 0,
            grad_peak: 0,
            gathered_live: 0,
            gathered_peak: 0,
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

    /// Sets the learning rate of every unit's parameter groups (a schedule calls it per step).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        for s in &mut self.state {
            s.master.set_lr(DECAY, lr)?;
            s.master.set_lr(NO_DECAY, lr)?;
        }
        Ok(())
    }

    /// Takes the engine apart: the model (released units stay released under stage 3) and the
    /// communicator, e.g. to run another engine over the same ranks.
    pub fn into_parts(self) -> (U, Communicator) {
        (self.units, self.comm)
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
            gathered_peak: self.gathered_peak,
            ..Default::default()
        };
        for s in &self.state {
            let opt = s.master.optimizer_state();
            m.master += s.master.params().len() as u64 * f;
            m.optimizer += (opt.exp_avg.len() + opt.exp_avg_sq.len()) as u64 * f;
        }
        m
    }

    /// Every parameter of the model, whole, by path: trainable ones from the fp32 master (f32),
    /// frozen ones as the model computes with them (compute dtype). A collective under stages
    /// 1-3 (all-gathers the shards): every rank must call it.
    pub fn full_params(&mut self) -> Result<Vec<(String, TensorData)>> {
        let mut out = Vec::new();
        for u in 0..self.state.len() {
            let s = &self.state[u];
            if !s.layout.flat.entries().is_empty() {
                if self.plan.shard_optimizer {
                    let mut shard = ShardBuf::zeros(DType::F32, s.layout.shard.len)?;
                    shard.cast_from_master(&s.master)?;
                    out.extend(shard.gather(&self.comm, &s.layout.flat, s.layout.padded)?);
                } else {
                    for e in s.layout.flat.entries() {
                        out.push((e.path.clone(), s.master.param_data(&e.path, DType::F32)?));
                    }
                }
            }
            match (self.plan.shard_params, &s.frozen_shard) {
                (true, Some(base)) => {
                    if !s.frozen.flat.entries().is_empty() {
                        out.extend(base.gather(&self.comm, &s.frozen.flat, s.frozen.padded)?);
                    }
                }
                _ => out.extend(
                    self.units
                        .unit_params(u)?
                        .into_iter()
                        .filter(|(p, _)| s.frozen.flat.get(p).is_some()),
                ),
            }
        }
        Ok(out)
    }

    /// Loss sum and token count of `count` batches over all ranks, forward only, without
    /// gradient tracking; `batch(i)` makes this rank's batch `i` when it is needed, so only one
    /// batch and one unit's activations live at a time. A collective: every rank must call it,
    /// with its own `count` (ranks may hold different numbers of batches: a rank that has run out
    /// still joins the gathers of the others under stage 3).
    pub fn evaluate(
        &mut self,
        count: usize,
        mut batch: impl FnMut(usize) -> Result<U::Batch>,
    ) -> Result<(f64, u64)> {
        let n = self.units.num_units();
        let mut most = [count as i64];
        self.comm.all_reduce(&mut most, ReduceOp::Max)?;
        let (mut loss_sum, mut tokens) = (0.0f64, 0i64);
        for i in 0..most[0] as usize {
            let batch = if i < count { Some(batch(i)?) } else { None };
            let (h, _) = self.forward_units(batch.as_ref(), false)?;
            self.fetch(n - 1)?;
            if let Some(b) = &batch {
                let model = self.units.detached();
                let input = h.expect("the loss unit follows a hidden state");
                loss_sum += f64::from(scalar(model.loss_sum(input, b))?);
                tokens += model.tokens(b) as i64;
            }
            self.release(n - 1)?;
        }
        let mut sum = [loss_sum as f32];
        let mut count = [tokens];
        self.comm.all_reduce(&mut sum, ReduceOp::Sum)?;
        self.comm.all_reduce(&mut count, ReduceOp::Sum)?;
        Ok((f64::from(sum[0]), count[0] as u64))
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
        self.gathered_peak = self.gathered_live;
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
        if self.plan.grad_sync == GradSync::ReduceScatterAtStepEnd {
            for u in 0..self.state.len() {
                self.reduce_scatter_unit(u)?;
            }
        }
        let mut loss = [loss_sum];
        self.comm.all_reduce(&mut loss, ReduceOp::Sum)?;
        let (found_inf, grad_norm) = self.update()?;
        if !found_inf {
            self.refresh_params()?;
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
}

/// AdamW's two groups as users know them: `group` (its weight decay) for matrices, the same
/// learning rate without decay for norm gains and biases (see [`crate::layout::group_of`]).
fn param_groups(group: ParamGroup) -> Vec<ParamGroup> {
    let mut groups = vec![group; 2];
    groups[NO_DECAY].weight_decay = 0.0;
    groups
}

pub(crate) fn scalar(t: Tensor<1>) -> Result<f32> {
    let data = t
        .try_into_data()
        .map_err(|e| ZeroError::Model(format!("reading the loss: {e:?}")))?;
    data.iter::<f32>()
        .next()
        .ok_or_else(|| ZeroError::Model("the loss unit returned an empty tensor".into()))
}

pub(crate) fn input_grad(input: &Tensor<3>, grads: &Gradients, unit: usize) -> Result<Tensor<3>> {
    input.grad(grads).ok_or_else(|| {
        ZeroError::Model(format!(
            "unit {unit}: no gradient reached its input (is the input used?)"
        ))
    })
}
