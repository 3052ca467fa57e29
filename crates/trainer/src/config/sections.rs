//! The sections of the job, one type each, with their defaults: `[model]`, `[precision]`,
//! `[zero]`, `[dist]`, `[lora]`, `[optim]`, `[train]` (`[data]` is [`crate::data::config`]).

use std::path::PathBuf;

use kiln_zero::Stage;
use serde::{Deserialize, Serialize};

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

/// `dist.device`: what every rank computes on (see [`crate::device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA under NCCL (built with `cuda`), the CPU otherwise.
    #[default]
    Auto,
    /// burn-flex with kiln's fused kernels.
    Cpu,
    /// burn's wgpu backend (WGSL; any Vulkan, Metal or DX12 adapter; feature `wgpu`).
    Wgpu,
    /// burn's wgpu runtime pinned to Vulkan, SPIR-V where the adapter allows (feature `vulkan`).
    Vulkan,
    /// burn's CUDA backend (feature `cuda`).
    Cuda,
}

/// `[dist]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// Number of ranks (default 2).
    pub world_size: usize,
    pub backend: DistBackend,
    /// The device of every rank (default `auto`).
    pub device: DeviceChoice,
    /// All ranks of a machine on its first GPU, instead of local rank `i` on GPU `i` (modulo
    /// the GPUs there are; default false).
    pub share_device: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            world_size: 2,
            backend: DistBackend::Auto,
            device: DeviceChoice::Auto,
            share_device: false,
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
