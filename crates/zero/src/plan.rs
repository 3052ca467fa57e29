//! The ZeRO stage and the one place that turns it into a plan: what is sharded, which collective
//! follows a unit's backward, whether units are gathered before they run.

use kiln_precision::{AdamWConfig, ParamGroup, Policy};

/// What each rank keeps (DESIGN.md, ZeRO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    /// Stage 0: full gradients, master weights and optimizer state on every rank.
    Ddp,
    /// Stage 1: optimizer state and master weights sharded.
    One,
    /// Stage 2: gradients sharded too, reduce-scattered unit by unit during backward.
    Two,
    /// Stage 3 (FSDP): parameters sharded too; each unit is all-gathered just before its
    /// forward and again for its backward, and released right after.
    Three,
}

impl Stage {
    /// Whether master weights and optimizer state are sharded.
    pub fn shards_optimizer(self) -> bool {
        self.plan(None).shard_optimizer
    }

    /// Whether the compute copy of the parameters is sharded (stage 3).
    pub fn shards_params(self) -> bool {
        self.plan(None).shard_params
    }

    /// What the stage means for a rank, with activation recompute as asked (`None`: the
    /// stage's default). The only place that looks at the stage: the engine and its checkpoints
    /// read the plan.
    pub fn plan(self, recompute: Option<bool>) -> Plan {
        let (shard_optimizer, shard_params, grad_sync) = match self {
            Stage::Ddp => (false, false, GradSync::AllReduce),
            Stage::One => (true, false, GradSync::ReduceScatterAtStepEnd),
            Stage::Two => (true, false, GradSync::ReduceScatterAfterLastMicroBatch),
            Stage::Three => (true, true, GradSync::ReduceScatterEachMicroBatch),
        };
        Plan {
            shard_optimizer,
            shard_params,
            grad_sync,
            // Stage 3 gathers a unit for its backward anyway: recomputing it costs FLOPs only.
            recompute: recompute.unwrap_or(shard_params),
        }
    }
}

/// Where a unit's gradients go once its backward is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSync {
    /// DDP: added into the full f32 gradient of the master, all-reduced after the last
    /// micro-batch.
    AllReduce,
    /// Stage 1: added into a full f32 accumulator per unit, every unit reduce-scattered into
    /// its shard once the whole backward of the step is done.
    ReduceScatterAtStepEnd,
    /// Stage 2: accumulated across micro-batches, reduce-scattered right after the unit's
    /// backward of the last micro-batch.
    ReduceScatterAfterLastMicroBatch,
    /// Stage 3: reduce-scattered after the unit's backward of every micro-batch and added to
    /// the shard, so no full gradient outlives a unit's backward.
    ReduceScatterEachMicroBatch,
}

/// A stage turned into what a rank does (see [`Stage::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The fp32 master weights, their AdamW state and the gradients they step from are sharded
    /// (stages 1-3).
    pub shard_optimizer: bool,
    /// The compute copy of every parameter, frozen ones included, is sharded: a unit is
    /// all-gathered just before it runs and released after (stage 3).
    pub shard_params: bool,
    /// The collective that follows a unit's backward.
    pub grad_sync: GradSync,
    /// Activation recompute (see [`ZeroConfig::recompute`]).
    pub recompute: bool,
}

/// Training configuration of the engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroConfig {
    pub stage: Stage,
    /// Compute dtype (f32, bf16 or f16); master weights are f32. `policy.reduce` is the dtype
    /// gradients cross ranks in: f32 (the default), or bf16 / f16 to halve the reduction's
    /// traffic (FSDP's `reduce_dtype`): each rank's f32 gradient is rounded once to it, summed in
    /// f32 by the communicator, rounded once more and widened into the f32 shard.
    pub policy: Policy,
    pub adamw: AdamWConfig,
    /// Learning rate and weight decay; the decay applies to matrices only (ndim >= 2), norm
    /// gains and biases get none (see [`crate::layout::group_of`]).
    pub group: ParamGroup,
    /// Clip gradients to this global L2 norm (after unscaling), torch's `clip_grad_norm_`.
    pub max_grad_norm: Option<f32>,
    /// Activation recompute: keep only each unit's input during the forward and re-run the unit
    /// in its backward (a third more FLOPs for a fraction of the activation memory). `None`: the
    /// stage's default, on at stage 3 only. Without recompute each unit keeps its autodiff graph
    /// from the forward to its backward, as torch does; at stage 3 that graph holds the unit's
    /// gathered parameters, so they stay gathered until the unit's backward instead of being
    /// gathered twice.
    pub recompute: Option<bool>,
}

impl ZeroConfig {
    /// Whether activations are recomputed (see [`ZeroConfig::recompute`]).
    pub fn recomputes(&self) -> bool {
        self.plan().recompute
    }

    /// The stage's [`Plan`] with this config's recompute.
    pub fn plan(&self) -> Plan {
        self.stage.plan(self.recompute)
    }
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Two,
            policy: Policy::default(),
            adamw: AdamWConfig::default(),
            group: ParamGroup::default(),
            max_grad_norm: None,
            recompute: None,
        }
    }
}
