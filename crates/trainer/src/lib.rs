//! kiln-trainer: the `kiln` binary and the library behind it.
//!
//! - [`train`]: the SPMD training loop and its launch (thread ranks, `mpirun`, NCCL);
//! - [`device`]: the device of a rank (`dist.device`: cpu, wgpu, vulkan, cuda);
//! - [`export`]: sharded checkpoints to HF safetensors, PEFT adapters, merged models;
//! - [`commands`]: `kiln train | eval | generate | estimate | export`;
//! - [`config`]: the TOML job ([`config::TrainConfig`]) with `--set key=value` overrides;
//! - [`data`]: tokenizers, examples with masked labels, the addition task, text and JSONL files
//!   (chat templates, packing), a deterministic resumable stream of global batches and its
//!   per-rank slices, one file each;
//! - [`fits`]: this machine's memory, against which sizes are checked before allocating;
//! - [`schedule`]: warmup + cosine learning rate;
//! - [`metrics`]: `metrics.jsonl` and the progress line;
//! - [`plot`]: the loss chart as SVG;
//! - [`cli`]: the command-line definitions.
//!
//! Every fallible function returns [`Result`] with a [`TrainerError`] naming the file, line,
//! key or field at fault; nothing here panics on bad input.

pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod fits;
pub mod metrics;
pub mod out;
pub mod plot;
pub mod schedule;
pub mod train;

pub use error::{Result, TrainerError};
