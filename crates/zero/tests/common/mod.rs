#![allow(dead_code)]
//! A tiny config, data, a fault-injecting wrapper of the shipped Llama adapter, and the
//! single-rank reference trainer.

use std::collections::HashMap;

use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use kiln_models::{AdapterDropout, Llama, LlamaConfig, causal_lm_loss_sum};
use kiln_precision::{
    AdamWConfig, ParamGroup, Policy, cast_module, collect_grads, master_weights_for, write_back,
};
pub use kiln_zero::llama::{Batch, LlamaUnits};
use kiln_zero::{Result, Units, ZeroError, named_params};

pub fn tiny() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0}"#,
    )
    .unwrap()
}

pub const SEQ: usize = 8;
pub const ROWS: usize = 12;
pub const SEED: u64 = 7;

pub fn device() -> Device {
    Device::flex().autodiff()
}

/// Global batch of `step`: `ROWS x SEQ` token ids, different every step.
pub fn global_ids(config: &LlamaConfig, step: usize) -> Vec<i64> {
    let mut x = (step as u64 + 1) * 0x9E37_79B9;
    (0..ROWS * SEQ)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % config.vocab_size as u64) as i64
        })
        .collect()
}

/// `ids` as one micro-batch of the shipped adapter: the labels are the ids (every position
/// after the first counts in the loss).
pub fn batch(config: &LlamaConfig, ids: &[i64], dtype: DType) -> Batch {
    Batch::new(config, ids.to_vec(), ids.to_vec(), SEQ, &device(), dtype).unwrap()
}

/// Rows `[lo, hi)` of the global batch of `step`, cut into `micro` micro-batches (uneven ok).
pub fn rank_batches(
    config: &LlamaConfig,
    step: usize,
    rank: usize,
    world: usize,
    micro: usize,
    dtype: DType,
) -> Vec<Batch> {
    rank_batches_with_dropout(config, step, rank, world, micro, dtype, 0.0)
}

/// [`rank_batches`] in training with LoRA dropout `p` (seeded by the step): every micro-batch
/// draws the masks of its rows of the global batch.
pub fn rank_batches_with_dropout(
    config: &LlamaConfig,
    step: usize,
    rank: usize,
    world: usize,
    micro: usize,
    dtype: DType,
    p: f64,
) -> Vec<Batch> {
    let ids = global_ids(config, step);
    let (lo, hi) = (rank * ROWS / world, (rank + 1) * ROWS / world);
    let rows = hi - lo;
    (0..micro)
        .map(|m| (lo + m * rows / micro, lo + (m + 1) * rows / micro))
        .filter(|(a, b)| b > a)
        .map(|(a, b)| {
            let mut batch = batch(config, &ids[a * SEQ..b * SEQ], dtype);
            if p > 0.0 {
                let dropout = AdapterDropout::new(p, step as u64, a as u64).unwrap();
                batch.ctx = batch.ctx.with_adapter_dropout(dropout);
            }
            batch
        })
        .collect()
}

/// The tiny Llama of `config` (seed [`SEED`]) as the shipped units.
pub fn llama_units(config: &LlamaConfig) -> LlamaUnits {
    LlamaUnits::new(Llama::random(config, SEED, &device(), DType::F32).unwrap())
}

/// The shipped adapter with a fault to inject: when `poison` is set, an inf in the head's
/// gradient. Everything else is the adapter's.
pub struct Poisoned {
    pub inner: LlamaUnits,
    pub poison: bool,
}

impl Units for Poisoned {
    type Batch = Batch;

    fn num_units(&self) -> usize {
        self.inner.num_units()
    }

    fn unit_params(&self, unit: usize) -> Result<Vec<(String, TensorData)>> {
        self.inner.unit_params(unit)
    }

    fn shared_params(&self, unit: usize) -> Vec<String> {
        self.inner.shared_params(unit)
    }

    fn set_unit_params(&mut self, unit: usize, values: Vec<(String, TensorData)>) -> Result<()> {
        self.inner.set_unit_params(unit, values)
    }

    fn release_unit(&mut self, unit: usize) -> Result<()> {
        self.inner.release_unit(unit)
    }

