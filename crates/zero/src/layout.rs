//! One flat buffer per unit: its trainable parameters concatenated, padded to a multiple of N.

use burn::tensor::TensorData;
use kiln_precision::{FlatLayout, Shard};

use crate::error::Result;

/// The flat layout of one unit and this rank's shard of it.
///
/// Trainable parameters of the unit are concatenated in the order the unit lists them (the same
/// on every rank); frozen ones are left out. The buffer is padded to `padded = ceil(numel/N)·N`
/// and rank r owns `[r·S, (r+1)·S)` with `S = padded / N`; under DDP the rank "owns" it all.
#[derive(Debug, Clone)]
pub struct UnitLayout {
    /// Trainable parameters in flat order.
    pub flat: FlatLayout,
    /// Elements in the padded buffer.
    pub padded: usize,
    /// This rank's part.
    pub shard: Shard,
}

impl UnitLayout {
    /// Lays out the trainable parameters of `params` for `rank` of `world`; `sharded` is false
    /// for DDP (the rank holds the whole unpadded buffer).
    pub fn new(
        params: &[(String, TensorData)],
        trainable: &dyn Fn(&str) -> bool,
        rank: usize,
        world: usize,
        sharded: bool,
    ) -> Result<Self> {
        let flat = FlatLayout::new(
            params
                .iter()
                .filter(|(p, _)| trainable(p))
                .map(|(p, d)| (p.clone(), d.shape().as_slice().to_vec(), 0)),
        )?;
        let (padded, shard) = if sharded {
            (flat.padded_numel(world), flat.shard(rank, world)?)
        } else {
            (flat.numel(), Shard::full(&flat))
        };
        Ok(Self {
            flat,
            padded,
            shard,
        })
    }
}
