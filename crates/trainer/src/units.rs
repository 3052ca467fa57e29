//! The Llama as the engine sees it: embedding, each decoder block, final norm + head + loss.

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{DType, Device, Gradients, Int, Tensor, TensorData};
use kiln_models::{Context, IGNORE_INDEX, Llama, LlamaConfig, UnitId, causal_lm_loss_sum, unit_of};
use kiln_zero::{Units, load_params, named_grads, named_params_where, release_params};

/// Refuses an id or label outside the vocabulary, which would index past the embedding (or the
/// logits), before any tensor exists, naming where it is.
fn check_vocab(config: &LlamaConfig, ids: &[i64], labels: &[i64], seq: usize) -> crate::Result<()> {
    let vocab = config.vocab_size as i64;
    for (what, values, ignore) in [("id", ids, None), ("label", labels, Some(IGNORE_INDEX))] {
        if let Some(i) = values
            .iter()
            .position(|&t| (t < 0 || t >= vocab) && Some(t) != ignore)
        {
            return Err(crate::TrainerError::Argument(format!(
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
    ) -> crate::Result<Self> {
        let rows = ids.len() / seq.max(1);
        if ids.len() != rows * seq || labels.len() != ids.len() || rows == 0 {
            return Err(crate::TrainerError::Argument(format!(
                "a batch needs rows of {seq} ids and labels, got {} ids and {} labels",
                ids.len(),
                labels.len()
            )));
        }
        check_vocab(config, &ids, &labels, seq)?;
        let ctx = Context::new(config, rows, seq, None, device, dtype)?;
        Ok(Self::with_context(ids, labels, rows, seq, ctx, device))
    }

    /// The model input of collated rows: packed rows ([`crate::data::Example`]) get the
    /// context of their segments and positions (attention within an example, positions
    /// restarting), other rows [`Batch::new`]'s.
    pub fn from_rows(
        config: &LlamaConfig,
        rows: crate::data::Batch,
        device: &Device,
        dtype: DType,
    ) -> crate::Result<Self> {
        let crate::data::Batch {
            ids,
            labels,
            segments,
            positions,
            batch,
            seq_len,
        } = rows;
        let (Some(segments), Some(positions)) = (segments, positions) else {
            return Self::new(config, ids, labels, seq_len, device, dtype);
        };
        if batch == 0 || ids.len() != batch * seq_len || labels.len() != ids.len() {
            return Err(crate::TrainerError::Argument(format!(
                "a packed batch needs {batch} rows of {seq_len} ids and labels, got {} ids and {} labels",
                ids.len(),
                labels.len()
            )));
        }
        check_vocab(config, &ids, &labels, seq_len)?;
        let ctx = Context::packed(config, batch, seq_len, &segments, &positions, device, dtype)?;
        Ok(Self::with_context(ids, labels, batch, seq_len, ctx, device))
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

/// A Llama (optionally with LoRA factors attached) cut into units for [`kiln_zero::Engine`].
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
}

impl Units for LlamaUnits {
    type Batch = Batch;

    fn num_units(&self) -> usize {
        self.model.model.layers.len() + 2
    }

    fn unit_params(&self, unit: usize) -> kiln_zero::Result<Vec<(String, TensorData)>> {
        let id = self.id(unit);
        named_params_where(&self.model, &|p| unit_of(p) == Some(id))
    }

    fn set_unit_params(
        &mut self,
        _unit: usize,
        values: Vec<(String, TensorData)>,
    ) -> kiln_zero::Result<()> {
        let map: HashMap<String, TensorData> = values.into_iter().collect();
        self.model = load_params(self.model.clone(), map)?;
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

    fn release_unit(&mut self, unit: usize) -> kiln_zero::Result<()> {
        let (id, shared) = (self.id(unit), self.shared_params(unit));
        let release = |p: &str| unit_of(p) == Some(id) || shared.iter().any(|s| s == p);
        self.model = release_params(self.model.clone(), &release);
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

    fn unit_grads(
        &self,
        _unit: usize,
        grads: &mut Gradients,
    ) -> kiln_zero::Result<Vec<(String, TensorData)>> {
        named_grads(&self.model, grads)
    }

    fn detached(&self) -> Self {
        Self {
            model: self.model.valid(),
        }
    }
}
