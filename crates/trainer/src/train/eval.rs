//! Evaluation: the held-out loss over all ranks and, for addition, exact match by generation.

use burn::tensor::Device;
use kiln_models::{GenerateConfig, Llama, LlamaConfig, generate};
use kiln_zero::Engine;
use kiln_zero::llama::LlamaUnits;
use serde::{Deserialize, Serialize};

use super::batches::batch_of;
use super::build::{lora_config, model_from_params, policy_of};
use crate::Result;
use crate::config::TrainConfig;
use crate::data::{AdditionTask, Dataset, micro_batches, rank_slice};

/// Held-out results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub loss: f32,
    pub perplexity: f32,
    /// Exact-match accuracy by greedy generation (tasks that have it).
    pub accuracy: Option<f32>,
    /// A few (prompt, completion) samples.
    pub samples: Vec<(String, String)>,
}

/// Held-out loss over all ranks and, on rank 0, exact-match accuracy by greedy generation
/// (addition). A collective: every rank calls it. Returns `Some` on rank 0.
pub(super) fn evaluate(
    engine: &mut Engine<LlamaUnits>,
    dataset: &Dataset,
    model_config: &LlamaConfig,
    config: &TrainConfig,
    step: u64,
    device: &Device,
    with_samples: bool,
) -> Result<Option<EvalResult>> {
    let (rank, world) = (engine.comm().rank(), engine.comm().world_size());
    let policy = policy_of(&config.precision);
    let rows = rank_slice(dataset.eval(), rank, world)?;
    let micro = config.train.micro_batch.max(1);
    let chunks = micro_batches(rows, micro)?;
    // A rank whose slice of the held-out rows is empty still joins every collective
    // (`Engine::evaluate` runs the most batches any rank has).
    let (sum, tokens) = engine.evaluate(chunks.len(), |i| {
        batch_of(model_config, chunks[i], device, policy.compute, None)
            .map_err(|e| kiln_zero::ZeroError::Model(e.to_string()))
    })?;
    if tokens == 0 {
        // No held-out token on any rank (every rank sees the same total): no loss to report,
        // rather than a loss of 0 and a perplexity of 1.
        return Ok(None);
    }
    let loss = (sum / tokens as f64) as f32;
    // Generation needs the whole model on one rank: every rank joins the gather (a collective;
    // the task is the same on all of them), rank 0 generates. Tasks without it gather nothing.
    let task = dataset.addition();
    let params = match task {
        Some(_) => engine.full_params()?,
        None => Vec::new(),
    };
    if rank != 0 {
        return Ok(None);
    }
    let mut accuracy = None;
    let mut samples = vec![];
    if let Some(task) = task {
        let lora = lora_config(config)?;
        let device = device.clone().without_autodiff();
        let model =
            model_from_params(model_config, lora.as_ref(), params, &device, policy.compute)?;
        let (acc, s) =
            addition_accuracy(&model, &device, model_config, task, dataset, with_samples)?;
        accuracy = Some(acc);
        samples = s;
    }
    Ok(Some(EvalResult {
        step,
        loss,
        perplexity: loss.exp(),
        accuracy,
        samples,
    }))
}

/// Greedy exact-match accuracy on the held-out addition pairs, and a few samples.
pub fn addition_accuracy(
    model: &Llama,
    device: &Device,
    model_config: &LlamaConfig,
    task: &AdditionTask,
    dataset: &Dataset,
    with_samples: bool,
) -> Result<(f32, Vec<(String, String)>)> {
    let tok = dataset.tokenizer();
    let pairs = dataset.eval_pairs();
    let digits = task.answer(0, 0).len();
    let settings = GenerateConfig {
        max_new_tokens: digits + 1,
        greedy: true,
        eos_token_id: Some(tok.eos()),
        ..Default::default()
    };
    let mut correct = 0usize;
    let mut samples = vec![];
    for chunk in pairs.chunks(64) {
        let prompts = chunk
            .iter()
            .map(|&(a, b)| {
                let mut ids: Vec<i64> = tok.bos().into_iter().collect();
                ids.extend(tok.encode(&task.prompt(a, b))?);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = generate(model, model_config, &prompts, &settings, device)?;
        for (&(a, b), ids) in chunk.iter().zip(out) {
            let ids: Vec<i64> = ids.into_iter().filter(|&t| t != tok.eos()).collect();
            let text = tok.decode(&ids)?;
            let right = task.exact_match(&text, a, b);
            if right {
                correct += 1;
            }
            if with_samples && samples.len() < 5 {
                samples.push((
                    task.prompt(a, b),
                    format!(
                        "{text}   (reads {}; {} {})",
                        AdditionTask::readable(&text),
                        if right { "right:" } else { "wrong, want" },
                        task.result(a, b)
                    ),
                ));
            }
        }
    }
    Ok((correct as f32 / pairs.len().max(1) as f32, samples))
}
