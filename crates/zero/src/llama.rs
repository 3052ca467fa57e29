//! The Llama of `kiln-models` as the engine sees it: embedding, each decoder block, final norm +
//! head + loss (feature `llama`, on by default). The engine itself never looks inside a model;
//! this adapter is the one every user of the Llama shares (the trainer, the benches, the engine's
//! tests), as torchtitan keeps `parallelize_llama` next to its model. Tests that inject faults
//! wrap it.

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{DType, Device, Gradients, Int, Tensor, TensorData};
use kiln_models::{Context, IGNORE_INDEX, Llama, LlamaConfig, UnitId, causal_lm_loss_sum, unit_of};

use crate::error::{Result, ZeroError};
use crate::units::{Units, load_params, named_grads, named_params_where, release_params};

/// Refuses an id or label outside the vocabulary, which would index past the embedding (or the
/// logits), before any tensor exists, naming where it is.
fn check_vocab(config: &LlamaConfig, ids: &[i64], labels: &[i64], seq: usize) -> Result<()> {
    let vocab = config.vocab_size as i64;
    for (what, values, ignore) in [("id", ids, None), ("label", labels, Some(IGNORE_INDEX))] {
        if let Some(i) = values
            .iter()
            .position(|&t| (t < 0 || t >= vocab) && Some(t) != ignore)
        {
            return Err(ZeroError::Input(format!(
                "token {what} {} (row {}, position {}) is outside the model's vocabulary \
                 0..{vocab}: the tokenizer or its special ids (bos/eos/pad) do not fit the model",
                values[i],
                i / seq.max(1),
                i % seq.max(1)
            )));
        }
    }
    Ok(())
}

fn input(e: kiln_models::ModelError) -> ZeroError {
    ZeroError::Input(e.to_string())
}

/// One micro-batch on one rank: token ids, labels (`-100` where no loss), the rotary/mask
/// context and the number of tokens that count in the loss.
pub struct Batch {
    pub ids: Tensor<2, Int>,
    pub labels: Tensor<2, Int>,
    pub ctx: Context,
    pub tokens: usize,
}

impl Batch {
    /// Rows of equal length `seq`: `ids` and `labels` are `rows · seq` long. Position t predicts
    /// `labels[t + 1]`, so a row's tokens that count are its labels after the first that are not
    /// `-100`.
    pub fn new(
        config: &LlamaConfig,
        ids: Vec<i64>,
        labels: Vec<i64>,
        seq: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let rows = ids.len() / seq.max(1);
        if ids.len() != rows * seq || labels.len() != ids.len() || rows == 0 {
            return Err(ZeroError::Input(format!(
                "a batch needs rows of {seq} ids and labels, got {} ids and {} labels",
                ids.len(),
                labels.len()
            )));
        }
        check_vocab(config, &ids, &labels, seq)?;
        let ctx = Context::new(config, rows, seq, None, device, dtype).map_err(input)?;
        Ok(Self::with_context(ids, labels, rows, seq, ctx, device))
    }

    /// Packed rows: several examples per row, numbered by `segments` (0 for padding) with
    /// `positions` restarting at each, so attention stays inside an example (all four vectors
    /// are `rows · seq` long).
    #[allow(clippy::too_many_arguments)]
    pub fn packed(
        config: &LlamaConfig,
        ids: Vec<i64>,
        labels: Vec<i64>,
        segments: &[u32],
        positions: &[i64],
        (rows, seq): (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if rows == 0 || ids.len() != rows * seq || labels.len() != ids.len() {
            return Err(ZeroError::Input(format!(
                "a packed batch needs {rows} rows of {seq} ids and labels, got {} ids and {} labels",
                ids.len(),
                labels.len()
            )));
        }
        check_vocab(config, &ids, &labels, seq)?;
        let ctx = Context::packed(config, rows, seq, segments, positions, device, dtype)
            .map_err(input)?;
        Ok(Self::with_context(ids, labels, rows, seq, ctx, device))
    }

    fn with_context(
        ids: Vec<i64>,
        labels: Vec<i64>,
        rows: usize,
        seq: usize,
        ctx: Context,
        device: &Device,
    ) -> Self {
        let tokens = labels
            .chunks(seq)
            .map(|row| row[1..].iter().filter(|&&l| l != IGNORE_INDEX).count())
            .sum();
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [rows, seq]), device),
            labels: Tensor::from_data(TensorData::new(labels, [rows, seq]), device),
            ctx,
            tokens,
        }
    }
}

/// The modules of the Llama a unit's parameters live in (HF path prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    Embed,
    Layer(usize),
    Norm,
    Head,
}

impl Part {
    /// The part `path` lives in and the path inside it.
    fn of(path: &str) -> Option<(Part, &str)> {
        if let Some(rest) = path.strip_prefix("model.embed_tokens.") {
            return Some((Part::Embed, rest));
        }
        if let Some(rest) = path.strip_prefix("model.norm.") {
            return Some((Part::Norm, rest));
        }
        if let Some(rest) = path.strip_prefix("lm_head.") {
            return Some((Part::Head, rest));
        }
        let (i, rest) = path.strip_prefix("model.layers.")?.split_once('.')?;
        Some((Part::Layer(i.parse().ok()?), rest))
    }

