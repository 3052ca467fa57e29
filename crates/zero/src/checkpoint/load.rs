//! Loading a checkpoint written by any number of ranks under any stage.

use std::path::Path;

use kiln_precision::AdamWState;

use super::files::Files;
use super::manifest::{MANIFEST, err, read_manifest};
use super::reader::unit_manifest;
use crate::engine::Engine;
use crate::error::Result;
use crate::shard::split;
use crate::units::Units;

impl<U: Units> Engine<U> {
    /// Loads a checkpoint written by any number of ranks under any stage into this engine
    /// (every rank reads what it needs; no collective). The model's units must have the same
    /// parameters (paths, shapes, trainable or frozen). Returns the caller's `extra` state.
    pub fn load_checkpoint(&mut self, dir: impl AsRef<Path>) -> Result<serde_json::Value> {
        let dir = dir.as_ref();
        let m = read_manifest(dir)?;
        let manifest_path = dir.join(MANIFEST);
        if m.units.len() != self.state.len() {
            return Err(err(
                &manifest_path,
                format!(
                    "{} units, the model has {}",
                    m.units.len(),
                    self.state.len()
                ),
            ));
        }
        for (u, (saved, s)) in m.units.iter().zip(&self.state).enumerate() {
            for (kind, saved, now) in [
                ("trainable", &saved.trainable, unit_manifest(&s.layout.flat)),
                ("frozen", &saved.frozen, unit_manifest(&s.frozen.flat)),
            ] {
                if *saved != now {
                    let missing = saved.iter().find(|p| !now.contains(p));
                    let extra = now.iter().find(|p| !saved.contains(p));
                    let detail = match (missing, extra) {
                        (Some(a), Some(b)) => format!("saved {a:?}, the model has {b:?}"),
                        (Some(a), None) => format!("saved {a:?}, not {kind} in the model"),
                        (None, Some(b)) => format!("the model's {b:?} was not saved as {kind}"),
                        (None, None) => "the order differs".into(),
                    };
                    return Err(err(
                        &manifest_path,
                        format!("unit {u}: {kind} parameters differ: {detail}"),
                    ));
                }
            }
        }
        let files = Files::open(dir, &m)?;
        let compute = self.config.policy.compute;
        for u in 0..self.state.len() {
            let s = &mut self.state[u];
            let numel = s.layout.flat.numel();
            let mut values = Vec::new();
            if numel > 0 {
                let shard = s.layout.shard;
                let cut = |full: &[f32]| -> Vec<f32> {
                    (shard.offset..shard.offset + shard.len)
                        .map(|i| full.get(i).copied().unwrap_or(0.0))
                        .collect()
                };
                let master = files.assemble(&format!("u{u}.master"), numel)?;
                s.master.params_mut().copy_from_slice(&cut(&master));
                s.master.load_optimizer_state(AdamWState {
                    step: m.optimizer_step,
                    exp_avg: cut(&files.assemble(&format!("u{u}.exp_avg"), numel)?),
                    exp_avg_sq: cut(&files.assemble(&format!("u{u}.exp_avg_sq"), numel)?),
                })?;
                if !self.plan.shard_params {
                    values.extend(
                        split(&master, &s.layout.flat)
                            .into_iter()
                            .map(|(p, d)| (p, d.convert_dtype(compute))),
                    );
                }
            }
            let numel = s.frozen.flat.numel();
            if numel > 0 {
                let frozen = files.assemble(&format!("u{u}.frozen"), numel)?;
                let params = split(&frozen, &s.frozen.flat);
                match &mut s.frozen_shard {
                    Some(buf) => buf.fill(&s.frozen.flat, s.frozen.shard, &params)?,
                    None => values.extend(
                        params
                            .into_iter()
                            .map(|(p, d)| (p, d.convert_dtype(compute))),
                    ),
                }
            }
            if self.plan.shard_params {
                // Stage 3 keeps the unit released; the shards are all it needs.
                continue;
            }
            if !values.is_empty() {
                self.units.set_unit_params(u, values)?;
            }
        }
        match (&mut self.scaler, m.scaler) {
            (Some(s), Some(state)) => s.load_state(state)?,
            (Some(_), None) => tracing::warn!(
                "{}: no loss scaler state (saved without f16); starting from the initial scale",
                manifest_path.display()
            ),
            _ => {}
        }
        Ok(m.extra)
    }
}
