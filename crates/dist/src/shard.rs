//! The shard layout shared by reduce_scatter, all_gather and ZeRO.

use serde::Serialize;

/// One rank's contiguous slice `[offset, offset + len)` of a flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ShardInfo {
    pub offset: usize,
    pub len: usize,
}

impl ShardInfo {
    /// The index range of the shard.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Shard size `S = ceil(len / world)`: the per-rank stride of the layout.
pub fn shard_size(len: usize, world: usize) -> usize {
    if world == 0 { 0 } else { len.div_ceil(world) }
}

/// The shard of `rank` in a flat buffer of `len` elements split over `world` ranks.
///
/// With `S = ceil(len / world)`, rank `r` owns `[r·S, min((r+1)·S, len))`: every shard but the
/// last non-empty one has exactly `S` elements, trailing shards may be shorter or empty
/// (`len = 5, world = 4` gives 2, 2, 1, 0). When `len` is padded to a multiple of `world`
/// (the ZeRO layout) all shards have `S = len / world` elements.
///
/// # Examples
/// ```
/// use kiln_dist::{shard_of, ShardInfo};
/// assert_eq!(shard_of(10, 2, 4), ShardInfo { offset: 6, len: 3 });
/// assert_eq!(shard_of(10, 3, 4), ShardInfo { offset: 9, len: 1 });
/// assert_eq!(shard_of(5, 3, 4), ShardInfo { offset: 5, len: 0 });
/// ```
pub fn shard_of(len: usize, rank: usize, world: usize) -> ShardInfo {
    let s = shard_size(len, world);
    let offset = rank.saturating_mul(s).min(len);
    let end = rank.saturating_add(1).saturating_mul(s).min(len);
    ShardInfo {
        offset,
        len: end - offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_buffer_in_rank_order() {
        for world in 1..=9 {
            for len in 0..40 {
                let mut next = 0;
                for rank in 0..world {
                    let s = shard_of(len, rank, world);
                    assert_eq!(s.offset, next, "len {len} world {world} rank {rank}");
                    assert!(s.len <= shard_size(len, world));
                    next = s.offset + s.len;
                }
                assert_eq!(next, len);
            }
        }
    }
}
