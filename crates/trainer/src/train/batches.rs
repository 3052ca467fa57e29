//! A step's rows as model input: micro-batches, with the LoRA dropout of the step.

use burn::tensor::{DType, Device};
use kiln_models::{AdapterDropout, LlamaConfig, SplitMix64};
use kiln_zero::llama::Batch;

use crate::data::{Example, collate, micro_batches};
use crate::{Result, TrainerError};

/// The LoRA dropout of optimizer step `step` (`None` when `p` is 0), for the rows of the
/// step's global batch from `first_row` on. The seed is a function of the run's seed and the
/// step, so a resumed run drops what the uninterrupted run dropped.
pub fn step_dropout(
    p: f64,
    seed: u64,
    step: u64,
    first_row: usize,
) -> Result<Option<AdapterDropout>> {
    if p == 0.0 {
        return Ok(None);
    }
    let seed = SplitMix64::at(seed ^ 0x0064_726f_706f_7574, step);
    let dropout = AdapterDropout::new(p, seed, first_row as u64)
        .map_err(|e| TrainerError::invalid("lora.dropout", e.to_string()))?;
    Ok(Some(dropout))
}

/// This rank's rows cut into micro-batches of `micro` rows, as model input; with `dropout`
/// (training with LoRA dropout, `first_row` = this rank's first row) every micro-batch draws the
/// masks of its own rows.
pub fn batches(
    model_config: &LlamaConfig,
    rows: &[Example],
    micro: usize,
    device: &Device,
    dtype: DType,
    dropout: Option<AdapterDropout>,
) -> Result<Vec<Batch>> {
    let mut dropout = dropout;
    micro_batches(rows, micro)?
        .into_iter()
        .map(|rows| {
            let batch = batch_of(model_config, rows, device, dtype, dropout);
            dropout = dropout.map(|d| d.skip_rows(rows.len() as u64));
            batch
        })
        .collect()
}

/// One micro-batch of `rows` (equal lengths), with adapter dropout from its first row on.
pub fn batch_of(
    model_config: &LlamaConfig,
    rows: &[Example],
    device: &Device,
    dtype: DType,
    dropout: Option<AdapterDropout>,
) -> Result<Batch> {
    let mut batch = model_batch(model_config, collate(rows)?, device, dtype)?;
    if let Some(d) = dropout {
        batch.ctx = batch.ctx.with_adapter_dropout(d);
    }
    Ok(batch)
}

/// The model input of collated rows: packed rows ([`crate::data::Example`]) get the context of
/// their segments and positions (attention within an example, positions restarting).
pub fn model_batch(
    config: &LlamaConfig,
    rows: crate::data::Batch,
    device: &Device,
    dtype: DType,
) -> Result<Batch> {
    let crate::data::Batch {
        ids,
        labels,
        segments,
        positions,
        batch,
        seq_len,
    } = rows;
    Ok(match (segments, positions) {
        (Some(segments), Some(positions)) => Batch::packed(
            config,
            ids,
            labels,
            &segments,
            &positions,
            (batch, seq_len),
            device,
            dtype,
        )?,
        _ => Batch::new(config, ids, labels, seq_len, device, dtype)?,
    })
}
