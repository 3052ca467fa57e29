//! kiln-zero: data parallelism over a model run as a stack of units.
//!
//! [`Engine`] runs any model that implements [`Units`] (embedding, blocks, head + loss): forward
//! unit by unit with detached boundaries, backward in reverse feeding each unit its upstream
//! gradient, and hands each unit's gradients to the communicator as soon as they exist. The
//! [`Stage`] picks, in one place, what every rank keeps:
//!
//! | stage | gradients | master + AdamW | per step |
//! | --- | --- | --- | --- |
//! | [`Stage::Ddp`] | full, f32 | full | all-reduce per unit |
//! | [`Stage::One`] | full until the end of backward, then a shard | shard | reduce-scatter, all-gather |
//! | [`Stage::Two`] | one unit at a time, then a shard | shard | reduce-scatter per unit, all-gather |
//! | [`Stage::Three`] | one unit at a time, then a shard | shard | all-gather per unit (forward), again (backward), reduce-scatter per unit |
//!
//! Under stage 3 the compute copy of the parameters is sharded too (trainable and frozen alike):
//! a unit's whole parameters exist only from the all-gather just before it runs to the end of
//! its forward, and again for its recompute + backward. The loss unit is gathered once for both.
//!
//! [`llama`] (feature `llama`, default): the Llama of `kiln-models` as [`Units`], the one
//! adapter the trainer, the benches and the tests share.
//!
//! [`checkpoint`]: sharded checkpoints (one safetensors file per rank + `manifest.json` with
//! CRC-32s, atomic rename, `latest` pointer) that load into any world size or stage, and
//! [`read_full_checkpoint`] to export without ranks.
//!
//! Each unit's trainable parameters form one flat buffer ([`UnitLayout`]), padded to a multiple
//! of N; rank r owns `[r·S, (r+1)·S)`. [`estimate`] gives the per-rank model-state memory of
//! every stage (stage 3 included) from the formula; [`Engine::memory`] measures it.
//!
//! Choices worth knowing:
//! - Each rank's loss is the *sum* over its tokens divided by the global token count (all-reduced
//!   before backward), and gradients are reduced with `Sum`: N ranks on slices of a batch, with or
//!   without micro-batches, train like one rank on the whole batch.
//! - Gradients are accumulated in f32 and cross ranks in `policy.reduce` (f32 by default; bf16 or
//!   f16 round each rank's gradient once and halve the reduction's bytes, FSDP's `reduce_dtype`);
//!   parameters are all-gathered in the compute dtype, so with bf16 compute and f32 reduction one
//!   step moves `(4 + 2)·Ψ·(N-1)/N` bytes under stages 1-2 and `2·4·Ψ·(N-1)/N` under DDP.
//! - Gradient accumulation sends nothing before the last micro-batch; until then stage 2 keeps
//!   a full f32 accumulator per unit (like stage 1). With one micro-batch, stage 2 holds at most
//!   one unit's full gradient at a time.
//! - The inf/NaN flag is MAX-reduced over ranks every step, so all ranks skip together.
//! - Stage 3 moves `(2·b·Ψ − b·Ψ_head + 4·Ψ)·(N-1)/N` bytes per step (gather for forward, again
//!   for backward, except the loss unit which is gathered once; reduce-scatter in f32), and
//!   reduce-scatters every micro-batch, so no full gradient outlives a unit's backward even with
//!   accumulation. It does not prefetch the next unit (the estimator can count a prefetch).
//! - Stage 3 keeps no compute copy of trainable parameters: the fp32 master shard is cast to
//!   the compute dtype just before each all-gather (FSDP's choice), so a rank holds
//!   `(4 + K)·Ψ/N` for trainable parameters plus `2·Ψ_frozen/N` for frozen ones.

pub mod checkpoint;
mod engine;
mod error;
mod estimate;
mod layout;
#[cfg(feature = "llama")]
pub mod llama;
mod pass;
mod plan;
mod shard;
mod sync;
mod units;

pub use checkpoint::{
    CheckpointReader, Manifest, latest_checkpoint, manifest_text, read_full_checkpoint,
    read_manifest,
};
pub use engine::{Engine, MemoryReport, StepReport};
pub use error::{Result, ZeroError};
pub use estimate::{
    ActivationShape, Estimate, activation_bytes, estimate, estimate_table, estimate_table_with,
    gathered_bytes,
};
pub use layout::{DECAY, NO_DECAY, UnitLayout, group_of};
pub use plan::{GradSync, Plan, Stage, ZeroConfig};
pub use units::{
    Units, load_params, named_grads, named_params, named_params_where, release_params,
};