    fn forward(&self, unit: usize, input: Option<Tensor<3>>, batch: &Batch) -> Tensor<3> {
        self.inner.forward(unit, input, batch)
    }

    fn loss_sum(&self, input: Tensor<3>, batch: &Batch) -> Tensor<1> {
        self.inner.loss_sum(input, batch)
    }

    fn tokens(&self, batch: &Batch) -> usize {
        self.inner.tokens(batch)
    }

    fn unit_grads(&self, unit: usize, grads: &mut Gradients) -> Result<Vec<(String, TensorData)>> {
        let mut g = self.inner.unit_grads(unit, grads)?;
        if self.poison && unit == self.num_units() - 1 {
            let (_, d) = g
                .iter_mut()
                .find(|(p, _)| p == "lm_head.weight")
                .ok_or_else(|| ZeroError::Model("no lm_head grad".into()))?;
            let mut v: Vec<f32> = d.iter::<f32>().collect();
            v[0] = f32::INFINITY;
            *d = TensorData::new(v, d.shape().to_vec()).convert_dtype(d.dtype());
        }
        Ok(g)
    }

    fn detached(&self) -> Self {
        Self {
            inner: self.inner.detached(),
            poison: self.poison,
        }
    }
}

/// Parameters of a model as f32 vectors by path.
pub fn params_f32(model: &Llama) -> HashMap<String, Vec<f32>> {
    named_params(model)
        .unwrap()
        .into_iter()
        .map(|(p, d)| (p, d.iter::<f32>().collect()))
        .collect()
}

/// Every parameter of the engine's model as f32 vectors by path (a collective).
pub fn full_params_f32<U: Units>(
    engine: &mut kiln_zero::Engine<U>,
) -> Result<HashMap<String, Vec<f32>>> {
    Ok(engine
        .full_params()?
        .into_iter()
        .map(|(p, d)| (p, d.iter::<f32>().collect()))
        .collect())
}

/// Whole-model single-rank training on the whole batch: the plain precision recipe.
/// Returns the loss curve and the final parameters.
pub fn reference(
    policy: Policy,
    steps: usize,
    max_grad_norm: Option<f32>,
    group: ParamGroup,
) -> (Vec<f32>, HashMap<String, Vec<f32>>) {
    let config = tiny();
    let model = Llama::random(&config, SEED, &device(), DType::F32).unwrap();
    // AdamW's groups as the engine makes them: decay on matrices, none on norm gains.
    let ndim: HashMap<String, usize> = named_params(&model)
        .unwrap()
        .into_iter()
        .map(|(p, d)| (p, d.shape().len()))
        .collect();
    let no_decay = ParamGroup {
        weight_decay: 0.0,
        ..group
    };
    let mut master = master_weights_for(
        &model,
        |p| kiln_zero::group_of(&vec![1; ndim[p]]),
        vec![group, no_decay],
        AdamWConfig::default(),
    )
    .unwrap();
    let mut model = cast_module(model, policy.compute);
    let mut scaler = policy.loss_scaler();
    let mut losses = vec![];
    for step in 0..steps {
        let b = batch(&config, &global_ids(&config, step), policy.compute);
        let (sum, count) =
            causal_lm_loss_sum(model.forward(b.ids.clone(), &b.ctx), b.labels.clone());
        let loss = sum / count;
        losses.push(loss.clone().into_data().iter::<f32>().next().unwrap());
        let scaled = match &scaler {
            Some(s) => s.scale_loss(loss),
            None => loss,
        };
        let grads = collect_grads(&model, &scaled.backward()).unwrap();
        master
            .set_grads(grads.iter().map(|(p, g)| (p.as_str(), g)))
            .unwrap();
        let inv = scaler.as_ref().map_or(1.0, |s| s.inv_scale());
        let found = master.unscale_grads(inv);
        if let (Some(max), false) = (max_grad_norm, found) {
            let norm = master
                .grads()
                .iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>()
                .sqrt() as f32;
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                master.grads_mut().iter_mut().for_each(|g| *g *= coef);
            }
        }
        master.apply(found).unwrap();
        if let Some(s) = &mut scaler {
            s.update(found);
        }
        model = write_back(&master, model, policy.compute).unwrap();
    }
    (losses, params_f32(&model))
}

pub fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-12)
}
