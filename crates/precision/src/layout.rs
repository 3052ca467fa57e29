//! The flat layout of trainable parameters ([`FlatLayout`], by HF path in visit order) and a
//! rank's contiguous part of it ([`Shard`]).

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{PrecisionError, Result};

/// One parameter's place in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlatEntry {
    /// HF path, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub path: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements (product of `shape`).
    pub numel: usize,
    /// Index of its [`ParamGroup`].
    pub group: usize,
}

impl FlatEntry {
    /// `[offset, offset + numel)`.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// The trainable parameters concatenated in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    entries: Vec<FlatEntry>,
    index: HashMap<String, usize>,
    numel: usize,
}

impl FlatLayout {
    /// Lays out `(path, shape, group)` in the given order.
    pub fn new(params: impl IntoIterator<Item = (String, Vec<usize>, usize)>) -> Result<Self> {
        let mut entries = Vec::new();
        let mut index = HashMap::new();
        let mut offset = 0;
        for (path, shape, group) in params {
            if index.insert(path.clone(), entries.len()).is_some() {
                return Err(PrecisionError::DuplicateParam(path));
            }
            let numel = shape.iter().product();
            entries.push(FlatEntry {
                path,
                shape,
                offset,
                numel,
                group,
            });
            offset += numel;
        }
        Ok(Self {
            entries,
            index,
            numel: offset,
        })
    }

    /// Entries in flat order.
    pub fn entries(&self) -> &[FlatEntry] {
        &self.entries
    }

    /// The entry of a path.
    pub fn get(&self, path: &str) -> Option<&FlatEntry> {
        self.index.get(path).map(|&i| &self.entries[i])
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// `numel` rounded up to a multiple of `world` (ZeRO pads the flat buffer so shards are equal).
    pub fn padded_numel(&self, world: usize) -> usize {
        let w = world.max(1);
        self.numel.div_ceil(w) * w
    }

    /// Rank `rank`'s equal shard of the padded buffer: `[rank·S, (rank+1)·S)`, `S = padded/world`.
    pub fn shard(&self, rank: usize, world: usize) -> Result<Shard> {
        if world == 0 || rank >= world {
            return Err(PrecisionError::Config {
                field: "rank",
                msg: format!("rank {rank} is not in a world of {world}"),
            });
        }
        let len = self.padded_numel(world) / world;
        Ok(Shard {
            offset: rank * len,
            len,
        })
    }
}

/// A contiguous range `[offset, offset + len)` of the flat buffer. Elements past
/// [`FlatLayout::numel`] are padding: they stay zero and belong to no parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// First element owned.
    pub offset: usize,
    /// Number of elements owned.
    pub len: usize,
}

impl Shard {
    /// The whole buffer of a layout.
    pub fn full(layout: &FlatLayout) -> Self {
        Self {
            offset: 0,
            len: layout.numel(),
        }
    }

    /// `[offset, offset + len)`.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}
