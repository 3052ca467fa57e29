//! One micro-batch through the units: forward unit by unit with detached boundaries (each
//! unit gathered just before it runs under stage 3), then backward in reverse, feeding each
//! unit its upstream gradient and handing its gradients on as soon as they exist.

use burn::tensor::Tensor;

use crate::engine::{Engine, UnitState, input_grad, scalar};
use crate::error::{Result, ZeroError};
use crate::shard::ShardBuf;
use crate::sync::{gather, metered};
use crate::units::Units;

impl<U: Units> Engine<U> {
    /// Forward unit by unit, then backward in reverse, feeding each unit its upstream gradient.
    ///
    /// Without recompute a unit keeps its autodiff graph from its forward to its backward (its
    /// parameters stay gathered in between under stage 3); with recompute only each unit's
    /// detached input is kept and the unit is gathered and run again for its backward. Under
    /// stage 3 the loss unit is gathered once for its forward and backward. Returns the local
    /// loss sum.
    pub(crate) fn forward_backward(
        &mut self,
        batch: &U::Batch,
        factor: f32,
        last: bool,
    ) -> Result<f32> {
        let n = self.units.num_units();
        let recompute = self.plan.recompute;
        let (h, mut kept) = self.forward_units(Some(batch), true)?;
        let h_in = tracked(h.expect("a forward with a batch ends in a hidden state"));
        self.fetch(n - 1)?;
        let loss = self.units.loss_sum(h_in.clone(), batch);
        let loss_value = scalar(loss.clone())?;
        let mut grads = loss.mul_scalar(factor).backward();
        let mut upstream = input_grad(&h_in, &grads, n - 1)?;
        let unit_grads = self.units.unit_grads(n - 1, &mut grads)?;
        drop(grads);
        self.release(n - 1)?;
        self.unit_done(n - 1, unit_grads, last)?;
        for u in (0..n - 1).rev() {
            let (input, out) = kept.pop().expect("one kept input per unit before the loss");
            if u == 0 && self.state[0].layout.flat.entries().is_empty() {
                // A frozen first unit (the embedding under LoRA) needs no backward at all.
                drop(out);
                if !recompute {
                    self.release(0)?;
                }
                self.unit_done(0, Vec::new(), last)?;
                break;
            }
            let input = input.map(tracked);
            let out = match out {
                Some(out) => out,
                None => {
                    self.fetch(u)?;
                    self.units.forward(u, input.clone(), batch)
                }
            };
            let mut grads = (out * upstream.clone()).sum().backward();
            if let Some(input) = &input {
                upstream = input_grad(input, &grads, u)?;
            }
            let unit_grads = self.units.unit_grads(u, &mut grads)?;
            drop(grads);
            self.release(u)?;
            self.unit_done(u, unit_grads, last)?;
        }
        Ok(loss_value)
    }

    /// Units `0..n-1` forward (all but the loss unit), each gathered just before it runs under
    /// stage 3, on `batch` (a rank without one still joins the gathers). Returns the last hidden
    /// state, detached, and with `train`, per unit its input (`None` for unit 0) and, without
    /// recompute, its output's autodiff graph (the unit then stays gathered until its backward;
    /// the input is then a leaf). With recompute or without `train` the units run without
    /// gradient tracking.
    #[allow(clippy::type_complexity)]
    pub(crate) fn forward_units(
        &mut self,
        batch: Option<&U::Batch>,
        train: bool,
    ) -> Result<(
        Option<Tensor<3>>,
        Vec<(Option<Tensor<3>>, Option<Tensor<3>>)>,
    )> {
        let n = self.units.num_units();
        let recompute = self.plan.recompute;
        let mut kept = Vec::with_capacity(if train { n - 1 } else { 0 });
        let mut h: Option<Tensor<3>> = None;
        for u in 0..n - 1 {
            self.fetch(u)?;
            match batch {
                Some(b) if train && !recompute => {
                    let input = h.take().map(Tensor::require_grad);
                    let out = self.units.forward(u, input.clone(), b);
                    h = Some(out.clone().detach());
                    kept.push((input, Some(out)));
                }
                // A unit that is recomputed for its backward runs this forward without autodiff
                // too: burn frees a graph no backward consumes only in the sweep after the next
                // backward, so every unit's saved activations and gathered parameters would
                // live until the loss unit's backward (+0.44 GB per rank on the 160M job).
                Some(b) => {
                    let input = h.take();
                    h = Some(self.units.detached().forward(u, input.clone(), b));
                    if train {
                        kept.push((input, None));
                    }
                }
                None => {}
            }
            if !train || recompute {
                self.release(u)?;
            }
        }
        Ok((h, kept))
    }

    /// Stage 3: all-gathers `unit`'s parameters (trainable and frozen) into the model.
    pub(crate) fn fetch(&mut self, unit: usize) -> Result<()> {
        if !self.plan.shard_params {
            return Ok(());
        }
        let (comm, state, compute) = (&self.comm, &self.state, self.config.policy.compute);
        let s = &state[unit];
        let (values, shared_bytes) = metered(comm, &mut self.model_bytes, || {
            let mut values = Vec::new();
            if !s.layout.flat.entries().is_empty() {
                values.extend(gather(comm, s, compute)?);
            }
            if !s.frozen.flat.entries().is_empty() {
                values.extend(frozen_shard(s)?.gather(comm, &s.frozen.flat, s.frozen.padded)?);
            }
            // Tied weights come from their owner's shards (every rank gathers the same ones).
            let mut shared_bytes = 0;
            for (owner, path, bytes) in &s.shared {
                let o = &state[*owner];
                let whole = if o.layout.flat.get(path).is_some() {
                    gather(comm, o, compute)?
                } else {
                    frozen_shard(o)?.gather(comm, &o.frozen.flat, o.frozen.padded)?
                };
                values.extend(whole.into_iter().filter(|(p, _)| p == path));
                shared_bytes += bytes;
            }
            Ok((values, shared_bytes))
        })?;
        let s = &self.state[unit];
        self.gathered_live += s.whole_bytes + shared_bytes;
        self.gathered_peak = self.gathered_peak.max(self.gathered_live);
        self.units.set_unit_params(unit, values)
    }

    /// Stage 3: drops `unit`'s whole parameters (shared ones included) again.
    pub(crate) fn release(&mut self, unit: usize) -> Result<()> {
        if !self.plan.shard_params {
            return Ok(());
        }
        let s = &self.state[unit];
        self.gathered_live -= s.whole_bytes + s.shared.iter().map(|(_, _, b)| b).sum::<u64>();
        self.units.release_unit(unit)
    }
}

/// `t` as a leaf whose gradient the backward keeps (a recomputed unit's input comes from a
/// forward without autodiff).
fn tracked(t: Tensor<3>) -> Tensor<3> {
    t.autodiff().require_grad()
}

/// Stage 3: the unit's shard of its frozen parameters.
fn frozen_shard(s: &UnitState) -> Result<&ShardBuf> {
    s.frozen_shard
        .as_ref()
        .ok_or_else(|| ZeroError::Model("a sharded unit without its frozen shard".into()))
}
