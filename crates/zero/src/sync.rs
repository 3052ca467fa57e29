//! Where gradients go once a unit's backward is done (the plan's [`GradSync`]), the optimizer
//! step on this rank's shard, and the updated parameters back where the model computes.

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use kiln_dist::{Communicator, Element, ReduceOp};

use crate::engine::{Engine, UnitState};
use crate::error::{Result, ZeroError};
use crate::layout::UnitLayout;
use crate::plan::GradSync;
use crate::shard::ShardBuf;
use crate::units::Units;

impl<U: Units> Engine<U> {
    /// A unit's backward is done: its gradients go where the stage says, at once.
    pub(crate) fn unit_done(
        &mut self,
        unit: usize,
        mut unit_grads: Vec<(String, TensorData)>,
        last: bool,
    ) -> Result<()> {
        // A tied weight's gradient from this unit waits for its owner's backward (later: the
        // owner is an earlier unit); the owner adds what later units left for it.
        for k in 0..self.state[unit].shared.len() {
            let (owner, path, _) = &self.state[unit].shared[k];
            if let Some(i) = unit_grads.iter().position(|(p, _)| p == path) {
                let owner = *owner;
                let g = unit_grads.swap_remove(i);
                self.state[owner].pending.push(g);
            }
        }
        let pending = std::mem::take(&mut self.state[unit].pending);
        unit_grads.extend(pending);
        let s = &mut self.state[unit];
        match self.plan.grad_sync {
            GradSync::AllReduce => {
                for (p, g) in &unit_grads {
                    if s.layout.flat.get(p).is_some() {
                        s.master.add_grad(p, g)?;
                    }
                }
                if last {
                    let (comm, reduce) = (&self.comm, self.config.policy.reduce);
                    metered(comm, &mut self.model_bytes, || {
                        all_reduce_grads(comm, reduce, s.master.grads_mut())
                    })?;
                }
            }
            GradSync::ReduceScatterAtStepEnd | GradSync::ReduceScatterAfterLastMicroBatch => {
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
                if last && self.plan.grad_sync == GradSync::ReduceScatterAfterLastMicroBatch {
                    self.reduce_scatter_unit(unit)?;
                }
            }
            GradSync::ReduceScatterEachMicroBatch => {
                // Every micro-batch's unit gradient is reduce-scattered at once and added to
                // the owned shard: no full-size gradient outlives the unit's backward.
                if s.layout.padded == 0 {
                    return Ok(());
                }
                let bytes = (s.layout.padded * std::mem::size_of::<f32>()) as u64;
                self.grad_live += bytes;
                self.grad_peak = self.grad_peak.max(self.grad_live);
                let mut full = vec![0.0; s.layout.padded];
                add_into(&mut full, &s.layout, &unit_grads)?;
                drop(unit_grads);
                let (comm, reduce) = (&self.comm, self.config.policy.reduce);
                metered(comm, &mut self.model_bytes, || {
                    reduce_scatter_grads(comm, reduce, &full, s.master.grads_mut(), true)
                })?;
                drop(full);
                self.grad_live -= bytes;
            }
        }
        Ok(())
    }

    /// Reduce-scatters a unit's accumulated gradient into its owner's f32 shard and frees it.
    pub(crate) fn reduce_scatter_unit(&mut self, unit: usize) -> Result<()> {
        let s = &mut self.state[unit];
        let Some(accum) = s.accum.take() else {
            return Ok(());
        };
        let (comm, reduce) = (&self.comm, self.config.policy.reduce);
        metered(comm, &mut self.model_bytes, || {
            reduce_scatter_grads(comm, reduce, &accum, s.master.grads_mut(), false)
        })?;
        self.grad_live -= (accum.len() * std::mem::size_of::<f32>()) as u64;
        Ok(())
    }

    /// Unscale, agree on inf/NaN across ranks, clip by the global norm, step AdamW on the shard.
    pub(crate) fn update(&mut self) -> Result<(bool, Option<f32>)> {
        let inv = self.scaler.as_ref().map_or(1.0, |s| s.inv_scale());
        let clip = self.config.max_grad_norm;
        // With clipping, the norm's pass finds a non-finite gradient too (it makes Σg²
        // non-finite): the separate check runs only when there is a loss scale to divide out.
        let mut local_inf = false;
        if inv != 1.0 || clip.is_none() {
            for s in &mut self.state {
                local_inf |= s.master.unscale_grads(inv);
            }
        }
        let (found_inf, grad_norm, grad_scale) = match clip {
            Some(max) => {
                let local: f64 = self
                    .state
                    .iter()
                    .map(|s| sum_of_squares(s.master.grads()))
                    .sum();
                let mut sq = [local as f32];
                // Sharded gradients: every rank's part is in the sum, its non-finite ones too.
                // Whole gradients are the same on every rank after their reduction.
                if self.plan.shard_optimizer {
                    self.comm.all_reduce(&mut sq, ReduceOp::Sum)?;
                }
                if sq[0].is_finite() {
                    let norm = sq[0].sqrt();
                    let coef = max / (norm + 1e-6);
                    (false, Some(norm), if coef < 1.0 { coef } else { 1.0 })
                } else {
                    (true, None, 1.0)
                }
            }
            None => {
                let mut flag = [if local_inf { 1.0f32 } else { 0.0 }];
                self.comm.all_reduce(&mut flag, ReduceOp::Max)?;
                (flag[0] > 0.0, None, 1.0)
            }
        };
        // Clipping's coefficient multiplies each gradient inside the optimizer's pass.
        for s in &mut self.state {
            s.master.apply_scaled(found_inf, grad_scale)?;
        }
        if let Some(scaler) = &mut self.scaler {
            scaler.update(found_inf);
        }
        Ok((found_inf, grad_norm))
    }

