//! Data: examples with masked labels, the three tasks, and a deterministic, resumable,
//! shardable stream of global batches; one file per concept:
//!
//! - [`config`]: `[data]` and its validation (the one place `data.*` fields are checked);
//! - [`tokenizer`]: the byte tokenizer and Hugging Face `tokenizer.json`;
//! - [`example`]: a row with masked labels, and [`collate`];
//! - [`addition`]: the synthetic addition (and subtraction) task;
//! - [`text`], [`jsonl`] (with [`chat`] templates) and [`packing`]: rows from files;
//! - [`stream`]: the resumable stream of global batches and each rank's slice.
//!
//! # Labels
//! An [`Example`] holds `ids` and `labels` of the same length (`seq_len`). `labels` are the ids
//! themselves, with [`IGNORE_INDEX`] (-100) where a token must not be learned (prompt tokens,
//! padding), exactly as `kiln_models::causal_lm_loss_sum` expects: position `t` predicts
//! `labels[t + 1]`. Rows are right-padded, so with a causal mask the padding never influences a
//! counted position and no attention mask is needed for training.
//!
//! # Determinism
//! Every rank builds the same [`Dataset`] from the same config and seed and calls
//! [`Dataset::global_batch`] with the same [`DataPosition`], so all ranks see the same global
//! batch; [`rank_slice`] then picks each rank's rows and [`micro_batches`] cuts them.
//! The position is saved in checkpoints so a resumed run continues at the exact row.

pub mod addition;
pub mod chat;
pub mod config;
pub mod example;
pub mod jsonl;
pub mod packing;
mod rng;
pub mod stream;
#[cfg(test)]
mod test_files;
pub mod text;
pub mod tokenizer;

pub use addition::AdditionTask;
pub use config::{DataConfig, Operation, Task, TokenizerSpec};
pub use example::{Batch, Example, IGNORE_INDEX, collate};
pub use jsonl::{JsonlData, load_jsonl};
pub use rng::splitmix64;
pub use stream::{DataPosition, Dataset, micro_batches, rank_range, rank_slice};
pub use text::pack_text;
pub use tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE, Tokenizer};
