//! One row ([`Example`]) with its masked labels, and rows stacked for a model call ([`collate`]).

use serde::{Deserialize, Serialize};

pub use kiln_models::IGNORE_INDEX;

use super::tokenizer::Tokenizer;
use crate::error::{Result, TrainerError};

/// One row: `ids` and `labels`, both `seq_len` long (see the module docs for the convention).
///
/// A packed row ([`super::packing`]) holds several examples and says where each is:
/// `segments` numbers them 1, 2, ... (0 for padding) and `positions` restarts at 0 with each,
/// so attention stays inside an example and each sees the positions it would see alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Vec<i64>>,
}

impl Example {
    /// A row of one example (no packing).
    pub fn new(ids: Vec<i64>, labels: Vec<i64>) -> Self {
        Self {
            ids,
            labels,
            segments: None,
            positions: None,
        }
    }

    /// `[BOS] prompt response EOS`, labels masking BOS and the prompt, truncated to `seq_len`
    /// (keeping the start) and right-padded. Returns whether it was truncated.
    pub fn supervised(
        prompt: &[i64],
        response: &[i64],
        tokenizer: &Tokenizer,
        seq_len: usize,
    ) -> (Example, bool) {
        let (mut example, truncated) =
            Self::supervised_unpadded(prompt, response, tokenizer, seq_len);
        example.pad_to(seq_len, tokenizer.pad());
        (example, truncated)
    }

    /// [`supervised`](Self::supervised) without the padding (for packing).
    pub fn supervised_unpadded(
        prompt: &[i64],
        response: &[i64],
        tokenizer: &Tokenizer,
        seq_len: usize,
    ) -> (Example, bool) {
        let n = prompt.len() + response.len() + 2;
        let mut ids = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        if let Some(bos) = tokenizer.bos() {
            ids.push(bos);
            labels.push(IGNORE_INDEX);
        }
        ids.extend_from_slice(prompt);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, prompt.len()));
        ids.extend_from_slice(response);
        labels.extend_from_slice(response);
        ids.push(tokenizer.eos());
        labels.push(tokenizer.eos());
        let truncated = ids.len() > seq_len;
        ids.truncate(seq_len);
        labels.truncate(seq_len);
        (Example::new(ids, labels), truncated)
    }

    /// Right-pads to `seq_len` with `pad` (labels [`IGNORE_INDEX`]; segment 0, position 0).
    pub fn pad_to(&mut self, seq_len: usize, pad: i64) {
        self.ids.resize(seq_len, pad);
        self.labels.resize(seq_len, IGNORE_INDEX);
        if let Some(s) = self.segments.as_mut() {
            s.resize(seq_len, 0);
        }
        if let Some(p) = self.positions.as_mut() {
            p.resize(seq_len, 0);
        }
    }

    /// Tokens that count in the loss: positions `t >= 1` with `labels[t] != -100`.
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Rows stacked for a model call: `ids` and `labels` flattened row-major, `[batch, seq_len]`;
/// for packed rows also their `segments` and `positions` (same layout, see [`Example`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub segments: Option<Vec<u32>>,
    pub positions: Option<Vec<i64>>,
    pub batch: usize,
    pub seq_len: usize,
}

/// Stacks rows of equal length into a [`Batch`] (for `Tensor::<2, Int>::from_data`). Rows are
/// all packed or all not.
pub fn collate(rows: &[Example]) -> Result<Batch> {
    let seq_len = rows.first().map_or(0, |r| r.ids.len());
    let packed = rows.first().is_some_and(|r| r.segments.is_some());
    let mut ids = Vec::with_capacity(rows.len() * seq_len);
    let mut labels = Vec::with_capacity(rows.len() * seq_len);
    let (mut segments, mut positions) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        if r.ids.len() != seq_len || r.labels.len() != seq_len {
            return Err(TrainerError::Argument(format!(
                "collate: row {i} has {} ids and {} labels, row 0 has {seq_len}",
                r.ids.len(),
                r.labels.len()
            )));
        }
        ids.extend_from_slice(&r.ids);
        labels.extend_from_slice(&r.labels);
        match (packed, &r.segments, &r.positions) {
            (false, None, None) => {}
            (true, Some(s), Some(p)) if s.len() == seq_len && p.len() == seq_len => {
                segments.extend_from_slice(s);
                positions.extend_from_slice(p);
            }
            _ => {
                return Err(TrainerError::Argument(format!(
                    "collate: row {i} is {}packed like row 0, or its segments and positions \
                     are not {seq_len} long",
                    if packed { "not " } else { "" }
                )));
            }
        }
    }
    Ok(Batch {
        ids,
        labels,
        segments: packed.then_some(segments),
        positions: packed.then_some(positions),
        batch: rows.len(),
        seq_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_stacks_rows() {
        let rows: Vec<Example> = (0..3)
            .map(|i| {
                let ids: Vec<i64> = (0..12).map(|t| 100 * i + t).collect();
                Example::new(ids.clone(), ids)
            })
            .collect();
        let batch = collate(&rows).unwrap();
        assert_eq!((batch.batch, batch.seq_len), (3, 12));
        assert_eq!(&batch.ids[12..24], &rows[1].ids[..]);
        let mut bad = rows.clone();
        bad[2].ids.pop();
        assert!(collate(&bad).unwrap_err().to_string().contains("row 2"));
    }
}