    /// Puts the updated parameters where the model computes from: the compute-dtype shards
    /// under stage 3, the whole compute model otherwise (straight from the full master under
    /// DDP, by an all-gather of the shards under stages 1-2).
    pub(crate) fn refresh_params(&mut self) -> Result<()> {
        if self.plan.shard_params {
            return Ok(());
        }
        let dtype = self.config.policy.compute;
        for u in 0..self.state.len() {
            let s = &self.state[u];
            if s.layout.flat.entries().is_empty() {
                continue;
            }
            let values = if self.plan.shard_optimizer {
                metered(&self.comm, &mut self.model_bytes, || {
                    gather(&self.comm, s, dtype)
                })?
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

/// `Σ x²` in f64, over fixed blocks on the rank's compute threads, added in block order (the
/// result does not depend on the number of threads).
fn sum_of_squares(xs: &[f32]) -> f64 {
    use rayon::prelude::*;
    let blocks: Vec<f64> = xs
        .par_chunks(1 << 16)
        .map(kiln_precision::sum_of_squares)
        .collect();
    blocks.iter().sum()
}

/// Runs the collectives of `f` and adds the bytes this rank sent in them to `counter` (the
/// step's model traffic, [`StepReport::model_bytes_sent`]).
pub(crate) fn metered<T>(
    comm: &Communicator,
    counter: &mut u64,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let sent = || comm.traffic().total().bytes_sent;
    let before = sent();
    let out = f()?;
    *counter += sent() - before;
    Ok(out)
}

/// All-gathers a unit's master shard in the compute dtype and cuts it into parameters.
pub(crate) fn gather(
    comm: &Communicator,
    s: &UnitState,
    dtype: DType,
) -> Result<Vec<(String, TensorData)>> {
    let mut shard = ShardBuf::zeros(dtype, s.layout.shard.len)?;
    shard.cast_from_master(&s.master)?;
    shard.gather(comm, &s.layout.flat, s.layout.padded)
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

/// Sums `grads` over ranks in place, crossing ranks in `reduce` (see [`ZeroConfig::policy`]).
fn all_reduce_grads(comm: &Communicator, reduce: DType, grads: &mut [f32]) -> Result<()> {
    fn via<T: Element>(
        comm: &Communicator,
        grads: &mut [f32],
        to: fn(f32) -> T,
        from: fn(T) -> f32,
    ) -> Result<()> {
        let mut wire: Vec<T> = grads.iter().map(|&g| to(g)).collect();
        comm.all_reduce(&mut wire, ReduceOp::Sum)?;
        for (g, w) in grads.iter_mut().zip(wire) {
            *g = from(w);
        }
        Ok(())
    }
    match reduce {
        DType::BF16 => via(comm, grads, bf16::from_f32, bf16::to_f32),
        DType::F16 => via(comm, grads, f16::from_f32, f16::to_f32),
        _ => Ok(comm.all_reduce(grads, ReduceOp::Sum)?),
    }
}

/// This rank's part of `full` summed over ranks, written to `out` (or added with `add`), crossing
/// ranks in `reduce` (see [`ZeroConfig::policy`]).
fn reduce_scatter_grads(
    comm: &Communicator,
    reduce: DType,
    full: &[f32],
    out: &mut [f32],
    add: bool,
) -> Result<()> {
    fn via<T: Element>(
        comm: &Communicator,
        full: &[f32],
        out: &mut [f32],
        add: bool,
        to: fn(f32) -> T,
        from: fn(T) -> f32,
    ) -> Result<()> {
        let wire: Vec<T> = full.iter().map(|&g| to(g)).collect();
        let part = comm.reduce_scatter(&wire, ReduceOp::Sum)?;
        for (o, w) in out.iter_mut().zip(part) {
            *o = if add { *o + from(w) } else { from(w) };
        }
        Ok(())
    }
    match reduce {
        DType::BF16 => via(comm, full, out, add, bf16::from_f32, bf16::to_f32),
        DType::F16 => via(comm, full, out, add, f16::from_f32, f16::to_f32),
        _ if add => {
            let part = comm.reduce_scatter(full, ReduceOp::Sum)?;
            for (o, v) in out.iter_mut().zip(part) {
                *o += v;
            }
            Ok(())
        }
        _ => Ok(comm.reduce_scatter_into(full, out, ReduceOp::Sum)?),
    }
}
