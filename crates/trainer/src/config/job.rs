//! `TrainConfig`: the TOML job description, with `--set key=value` overrides.
//!
//! Every field has a default, so an empty file (or no file) is the built-in job: the
//! `tiny-addition` Llama learning 2-digit addition on 2 thread ranks in bf16 with ZeRO-3.
//!
//! ```toml
//! [model]
//! preset = "tiny-addition"        # or config = "config.json", or pretrained = "dir/"
//! [data]
//! task = "addition"               # addition | text | jsonl
//! seq_len = 32
//! digits = 2
//! [optim]
//! lr = 5e-3
//! warmup_steps = 50
//! [train]
//! steps = 1000
//! global_batch = 64
//! micro_batch = 32
//! ```
//!
//! These defaults reach 99.5% held-out exact match in 1000 steps (about 4 minutes on 2 CPU
//! cores), with answers written least significant digit first.
//!
//! Loading ([`TrainConfig::load`]) reads the file, applies each override at its dotted path,
//! deserializes with unknown fields rejected (the error names the full dotted path, e.g.
//! `unknown field optim.lrr`) and [validates](TrainConfig::validate) the ranges.

use std::path::{Path, PathBuf};

use kiln_models::LlamaConfig;
use kiln_zero::Stage;
use serde::{Deserialize, Serialize};

pub use crate::data::config::{DataConfig, Task, TokenizerSpec};
use crate::error::{Result, TrainerError};
use crate::fits::check_fits;

/// Names of the built-in model presets ([`preset_config`]).
pub const PRESETS: &[&str] = &["tiny-addition"];

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

/// `[model]`: which Llama to build. `pretrained` wins over `config`, which wins over `preset`;
/// setting both `pretrained` and `config` is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A built-in model (see [`PRESETS`]), default `tiny-addition`.
    pub preset: String,
    /// A Hugging Face `config.json`: a randomly initialised model of that shape.
    pub config: Option<PathBuf>,
    /// A folder with `config.json` and `model.safetensors` (or a sharded index).
    pub pretrained: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            preset: "tiny-addition".into(),
            config: None,
            pretrained: None,
        }
    }
}

/// `precision.compute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    #[default]
    Bf16,
    /// f16 compute turns the dynamic loss scaler on.
    F16,
}

/// `precision.reduce`: the dtype gradients cross ranks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceDtype {
    #[default]
    F32,
    /// Half the reduction traffic (FSDP's `reduce_dtype = bfloat16`).
    Bf16,
    F16,
}

/// `[precision]`: the compute dtype and the gradient-reduction dtype; master weights and
/// optimizer state are always f32.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionConfig {
    pub compute: ComputeDtype,
    /// f32 by default; bf16 or f16 halve the bytes of the gradient reduction (each rank's
    /// gradient is rounded once, summed in f32, rounded again).
    pub reduce: ReduceDtype,
}

/// `[zero]`: the ZeRO stage, 0 (DDP) to 3 (FSDP); maps to `kiln_zero::Stage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZeroConfig {
    /// 0, 1, 2 or 3 in TOML (default 3).
    #[serde(with = "stage_number")]
    pub stage: Stage,
    /// Activation recompute: re-run each unit's forward in its backward instead of keeping its
    /// activations (a third more FLOPs, far less memory). Unset: on at stage 3 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute: Option<bool>,
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Three,
            recompute: None,
        }
    }
}

/// `dist.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// MPI when started by `mpirun` (and built with it), NCCL on GPUs, threads otherwise.
    #[default]
    Auto,
    Threads,
    Mpi,
    Nccl,
}

impl std::fmt::Display for DistBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DistBackend::Auto => "auto",
            DistBackend::Threads => "threads",
            DistBackend::Mpi => "mpi",
            DistBackend::Nccl => "nccl",
        })
    }
}

/// `[dist]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// Number of ranks (default 2).
    pub world_size: usize,
    pub backend: DistBackend,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            world_size: 2,
            backend: DistBackend::Auto,
        }
    }
}

