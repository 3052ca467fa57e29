//! [`TrainConfig`], the whole job, and the checks that span its sections.

use kiln_models::LlamaConfig;
use serde::{Deserialize, Serialize};

use super::presets::{PRESETS, preset_config};
use super::sections::{
    DistConfig, LoopConfig, LoraConfig, ModelConfig, OptimConfig, PrecisionConfig, ZeroConfig,
};
use crate::data::config::{DataConfig, Task};
use crate::error::{Result, TrainerError};
use crate::fits::check_fits;

/// The whole job: one field per TOML section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub precision: PrecisionConfig,
    pub zero: ZeroConfig,
    pub dist: DistConfig,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub train: LoopConfig,
}

impl TrainConfig {
    /// Gradient-accumulation steps: `global_batch / (world_size * micro_batch)`.
    pub fn accumulation_steps(&self) -> Result<usize> {
        let t = &self.train;
        let per_step = self
            .dist
            .world_size
            .checked_mul(t.micro_batch)
            .ok_or_else(|| {
                TrainerError::invalid(
                    "train.micro_batch",
                    format!(
                        "dist.world_size ({}) x train.micro_batch ({}) overflows",
                        self.dist.world_size, t.micro_batch
                    ),
                )
            })?;
        if per_step == 0 || !t.global_batch.is_multiple_of(per_step) {
            return Err(TrainerError::invalid(
                "train.global_batch",
                format!(
                    "{} is not a multiple of dist.world_size ({}) x train.micro_batch ({}) = {per_step}",
                    t.global_batch, self.dist.world_size, t.micro_batch
                ),
            ));
        }
        Ok(t.global_batch / per_step)
    }

    /// Checks ranges and consistency; the error names the dotted field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(TrainerError::invalid(field, reason));
        let m = &self.model;
        if m.config.is_some() && m.pretrained.is_some() {
            return bad(
                "model.config",
                "set either model.config or model.pretrained (which has its own config.json), not both".into(),
            );
        }
        if m.config.is_none() && m.pretrained.is_none() && !PRESETS.contains(&m.preset.as_str()) {
            return bad(
                "model.preset",
                format!(
                    "unknown preset `{}` (known: {})",
                    m.preset,
                    PRESETS.join(", ")
                ),
            );
        }

        let d = &self.data;
        d.validate()?;

        if self.dist.world_size < 1 {
            return bad("dist.world_size", "must be at least 1".into());
        }

        let l = &self.lora;
        if l.enabled || l.adapter.is_some() {
            if l.r == 0 {
                return bad("lora.r", "must be positive".into());
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad("lora.alpha", format!("{} must be positive", l.alpha));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad("lora.dropout", format!("{} must be in [0, 1)", l.dropout));
            }
            if l.target_modules.is_empty() {
                return bad(
                    "lora.target_modules",
                    "must name at least one module".into(),
                );
            }
        }

        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optim.lr", format!("{} must be positive", o.lr));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad(
                    &format!("optim.betas[{i}]"),
                    format!("{b} must be in [0, 1)"),
                );
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return bad("optim.eps", format!("{} must be positive", o.eps));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(
                "optim.weight_decay",
                format!("{} must be >= 0", o.weight_decay),
            );
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return bad(
                "optim.min_lr_ratio",
                format!("{} must be in [0, 1]", o.min_lr_ratio),
            );
        }
        if let Some(n) = o.max_grad_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad(
                "optim.max_grad_norm",
                format!("{n} must be positive (0 = no clipping)"),
            );
        }

        let t = &self.train;
        if t.steps == 0 {
            return bad("train.steps", "must be at least 1".into());
        }
        if t.global_batch == 0 {
            return bad("train.global_batch", "must be at least 1".into());
        }
        if t.micro_batch == 0 {
            return bad("train.micro_batch", "must be at least 1".into());
        }
        if t.log_interval == 0 {
            return bad("train.log_interval", "must be at least 1".into());
        }
        self.accumulation_steps()?;
        // Sizes are checked before anything is allocated: a row is seq_len ids and labels
        // (i64 each), held for every row of a global batch and every held-out row.
        let row = d.seq_len as f64 * 16.0;
        check_fits(
            "train.global_batch",
            &format!(
                "a global batch of {} rows of data.seq_len {} tokens",
                t.global_batch, d.seq_len
            ),
            t.global_batch as f64 * row,
        )?;
        if d.task == Task::Addition {
            check_fits(
                "data.eval_examples",
                &format!(
                    "{} held-out rows of data.seq_len {} tokens",
                    d.eval_examples, d.seq_len
                ),
                d.eval_examples as f64 * row,
            )?;
        }
        Ok(())
    }

    /// `data.seq_len` must fit the model's `max_position_embeddings`.
    pub fn check_seq_len(&self, model: &LlamaConfig) -> Result<()> {
        if self.data.seq_len > model.max_position_embeddings {
            return Err(TrainerError::invalid(
                "data.seq_len",
                format!(
                    "{} exceeds the model's max_position_embeddings {}",
                    self.data.seq_len, model.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    /// The model's `LlamaConfig`: from `model.pretrained/config.json`, `model.config`, or the
    /// preset; checks that `data.seq_len` fits its `max_position_embeddings`.
    pub fn model_config(&self) -> Result<LlamaConfig> {
        let config = match (&self.model.pretrained, &self.model.config) {
            (Some(dir), _) => LlamaConfig::from_file(dir.join("config.json"))?,
            (None, Some(file)) => LlamaConfig::from_file(file)?,
            (None, None) => preset_config(&self.model.preset)?,
        };
        self.check_seq_len(&config)?;
        Ok(config)
    }
}
