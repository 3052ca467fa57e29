//! The trainer's state in a checkpoint (step, data position, the run's config) and the
//! metrics of a resumed run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::DataPosition;
use crate::{Result, TrainerError};

/// The trainer's state in a checkpoint manifest (`extra`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TrainerState {
    /// Steps done.
    pub(super) step: u64,
    pub(super) data_position: DataPosition,
    pub(super) skipped_steps: u64,
    pub(super) model_config: serde_json::Value,
    pub(super) lora: Option<serde_json::Value>,
    pub(super) config: String,
}

/// A fresh run starts a new `metrics.jsonl`; a resumed one keeps the records up to the step it
/// resumes at (a run killed after its last checkpoint logged steps that will be redone).
pub(super) fn trim_metrics(out_dir: &Path, resumed_at: Option<u64>) -> Result<()> {
    let path = out_dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = match resumed_at {
        None => String::new(),
        Some(step) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
    };
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| TrainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainerError::io(&path, e))
}

/// Reads a checkpoint's trainer state: the run's config and where it stopped.
pub fn checkpoint_config(dir: &Path) -> Result<(TrainConfig, u64)> {
    state_config(&kiln_zero::read_manifest(dir)?.extra, dir)
}

/// The run's config and step in a checkpoint manifest's `extra` (the trainer state) of `dir`.
pub fn state_config(extra: &serde_json::Value, dir: &Path) -> Result<(TrainConfig, u64)> {
    let manifest = dir.join(kiln_zero::checkpoint::MANIFEST);
    let s = TrainerState::deserialize(extra).map_err(|e| {
        TrainerError::Checkpoint(format!("{}: trainer state: {e}", manifest.display()))
    })?;
    let config = TrainConfig::from_toml_str(&s.config).map_err(|e| {
        TrainerError::Checkpoint(format!(
            "{}: the run's config stored in it: {e}",
            manifest.display()
        ))
    })?;
    Ok((config, s.step))
}