/// `[lora]`: PEFT-style LoRA adapters; maps to `kiln_lora::LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub enabled: bool,
    /// Rank (default 8).
    pub r: usize,
    /// PEFT `lora_alpha` (default 16).
    pub alpha: f64,
    /// PEFT `lora_dropout`: dropout on the adapters' input in training (default 0).
    pub dropout: f64,
    /// Module names, default `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// A PEFT adapter folder to start from; its `adapter_config.json` then gives r, alpha,
    /// dropout and the target modules.
    pub adapter: Option<PathBuf>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            adapter: None,
        }
    }
}

/// `[optim]`: AdamW and the learning-rate schedule ([`crate::schedule::lr_at`]).
///
/// Floats are f64 as in `kiln_precision::{AdamWConfig, ParamGroup}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate (default 5e-3).
    pub lr: f64,
    /// AdamW (β1, β2), default (0.9, 0.95).
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warmup from 0 over this many steps (default 50).
    pub warmup_steps: u64,
    /// The cosine decay ends at `lr * min_lr_ratio` (default 0.1).
    pub min_lr_ratio: f64,
    /// Global gradient-norm clipping (default 1.0). In TOML, `0` means no clipping.
    #[serde(with = "clip_norm")]
    pub max_grad_norm: Option<f32>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-3,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            max_grad_norm: Some(1.0),
        }
    }
}

/// `zero.stage` in TOML: the integers 0 (DDP) to 3 (FSDP), read straight into [`Stage`].
mod stage_number {
    use kiln_zero::Stage;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(stage: &Stage, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(match stage {
            Stage::Ddp => 0,
            Stage::One => 1,
            Stage::Two => 2,
            Stage::Three => 3,
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Stage, D::Error> {
        Ok(match i64::deserialize(d)? {
            0 => Stage::Ddp,
            1 => Stage::One,
            2 => Stage::Two,
            3 => Stage::Three,
            n => {
                return Err(D::Error::custom(format!(
                    "{n} must be 0, 1, 2 or 3 (0 = DDP, 3 = FSDP)"
                )));
            }
        })
    }
}

/// `max_grad_norm` in TOML: a number, `0` for none (TOML has no null).
mod clip_norm {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f32(v.unwrap_or(0.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        let v = f64::deserialize(d)? as f32;
        Ok(if v == 0.0 { None } else { Some(v) })
    }
}

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// Optimizer steps (default 1000).
    pub steps: u64,
    /// Rows per optimizer step over all ranks (default 64).
    pub global_batch: usize,
    /// Rows per rank per micro-batch (default 32).
    pub micro_batch: usize,
    pub seed: u64,
    /// Evaluate every this many steps; 0 = only at the end.
    pub eval_interval: u64,
    /// Checkpoint every this many steps; 0 = none.
    pub checkpoint_interval: u64,
    pub output_dir: PathBuf,
    /// Log (metrics line, non-terminal progress line) every this many steps (default 10).
    pub log_interval: u64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            global_batch: 64,
            micro_batch: 32,
            seed: 0,
            eval_interval: 0,
            checkpoint_interval: 0,
            output_dir: "runs/default".into(),
            log_interval: 10,
        }
    }
}

impl TrainConfig {
    /// Reads `path` (none: the defaults), applies `overrides` (`key=value`, dotted keys, values
    /// parsed as TOML and taken as a string when they do not parse), then validates.
    ///
    /// Errors name the file (with line and column for TOML syntax), the `--set` argument, or
    /// the full dotted field (`unknown field optim.lrr`).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = kiln_models::read_text_capped(path, kiln_models::CONFIG_CAP)
                    .map_err(|e| TrainerError::io(path, e))?;
                // Check the file alone first: its errors keep their line and column.
                let config_err = |reason: String| TrainerError::ConfigFile {
                    path: path.into(),
                    reason,
                };
                let de = toml::Deserializer::parse(&text).map_err(|e| config_err(e.to_string()))?;
                let _: TrainConfig = serde_path_to_error::deserialize(de)
                    .map_err(|e| config_err(describe(&e.path().to_string(), e.inner())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| config_err(e.to_string()))?
            }
        };
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        let config = Self::from_table(table).map_err(|reason| match path {
            Some(p) if !overrides.is_empty() => TrainerError::ConfigFile {
                path: p.into(),
                reason: format!("{reason} (after --set overrides)"),
            },
            _ => TrainerError::ConfigSchema { reason },
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses the text of a TOML config (no overrides) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| TrainerError::ConfigSchema {
            reason: e.to_string(),
        })?;
        let config: TrainConfig =
            serde_path_to_error::deserialize(de).map_err(|e| TrainerError::ConfigSchema {
                reason: describe(&e.path().to_string(), e.inner()),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: toml::Table) -> std::result::Result<Self, String> {
        serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| describe(&e.path().to_string(), e.inner()))
    }

    /// The resolved config as TOML (what a run saves in its output folder); loads back equal.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainerError::ConfigSchema {
            reason: format!("cannot write as TOML: {e}"),
        })
    }

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

