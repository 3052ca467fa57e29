//! `kiln train`: the training loop every rank runs (SPMD), and the launch that starts the ranks.
//!
//! The same config runs on N thread ranks (`dist.world_size`), on ranks that are processes under
//! `mpirun` (detected from the environment; feature `mpi`), or one rank per GPU over NCCL
//! (feature `nccl`). Every rank builds the same model from the same seed, reads the same global
//! batch and keeps its slice; the engine does the rest. Only rank 0 prints and writes files
//! (checkpoints are written by every rank into one folder).
//!
//! - [`launch`]: the ranks (threads, `mpirun`, NCCL) and the backend they use;
//! - [`build`]: the device, tokenizer, model (with LoRA) and engine config of a rank;
//! - [`batches`]: a step's rows as micro-batches with their LoRA dropout;
//! - [`run`]: the loop (set up, step, log, checkpoint, evaluate, summarise);
//! - [`eval`]: held-out loss and exact match by generation;
//! - [`state`]: the trainer's state in a checkpoint.

pub mod batches;
pub mod build;
pub mod eval;
pub mod launch;
pub mod run;
pub mod state;

pub use batches::{batch_of, batches, model_batch, step_dropout};
pub use build::{
    Built, Trainable, build_model, lora_config, model_from_params, policy_of, tokenizer_for,
    zero_config,
};
pub use eval::{EvalResult, addition_accuracy};
pub use launch::train;
pub use run::{Resume, TrainSummary, human};
pub use state::{checkpoint_config, state_config};
