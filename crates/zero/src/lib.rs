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
//!
//! Each unit's trainable parameters form one flat buffer ([`UnitLayout`]), padded to a multiple
//! of N; rank r owns `[r·S, (r+1)·S)`. [`estimate`] gives the per-rank model-state memory of
//! every stage (stage 3 included) from the formula; [`Engine::memory`] measures it.

mod engine;
mod error;
mod estimate;
mod layout;
mod units;

pub use engine::{Engine, MemoryReport, Stage, StepReport, ZeroConfig};
pub use error::{Result, ZeroError};
pub use estimate::{Estimate, estimate};
pub use layout::UnitLayout;
pub use units::{Units, load_params, named_grads, named_params};