/// The message of a deserialization error with its dotted path (serde_path_to_error's path ends
/// at an unknown key itself, so `unknown field optim.lrr` names the whole path).
fn describe(path: &str, inner: &dyn std::fmt::Display) -> String {
    let inner = inner.to_string();
    let inner = inner.trim_end();
    if path.is_empty() || path == "." {
        return inner.to_string();
    }
    if let Some(rest) = inner.strip_prefix("unknown field `")
        && let Some((_, rest)) = rest.split_once('`')
    {
        format!("unknown field {path}{rest}")
    } else if inner.contains("unknown field `") {
        format!("unknown field {path}: {inner}")
    } else {
        format!("{path}: {inner}")
    }
}

/// Applies one `key=value` override to `table`.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<()> {
    let err = |reason: &str| TrainerError::Override {
        arg: arg.into(),
        reason: reason.into(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value"))?;
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        return Err(err("empty key segment"));
    }
    let value = parse_value(raw.trim());
    let (last, middle) = segments.split_last().expect("split yields one segment");
    let mut node = table;
    for (i, seg) in middle.iter().enumerate() {
        let entry = node
            .entry(seg.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(err(&format!(
                    "`{}` is a {}, not a table",
                    segments[..=i].join("."),
                    other.type_str()
                )));
            }
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// A `--set` value: TOML if it parses (`3`, `1e-3`, `true`, `["a", "b"]`, `"x"`), else a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// The `LlamaConfig` of a built-in preset (see [`PRESETS`]).
///
/// `tiny-addition`: vocabulary 259 (the byte tokenizer), hidden 64, intermediate 172, 2 layers,
/// 4 heads (2 key/value heads), rope θ 10000, 64 positions: 124,096 parameters.
pub fn preset_config(name: &str) -> Result<LlamaConfig> {
    let json = match name {
        "tiny-addition" => format!(
            r#"{{
                "vocab_size": {vocab},
                "hidden_size": 64,
                "intermediate_size": 172,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rope_theta": 10000.0,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false
            }}"#,
            vocab = crate::data::BYTE_VOCAB_SIZE
        ),
        other => {
            return Err(TrainerError::invalid(
                "model.preset",
                format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
            ));
        }
    };
    Ok(LlamaConfig::from_json(&json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kiln-config-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn set(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn empty_is_default_and_valid() {
        let c = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(c, TrainConfig::default());
        assert_eq!(
            TrainConfig::from_toml_str("").unwrap(),
            TrainConfig::default()
        );
        assert_eq!(c.accumulation_steps().unwrap(), 1);
        assert_eq!(c.zero.stage, Stage::Three);
        assert_eq!(c.precision.compute, ComputeDtype::Bf16);
        assert_eq!(c.optim.max_grad_norm, Some(1.0));
    }

    #[test]
    fn overrides_apply_at_dotted_paths() {
        let c = TrainConfig::load(
            None,
            &set(&[
                "optim.lr=3e-4",
                "data.task=text",
                "data.paths=[\"a.txt\", \"b.txt\"]",
                "dist.world_size=4",
                "train.global_batch=128",
                "lora.enabled=true",
                "lora.target_modules=[\"q_proj\"]",
                "data.tokenizer=/tmp/tok.json",
                "optim.max_grad_norm=0",
                "model.pretrained=/models/x y",
            ]),
        )
        .unwrap();
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(c.data.task, Task::Text);
        assert_eq!(c.data.paths, vec![PathBuf::from("a.txt"), "b.txt".into()]);
        assert_eq!(c.dist.world_size, 4);
        assert_eq!(c.accumulation_steps().unwrap(), 1);
        assert!(c.lora.enabled);
        assert_eq!(
            c.data.tokenizer,
            TokenizerSpec::File("/tmp/tok.json".into())
        );
        assert_eq!(c.optim.max_grad_norm, None);
        assert_eq!(c.model.pretrained, Some("/models/x y".into()));
    }

    #[test]
    fn file_then_overrides() {
        let path = temp_file("ok", "[optim]\nlr = 0.01\n[train]\nsteps = 7\n");
        let c = TrainConfig::load(Some(&path), &set(&["train.steps=9"])).unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.train.steps, 9);
    }

    #[test]
    fn unknown_fields_name_the_dotted_path() {
        let e = TrainConfig::load(None, &set(&["optim.lrr=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field optim.lrr"), "{e}");
        let e = TrainConfig::load(None, &set(&["nope.x=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field nope"), "{e}");

        let path = temp_file("unknown", "[optim]\nlr = 0.01\n\n[train]\nstepz = 3\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml"), "{e}");
        assert!(e.contains("unknown field train.stepz"), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn type_and_syntax_errors_keep_file_line_and_field() {
        let path = temp_file("syntax", "[optim]\nlr = = 1\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml") && e.contains("line 2"), "{e}");

        let path = temp_file("type", "[data]\nseq_len = \"long\"\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("data.seq_len") && e.contains("line 2"), "{e}");

        let e = TrainConfig::load(None, &set(&["data.task=images"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.task"), "{e}");

        let e = TrainConfig::load(Some(Path::new("/nonexistent/kiln.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kiln.toml"), "{e}");
    }

    #[test]
    fn bad_overrides() {
        let e = TrainConfig::load(None, &set(&["optim.lr"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--set optim.lr") && e.contains("key=value"),
            "{e}"
        );
        let e = TrainConfig::load(None, &set(&["optim.lr=1", "optim.lr.x=2"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`optim.lr` is a integer, not a table"), "{e}");
        let e = TrainConfig::load(None, &set(&["optim..lr=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty key segment"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("optim.lr=0", "optim.lr"),
            ("optim.lr=-1e-3", "optim.lr"),
            ("optim.betas=[0.9, 1.0]", "optim.betas[1]"),
            ("data.seq_len=4", "data.seq_len"),
            ("data.seq_len=10", "data.seq_len"),
            ("data.digits=0", "data.digits"),
            ("dist.world_size=0", "dist.world_size"),
            ("dist.world_size=3", "train.global_batch"),
            ("train.micro_batch=0", "train.micro_batch"),
            ("data.task=jsonl", "data.paths"),
            ("model.preset=huge", "model.preset"),
            ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
            ("data.packing=true", "data.packing"),
        ];
        for (arg, field) in cases {
            let e = TrainConfig::load(None, &set(&[arg]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("config field {field}")), "{arg}: {e}");
        }
        let e = TrainConfig::load(None, &set(&["zero.stage=4"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero.stage: 4 must be 0, 1, 2 or 3"), "{e}");
        let e = TrainConfig::load(None, &set(&["lora.enabled=true", "lora.r=0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r"), "{e}");
        let e = TrainConfig::load(None, &set(&["dist.world_size=3"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dist.world_size") && e.contains("train.micro_batch"),
            "{e}"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let c = TrainConfig::load(
            None,
            &set(&[
                "optim.max_grad_norm=0",
                "data.tokenizer=tok.json",
                "data.chat_template=chat.jinja",
                "data.packing=true",
                "data.task=jsonl",
                "data.paths=[\"a.jsonl\"]",
                "lora.adapter=ad",
                "precision.compute=f16",
                "dist.backend=threads",
            ]),
        )
        .unwrap();
        let text = c.to_toml().unwrap();
        assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), c, "{text}");
        let d = TrainConfig::default();
        assert_eq!(
            TrainConfig::from_toml_str(&d.to_toml().unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn preset_builds() {
        let c = preset_config("tiny-addition").unwrap();
        assert_eq!(c.vocab_size, crate::data::BYTE_VOCAB_SIZE);
        assert_eq!(c.hidden_size, 64);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.max_position_embeddings, 64);
        assert!(
            preset_config("nope")
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        let job = TrainConfig::default().model_config().unwrap();
        assert_eq!(job, c);
        let e = TrainConfig::load(None, &set(&["data.seq_len=65"]))
            .unwrap()
            .model_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.seq_len"), "{e}");
    }
}
