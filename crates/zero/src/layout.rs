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
        let flat = FlatLayout::new(params.iter().filter(|(p, _)| trainable(p)).map(|(p, d)| {
            let shape = d.shape().as_slice().to_vec();
            let group = group_of(&shape);
            (p.clone(), shape, group)
        }))?;
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

/// The AdamW group of a parameter of `shape`: [`DECAY`] for matrices (ndim >= 2: projections,
/// embeddings), [`NO_DECAY`] for vectors (norm gains, biases), the rule of nanoGPT and of Hugging
/// Face's trainer.
pub fn group_of(shape: &[usize]) -> usize {
    if shape.len() >= 2 { DECAY } else { NO_DECAY }
}

/// Index of the weight-decayed parameter group (see [`group_of`]).
pub const DECAY: usize = 0;
/// Index of the parameter group without weight decay.
pub const NO_DECAY: usize = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_equal_tile_the_padded_buffer_and_skip_frozen_params() {
        let params = vec![
            (
                "a.weight".to_string(),
                TensorData::new(vec![0f32; 6], [2, 3]),
            ),
            ("b.weight".to_string(), TensorData::new(vec![0f32; 4], [4])),
            ("c.weight".to_string(), TensorData::new(vec![0f32; 1], [1])),
        ];
        let trainable = |p: &str| p != "b.weight";
        for world in 1..=4 {
            let mut next = 0;
            for rank in 0..world {
                let l = UnitLayout::new(&params, &trainable, rank, world, true).unwrap();
                assert_eq!(l.flat.numel(), 7);
                assert_eq!(l.padded % world, 0);
                assert!(l.padded - l.flat.numel() < world);
                assert_eq!(l.shard.offset, next);
                assert_eq!(l.shard.len, l.padded / world);
                assert!(l.flat.get("b.weight").is_none());
                assert_eq!(l.flat.get("c.weight").unwrap().offset, 6);
                next += l.shard.len;
            }
            let ddp = UnitLayout::new(&params, &trainable, 0, world, false).unwrap();
            assert_eq!((ddp.padded, ddp.shard.len), (7, 7));
        }
    }
}