    fn prefix(self) -> String {
        match self {
            Part::Embed => "model.embed_tokens.".into(),
            Part::Layer(i) => format!("model.layers.{i}."),
            Part::Norm => "model.norm.".into(),
            Part::Head => "lm_head.".into(),
        }
    }
}

/// A Llama (optionally with LoRA factors attached) cut into units for [`crate::Engine`]:
/// unit 0 is the embedding, units `1..=L` the decoder blocks, the last the final norm, the head
/// and the loss.
pub struct LlamaUnits {
    pub model: Llama,
}

impl LlamaUnits {
    pub fn new(model: Llama) -> Self {
        Self { model }
    }

    fn id(&self, unit: usize) -> UnitId {
        match unit {
            0 => UnitId::Embed,
            u if u <= self.model.model.layers.len() => UnitId::Block(u - 1),
            _ => UnitId::Head,
        }
    }

    /// The modules `unit` computes with: its own and those of its shared parameters.
    fn parts(&self, unit: usize) -> Vec<Part> {
        let mut parts = match self.id(unit) {
            UnitId::Embed => vec![Part::Embed],
            UnitId::Block(i) => vec![Part::Layer(i)],
            UnitId::Head => vec![Part::Norm, Part::Head],
        };
        parts.extend(
            self.shared_params(unit)
                .iter()
                .filter_map(|p| Some(Part::of(p)?.0)),
        );
        parts
    }

    /// Applies `op` to the module of `part` only (the rest of the model is not visited).
    fn on_part(&mut self, part: Part, op: Op) -> Result<()> {
        let m = &mut self.model;
        match part {
            Part::Embed => op.apply(&mut m.model.embed_tokens),
            Part::Layer(i) => op.apply(m.model.layers.get_mut(i).ok_or_else(|| {
                ZeroError::Model(format!("model.layers.{i}: the model has no such layer"))
            })?),
            Part::Norm => op.apply(&mut m.model.norm),
            Part::Head => match &mut m.lm_head {
                Some(head) => op.apply(head),
                None => Ok(()),
            },
        }
    }
}

/// What [`LlamaUnits::on_part`] does to a module, by paths inside it.
enum Op<'a> {
    Load(HashMap<String, TensorData>),
    Release(&'a dyn Fn(&str) -> bool),
}

impl Op<'_> {
    fn apply<M: Module>(self, module: &mut M) -> Result<()> {
        let m = module.clone();
        *module = match self {
            Op::Load(values) => load_params(m, values)?,
            Op::Release(release) => release_params(m, release),
        };
        Ok(())
    }
}

impl Units for LlamaUnits {
    type Batch = Batch;

    fn num_units(&self) -> usize {
        self.model.model.layers.len() + 2
    }

    fn unit_params(&self, unit: usize) -> Result<Vec<(String, TensorData)>> {
        let id = self.id(unit);
        named_params_where(&self.model, &|p| unit_of(p) == Some(id))
    }

    /// Replaces the values in the modules they belong to, leaving the rest of the model alone.
    fn set_unit_params(&mut self, _unit: usize, values: Vec<(String, TensorData)>) -> Result<()> {
        let mut by_part: HashMap<Part, HashMap<String, TensorData>> = HashMap::new();
        for (path, data) in values {
            let (part, inner) = Part::of(&path)
                .ok_or_else(|| ZeroError::Model(format!("{path}: not a parameter of the Llama")))?;
            by_part
                .entry(part)
                .or_default()
                .insert(inner.to_string(), data);
        }
        for (part, values) in by_part {
            self.on_part(part, Op::Load(values))?;
        }
        Ok(())
    }

    fn shared_params(&self, unit: usize) -> Vec<String> {
        // A tied head projects with the embedding the first unit owns.
        let tied = self.model.lm_head.is_none();
        match self.id(unit) {
            UnitId::Head if tied => vec!["model.embed_tokens.weight".to_string()],
            _ => Vec::new(),
        }
    }

    fn release_unit(&mut self, unit: usize) -> Result<()> {
        let (id, shared) = (self.id(unit), self.shared_params(unit));
        let release = |p: &str| unit_of(p) == Some(id) || shared.iter().any(|s| s == p);
        for part in self.parts(unit) {
            let prefix = part.prefix();
            let inner = |p: &str| release(&format!("{prefix}{p}"));
            self.on_part(part, Op::Release(&inner))?;
        }
        Ok(())
    }

    fn forward(&self, unit: usize, input: Option<Tensor<3>>, batch: &Batch) -> Tensor<3> {
        match (self.id(unit), input) {
            (UnitId::Block(i), Some(h)) => self.model.model.layers[i].forward(h, &batch.ctx),
            _ => self.model.embed(batch.ids.clone()),
        }
    }

    fn loss_sum(&self, input: Tensor<3>, batch: &Batch) -> Tensor<1> {
        causal_lm_loss_sum(self.model.head(input, &batch.ctx), batch.labels.clone()).0
    }

    fn tokens(&self, batch: &Batch) -> usize {
        batch.tokens
    }

    fn unit_grads(&self, _unit: usize, grads: &mut Gradients) -> Result<Vec<(String, TensorData)>> {
        named_grads(&self.model, grads)
    }

    fn detached(&self) -> Self {
        Self {
            model: self.model.valid(),
        }
    }
}
