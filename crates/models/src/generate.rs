//! Text generation with the key/value cache: greedy or nucleus (top-p) sampling, per-row EOS.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use crate::rng::SplitMix64;

/// How [`generate`] picks tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// The most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Logits are divided by this before the softmax; finite and above 0 when sampling.
    pub temperature: f64,
    /// Nucleus sampling keeps the smallest set of most likely tokens whose probability sums to at
    /// least `top_p`; in `(0, 1]` when sampling (1 keeps every token).
    pub top_p: f64,
    /// Seeds the sampler: the same seed, model and prompts give the same tokens.
    pub seed: u64,
    /// A row stops after producing this token (which is returned).
    pub eos_token_id: Option<i64>,
    /// Argmax instead of sampling (`temperature`, `top_p` and `seed` are then unused).
    pub greedy: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: None,
            greedy: true,
        }
    }
}

impl GenerateConfig {
    /// Checks the values; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.greedy {
            return Ok(());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad(
                "temperature",
                format!("{} must be a finite number above 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", format!("{} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> ModelError {
    ModelError::Generate {
        field,
        reason: reason.into(),
    }
}

/// Generates up to `settings.max_new_tokens` tokens after each prompt and returns them (without the
/// prompt; a row that produced `eos_token_id` ends with it). The prompts run as one left-padded
/// batch: one cached prefill, then one-token steps with [`Llama::forward_cached`], until every
/// row has stopped.
pub fn generate(
    model: &Llama,
    config: &LlamaConfig,
    prompts: &[Vec<i64>],
    settings: &GenerateConfig,
    device: &Device,
) -> Result<Vec<Vec<i64>>> {
    settings.validate()?;
    if prompts.is_empty() {
        return Err(bad("prompts", "no prompts"));
    }
    let vocab = config.vocab_size as i64;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(bad("prompts", format!("prompt {i} is empty")));
        }
        if let Some(t) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(bad(
                "prompts",
                format!("prompt {i} has token {t}, outside the vocabulary 0..{vocab}"),
            ));
        }
    }
    // Positions past max_position_embeddings are outside what the model was trained on (and
    // a long prompt's prefill is quadratic in memory): checked before anything is allocated.
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = config.max_position_embeddings;
    if width > limit {
        return Err(bad(
            "prompts",
            format!(
                "a prompt of {width} tokens is longer than the model's max_position_embeddings {limit}"
            ),
        ));
    }
    if settings.max_new_tokens > limit - width {
        return Err(bad(
            "max_new_tokens",
            format!(
                "{} new tokens after a prompt of {width} pass the model's max_position_embeddings {limit} (at most {} fit)",
                settings.max_new_tokens,
                limit - width
            ),
        ));
    }
    let batch = prompts.len();
    let mut out = vec![Vec::with_capacity(settings.max_new_tokens); batch];
    if settings.max_new_tokens == 0 {
        return Ok(out);
    }

    let pad = settings.eos_token_id.unwrap_or(0).clamp(0, vocab - 1);
    let (mut ids, mut mask) = (Vec::with_capacity(batch * width), Vec::new());
    for p in prompts {
        let padding = width - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1, p.len())));
    }
    let padded = mask.contains(&0);
    let mut cache = KvCache::new(config, batch);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, width]), device);
    let mut logits = model.forward_cached(ids, padded.then_some(mask.as_slice()), &mut cache)?;
    let mut rng = SplitMix64::new(settings.seed);
    let mut done = vec![false; batch];
    for step in 0..settings.max_new_tokens {
        let [_, seq, v] = logits.dims();
        let last = logits.narrow(1, seq - 1, 1).reshape([batch, v]);
        let rows = last
            .cast(DType::F32)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::Input(format!("logits: {e:?}")))?;
        let mut next = Vec::with_capacity(batch);
        for (b, row) in rows.chunks(v).enumerate() {
            let token = match settings.greedy {
                true => argmax(row),
                false => sample_top_p(row, settings.temperature, settings.top_p, &mut rng),
            } as i64;
            if !done[b] {
                out[b].push(token);
                done[b] = settings.eos_token_id == Some(token);
            }
            next.push(token);
        }
        if step + 1 == settings.max_new_tokens || done.iter().all(|&d| d) {
            break;
        }
        // Rows that stopped keep decoding; their tokens are dropped.
        let ids = Tensor::<2, Int>::from_data(TensorData::new(next, [batch, 1]), device);
        logits = model.forward_cached(ids, None, &mut cache)?;
    }
    Ok(out)
}

/// The index of the largest value (the first one on ties); NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Samples from `softmax(logits / temperature)` restricted to the nucleus: the smallest set of
/// most likely tokens whose probability sums to at least `top_p`, renormalised.
pub fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let probs: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Most likely first; ties by index, so the nucleus of a tiny top_p is the argmax.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut kept = 0.0;
    let mut nucleus = 0;
    for &i in &order {
        kept += probs[i] / total;
        nucleus += 1;
        if kept >= top_p {
            break;
        }
    }
    let order = &order[..nucleus];
    let mass: f64 = order.iter().map(|&i| probs[i]).sum();
    let mut u = rng.next_f64() * mass;
    for &i in order {
        u -= probs[i];
        if u < 0.0 {
            return i;
        }
    }
    order[nucleus - 1]
}
