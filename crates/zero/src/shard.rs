//! A rank's shard of a unit's parameters in the compute dtype (stage 3), and the all-gather that
//! turns the shards of every rank back into whole parameters.

use burn::tensor::{DType, Element, TensorData};
use half::{bf16, f16};
use kiln_dist::Communicator;
use kiln_precision::{FlatLayout, MasterWeights, Shard};

use crate::error::{Result, ZeroError};

/// `len` values of one dtype: f32, bf16 or f16.
#[derive(Debug, Clone)]
pub(crate) enum ShardBuf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl ShardBuf {
    /// Zeros of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(vec![0.0; len]),
            DType::BF16 => Self::BF16(vec![bf16::ZERO; len]),
            DType::F16 => Self::F16(vec![f16::ZERO; len]),
            other => {
                return Err(ZeroError::Config {
                    field: "policy.compute",
                    msg: format!("{other:?} is not a float compute dtype"),
                });
            }
        })
    }

    pub fn bytes(&self) -> u64 {
        (match self {
            Self::F32(v) => v.len() * 4,
            Self::BF16(v) => v.len() * 2,
            Self::F16(v) => v.len() * 2,
        }) as u64
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::BF16(_) => DType::BF16,
            Self::F16(_) => DType::F16,
        }
    }

    /// The master shard in this buffer's dtype (same length: both cover the padded shard).
    pub fn cast_from_master(&mut self, master: &MasterWeights) -> Result<()> {
        match self {
            Self::F32(v) => v.copy_from_slice(master.params()),
            Self::BF16(v) => master.cast_shard_bf16(v)?,
            Self::F16(v) => master.cast_shard_f16(v)?,
        }
        Ok(())
    }

    /// Copies the part of each whole parameter that falls into `shard` (padding stays zero).
    pub fn fill(
        &mut self,
        layout: &FlatLayout,
        shard: Shard,
        params: &[(String, TensorData)],
    ) -> Result<()> {
        for (path, data) in params {
            let Some(e) = layout.get(path) else {
                continue;
            };
            let (lo, hi) = (
                e.offset.max(shard.offset),
                (e.offset + e.numel).min(shard.offset + shard.len),
            );
            if lo >= hi {
                continue;
            }
            let data = data.clone().convert_dtype(self.dtype());
            let (src, dst) = (
                lo - e.offset..hi - e.offset,
                lo - shard.offset..hi - shard.offset,
            );
            let err = |e| ZeroError::Model(format!("{path}: {e:?}"));
            match self {
                Self::F32(v) => v[dst].copy_from_slice(&data.as_slice::<f32>().map_err(err)?[src]),
                Self::BF16(v) => {
                    v[dst].copy_from_slice(&data.as_slice::<bf16>().map_err(err)?[src])
                }
                Self::F16(v) => v[dst].copy_from_slice(&data.as_slice::<f16>().map_err(err)?[src]),
            }
        }
        Ok(())
    }

    /// Elements `range` as 1-D data in this buffer's dtype.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorData {
        let n = range.len();
        match self {
            Self::F32(v) => TensorData::new(v[range].to_vec(), [n]),
            Self::BF16(v) => TensorData::new(v[range].to_vec(), [n]),
            Self::F16(v) => TensorData::new(v[range].to_vec(), [n]),
        }
    }

    /// All-gathers every rank's shard (`padded` elements in all) and cuts the result into the
    /// layout's parameters.
    pub fn gather(
        &self,
        comm: &Communicator,
        layout: &FlatLayout,
        padded: usize,
    ) -> Result<Vec<(String, TensorData)>> {
        Ok(match self {
            Self::F32(v) => split(&comm.all_gather(v, padded)?, layout),
            Self::BF16(v) => split(&comm.all_gather(v, padded)?, layout),
            Self::F16(v) => split(&comm.all_gather(v, padded)?, layout),
        })
    }
}

/// Cuts a whole flat buffer into the layout's parameters.
pub(crate) fn split<E: Element>(full: &[E], layout: &FlatLayout) -> Vec<(String, TensorData)> {
    layout
        .entries()
        .iter()
        .map(|e| {
            let data = TensorData::new(full[e.range()].to_vec(), e.shape.clone());
            (e.path.clone(), data)
        })
        .collect()
}
