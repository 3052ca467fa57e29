//! The header every collective carries, and the cross-rank consistency check.

use crate::element::{DType, ReduceOp};
use crate::error::DistError;
use crate::shard::shard_of;
use serde::Serialize;
use std::fmt;

/// The collectives, named as in NCCL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Collective {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl Collective {
    pub(crate) fn code(self) -> u64 {
        match self {
            Collective::AllReduce => 1,
            Collective::ReduceScatter => 2,
            Collective::AllGather => 3,
            Collective::Broadcast => 4,
            Collective::Barrier => 5,
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            1 => Collective::AllReduce,
            2 => Collective::ReduceScatter,
            3 => Collective::AllGather,
            4 => Collective::Broadcast,
            5 => Collective::Barrier,
            _ => return None,
        })
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Collective::AllReduce => "all_reduce",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::AllGather => "all_gather",
            Collective::Broadcast => "broadcast",
            Collective::Barrier => "barrier",
        })
    }
}

/// What one rank asked for: exchanged (or shared) before any payload moves.
///
/// `len` is the full buffer length (for all_gather: the gathered length), `part` the length this
/// rank passed in or out on its side of the shard layout (its shard for reduce_scatter output and
/// all_gather input, `len` otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub seq: u64,
    pub op: Collective,
    pub dtype: Option<DType>,
    pub reduce: Option<ReduceOp>,
    pub len: usize,
    pub part: usize,
    pub root: usize,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl Call {
    pub const WORDS: usize = 7;

    pub fn encode(&self) -> [u64; Self::WORDS] {
        [
            self.seq,
            self.op.code(),
            self.dtype.map_or(0, DType::code),
            self.reduce.map_or(0, ReduceOp::code),
            self.len as u64,
            self.part as u64,
            self.root as u64,
        ]
    }

    /// `None` for words that no rank of this crate writes.
    pub fn decode(w: &[u64]) -> Option<Call> {
        if w.len() != Self::WORDS {
            return None;
        }
        Some(Call {
            seq: w[0],
            op: Collective::from_code(w[1])?,
            dtype: if w[2] == 0 {
                None
            } else {
                Some(DType::from_code(w[2])?)
            },
            reduce: if w[3] == 0 {
                None
            } else {
                Some(ReduceOp::from_code(w[3])?)
            },
            len: usize::try_from(w[4]).ok()?,
            part: usize::try_from(w[5]).ok()?,
            root: usize::try_from(w[6]).ok()?,
        })
    }

    /// Bytes of the full buffer.
    pub fn bytes(&self) -> u64 {
        (self.len * self.dtype.map_or(0, DType::size)) as u64
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} #{}", self.op, self.seq)?;
        if self.op == Collective::Barrier {
            return Ok(());
        }
        write!(f, " (len {}", self.len)?;
        if let Some(d) = self.dtype {
            write!(f, ", {d}")?;
        }
        if let Some(r) = self.reduce {
            write!(f, ", {r}")?;
        }
        match self.op {
            Collective::AllGather => write!(f, ", shard {}", self.part)?,
            Collective::Broadcast => write!(f, ", root {}", self.root)?,
            _ => {}
        }
        f.write_str(")")
    }
}

