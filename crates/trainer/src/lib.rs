//! kiln-trainer: the `kiln` binary and the library behind it.
//!
//! - [`train`]: the SPMD training loop and its launch (thread ranks, `mpirun`, NCCL);
//! - [`export`]: sharded checkpoints to HF safetensors, PEFT adapters, merged models;
//! - [`commands`]: `kiln train | eval | generate | estimate | export`;
//! - [`config`]: the TOML job ([`config::TrainConfig`]) with `--set key=value` overrides;
//! - [`data`]: examples with masked labels (addition, text, JSONL), a deterministic
//!   resumable stream of global batches and its per-rank slices;
//! - [`tokenizer`]: the byte tokenizer and Hugging Face `tokenizer.json`;
//! - [`jsonl`]: supervised JSON Lines (prompt/response, prompt/completion, chat messages);
//! - [`chat`]: HF chat templates (Jinja, through minijinja) and the assistant turns they render;
//! - [`packing`]: several examples per row, with segment ids and restarting positions;
//! - [`schedule`]: warmup + cosine learning rate;
//! - [`metrics`]: `metrics.jsonl` and the progress line;
//! - [`plot`]: the loss chart as SVG;
//! - [`cli`]: the command-line definitions.
//!
//! Every fallible function returns [`Result`] with a [`TrainerError`] naming the file, line,
//! key or field at fault; nothing here panics on bad input.

pub mod chat;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod jsonl;
pub mod metrics;
pub mod out;
pub mod packing;
pub mod plot;
pub mod schedule;
pub mod tokenizer;
pub mod train;

pub use error::{Result, TrainerError};