/// Checks that all ranks issued the same collective with consistent arguments.
///
/// Every rank runs this on the same headers and so reaches the same verdict; the error lists
/// what each rank asked for.
pub(crate) fn validate(calls: &[Call]) -> Result<(), DistError> {
    let world = calls.len();
    let Some(first) = calls.first() else {
        return Ok(());
    };
    let same = calls.iter().all(|c| {
        (c.seq, c.op, c.dtype, c.reduce, c.len, c.root)
            == (
                first.seq,
                first.op,
                first.dtype,
                first.reduce,
                first.len,
                first.root,
            )
    });
    if !same {
        return Err(DistError::Mismatch {
            seq: first.seq,
            detail: grouped(calls),
        });
    }
    if first.op == Collective::Broadcast && first.root >= world {
        return Err(DistError::Mismatch {
            seq: first.seq,
            detail: format!(
                "broadcast root {} is not a rank of a world of {world}",
                first.root
            ),
        });
    }
    if matches!(first.op, Collective::AllGather | Collective::ReduceScatter) {
        let bad: Vec<String> = calls
            .iter()
            .enumerate()
            .filter(|(r, c)| c.part != shard_of(c.len, *r, world).len)
            .map(|(r, c)| {
                format!(
                    "rank {r} passed a shard of {} elements, its shard of {} is {} (shard_of)",
                    c.part,
                    c.len,
                    shard_of(c.len, r, world).len
                )
            })
            .collect();
        if !bad.is_empty() {
            return Err(DistError::Mismatch {
                seq: first.seq,
                detail: format!("{}: {}", first, bad.join(", ")),
            });
        }
    }
    Ok(())
}

/// What each rank called, ranks with the same call grouped into ranges (`ranks 0-127 called
/// all_reduce #5 (...); ranks 128-255 called all_gather #5 (...)`), so the message of a
/// 256-rank job stays one readable line; at most 8 distinct calls are listed.
fn grouped(calls: &[Call]) -> String {
    const SHOWN: usize = 8;
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (r, c) in calls.iter().enumerate() {
        let text = c.to_string();
        match groups.iter_mut().find(|(t, _)| *t == text) {
            Some((_, ranks)) => ranks.push(r),
            None => groups.push((text, vec![r])),
        }
    }
    let mut parts: Vec<String> = groups
        .iter()
        .take(SHOWN)
        .map(|(text, ranks)| {
            let label = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{label} {} called {text}", rank_list(ranks))
        })
        .collect();
    if groups.len() > SHOWN {
        parts.push(format!("and {} other calls", groups.len() - SHOWN));
    }
    parts.join("; ")
}

/// `[0, 1, 2, 5, 7, 8]` as `0-2, 5, 7-8`.
pub fn rank_list(ranks: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        out.push(match j > i {
            true => format!("{}-{}", ranks[i], ranks[j]),
            false => ranks[i].to_string(),
        });
        i = j + 1;
    }
    out.join(", ")
}

/// The call of a barrier with sequence number `seq`.
pub(crate) fn barrier_call(seq: u64) -> Call {
    Call {
        seq,
        op: Collective::Barrier,
        dtype: None,
        reduce: None,
        len: 0,
        part: 0,
        root: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_on_many_ranks_is_grouped_into_rank_list() {
        let mut calls = vec![call(Collective::AllReduce, 1); 256];
        for c in &mut calls[128..] {
            *c = call(Collective::AllGather, 8);
        }
        calls[200] = call(Collective::Barrier, 0);
        let e = validate(&calls).unwrap_err().to_string();
        assert!(e.len() < 300, "{} bytes: {e}", e.len());
        assert!(e.contains("ranks 0-127 called all_reduce #3"), "{e}");
        assert!(
            e.contains("ranks 128-199, 201-255 called all_gather #3"),
            "{e}"
        );
        assert!(e.contains("rank 200 called barrier #3"), "{e}");
        assert_eq!(rank_list(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
    }

    fn call(op: Collective, len: usize) -> Call {
        Call {
            seq: 3,
            op,
            dtype: Some(DType::F32),
            reduce: None,
            len,
            part: len,
            root: 0,
        }
    }

    #[test]
    fn header_round_trips_through_words() {
        let c = Call {
            reduce: Some(ReduceOp::Max),
            dtype: Some(DType::BF16),
            ..call(Collective::ReduceScatter, 17)
        };
        assert_eq!(Call::decode(&c.encode()), Some(c));
    }

    #[test]
    fn mismatch_names_each_rank_and_its_call() {
        let e = validate(&[
            call(Collective::AllGather, 4),
            call(Collective::ReduceScatter, 4),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 0 called all_gather #3"), "{e}");
        assert!(e.contains("rank 1 called reduce_scatter #3"), "{e}");
    }
}
