//! Llama, as Hugging Face's `LlamaForCausalLM`. Field names are HF parameter paths, so the burn
//! module path of every parameter is its key in `model.safetensors`.

use burn::module::Module;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::cache::{KvCache, LayerCache};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::layers::{AdapterDropout, Embedding, Linear, Mlp, RmsNorm};
use crate::source::ParamSource;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// # Shapes
    /// `x: [batch, seq, hidden]` -> same
    pub fn forward(&self, x: Tensor<3>, ctx: &Context) -> Tensor<3> {
        self.forward_with(x, ctx, None)
    }

    /// [`Attention::forward`] for new positions whose keys and values join those in `cache`:
    /// `ctx` covers the new positions (its mask is `[batch, 1, seq, cached + seq]`, see
    /// [`Context::with_offset`]) and `cache` grows by `seq`.
    pub fn forward_cached(&self, x: Tensor<3>, ctx: &Context, cache: &mut LayerCache) -> Tensor<3> {
        self.forward_with(x, ctx, Some(cache))
    }

    /// The one attention: with a cache, the new keys and values are appended to the cached ones
    /// (before the kv heads are repeated) and the queries attend to all of them.
    fn forward_with(
        &self,
        x: Tensor<3>,
        ctx: &Context,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let few_rows = cache.is_some();
        let dropout = ctx.adapter_dropout.as_ref();
        let linear = |l: &Linear, x: Tensor<3>| match few_rows {
            true => l.forward_few_rows(x),
            false => l.forward_with(x, dropout),
        };
        let (q, k, v) = (
            linear(&self.q_proj, x.clone()),
            linear(&self.k_proj, x.clone()),
            linear(&self.v_proj, x),
        );
        let (heads, kv_heads) = (self.num_heads, self.num_kv_heads);
        let rotate = |t: Tensor<3>, n| kiln_kernels::rope(t, ctx.cos.clone(), ctx.sin.clone(), n);
        // Scores and softmax in f32, as HF's eager attention; masked scores get f32::MIN, so a row
        // with every key masked (left padding) is uniform instead of NaN. Without a cache the
        // kernel rotates q and k itself (RoPE fused, the rotated tensors never stored); a cache
        // keeps rotated keys.
        let scale = (self.head_dim as f64).powf(-0.5);
        let (q, k, v, rotary) = match cache {
            Some(cache) => {
                let (k, v) = cache.append(rotate(k, kv_heads), v);
                (rotate(q, heads), k, v, None)
            }
            None => (q, k, v, Some((ctx.cos.clone(), ctx.sin.clone()))),
        };
        let out =
            kiln_kernels::attention(q, k, v, ctx.mask.clone(), rotary, heads, kv_heads, scale);
        linear(&self.o_proj, out)
    }
}

/// One decoder block: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))`.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Builds block `index` from `source` (keys `model.layers.{index}.*`).
    pub fn load(config: &LlamaConfig, index: usize, source: &mut impl ParamSource) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let (h, i, d) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let (q, kv) = (
            config.num_attention_heads * d,
            config.num_key_value_heads * d,
        );
        Ok(Self {
            self_attn: Attention {
                q_proj: Linear::load(source, &format!("{p}.self_attn.q_proj"), q, h)?,
                k_proj: Linear::load(source, &format!("{p}.self_attn.k_proj"), kv, h)?,
                v_proj: Linear::load(source, &format!("{p}.self_attn.v_proj"), kv, h)?,
                o_proj: Linear::load(source, &format!("{p}.self_attn.o_proj"), h, q)?,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: d,
            },
            mlp: Mlp {
                gate_proj: Linear::load(source, &format!("{p}.mlp.gate_proj"), i, h)?,
                up_proj: Linear::load(source, &format!("{p}.mlp.up_proj"), i, h)?,
                down_proj: Linear::load(source, &format!("{p}.mlp.down_proj"), h, i)?,
            },
            input_layernorm: RmsNorm::load(
                source,
                &format!("{p}.input_layernorm"),
                h,
                config.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                source,
                &format!("{p}.post_attention_layernorm"),
                h,
                config.rms_norm_eps,
            )?,
        })
    }

    pub fn forward(&self, x: Tensor<3>, ctx: &Context) -> Tensor<3> {
        self.forward_with(x, ctx, None)
    }

    /// [`DecoderLayer::forward`] with this block's keys and values kept in `cache`
    /// (see [`Attention::forward_cached`]).
    pub fn forward_cached(&self, x: Tensor<3>, ctx: &Context, cache: &mut LayerCache) -> Tensor<3> {
        self.forward_with(x, ctx, Some(cache))
    }

    fn forward_with(
        &self,
        x: Tensor<3>,
        ctx: &Context,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let few_rows = cache.is_some();
        let normed = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward_with(normed, ctx, cache);
        let normed = self.post_attention_layernorm.forward(h.clone());
        h + self
            .mlp
            .forward_with(normed, few_rows, ctx.adapter_dropout.as_ref())
    }
}

/// `model.*` of HF's `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// A Llama with its language-model head. `lm_head` is `None` when tied to `embed_tokens`.
#[derive(Module, Debug)]
pub struct Llama {
    pub model: LlamaModel,
    pub lm_head: Option<Linear>,
}

/// The per-batch inputs every block shares: rotary tables, the attention mask and, in training,
/// the dropout of LoRA adapters.
#[derive(Debug, Clone)]
pub struct Context {
    /// `[seq, head_dim]` (one row per position), or `[batch · seq, head_dim]` (one per token,
    /// for packed rows: see [`Context::packed`]), in the compute dtype.
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
    /// `[batch, 1, seq, past + seq]`, true where a query may not attend to a key (future or
    /// padding); `past` is 0 without a cache.
    pub mask: Tensor<4, Bool>,
    /// PEFT's `lora_dropout` on the input of every attached adapter; `None` (the default, and
    /// what evaluation and generation use) runs adapters without dropout.
    pub adapter_dropout: Option<AdapterDropout>,
}

impl Context {
    /// Positions are `0..seq` in every row (HF's default `position_ids`, also with left padding).
    /// `attention_mask` is `[batch, seq]` with 1 for real tokens and 0 for padding.
    pub fn new(
        config: &LlamaConfig,
        batch: usize,
        seq: usize,
        attention_mask: Option<&[i64]>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::with_offset(config, batch, 0, seq, attention_mask, device, dtype)
    }

    /// The context of `seq` new positions after `past` cached ones, for
    /// [`Llama::forward_cached`]: positions `past..past + seq` in every row, and a mask
    /// `[batch, 1, seq, past + seq]` over the cached and new keys. `attention_mask` is
    /// `[batch, past + seq]` (1 for real tokens, 0 for padding) and covers the cached positions
    /// too. With `past = 0` this is [`Context::new`].
    pub fn with_offset(
        config: &LlamaConfig,
        batch: usize,
        past: usize,
        seq: usize,
        attention_mask: Option<&[i64]>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let total = past + seq;
        if let Some(m) = attention_mask
            && m.len() != batch * total
        {
            return Err(ModelError::Input(format!(
                "attention_mask has {} values, expected {batch}x{total} ({past} cached + {seq} new positions)",
                m.len()
            )));
        }
        let (cos, sin) = rope_tables(config, past, seq);
        let d = config.head_dim;
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v, [seq, d]), (device, DType::F32)).cast(dtype)
        };
        let mut mask = vec![false; batch * seq * total];
        for b in 0..batch {
            for q in 0..seq {
                for k in 0..total {
                    let padded = attention_mask.is_some_and(|m| m[b * total + k] == 0);
                    mask[(b * seq + q) * total + k] = k > past + q || padded;
                }
            }
        }
        let mask =
            Tensor::<4, Bool>::from_data(TensorData::new(mask, [batch, 1, seq, total]), device);
        Ok(Self {
            cos: table(cos),
            sin: table(sin),
            mask,
            adapter_dropout: None,
        })
    }

    /// The context of packed rows: several examples per row, told apart by `segments`
    /// (`[batch, seq]`, 1, 2, ... per example, 0 for padding), with `positions` (`[batch, seq]`)
    /// restarting at 0 in each example. A query attends to the keys of its own example up to
    /// itself (causal, blocked between examples), and each token is rotated by its own position
    /// (the rotary tables are `[batch · seq, head_dim]`), so a packed row computes every example
    /// as if it were alone in its row.
    pub fn packed(
        config: &LlamaConfig,
        batch: usize,
        seq: usize,
        segments: &[u32],
        positions: &[i64],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let n = batch * seq;
        if segments.len() != n || positions.len() != n {
            return Err(ModelError::Input(format!(
                "packed rows: {} segment ids and {} positions for {batch}x{seq} tokens",
                segments.len(),
                positions.len()
            )));
        }
        let max = config.max_position_embeddings as i64;
        if let Some(&p) = positions.iter().find(|&&p| !(0..max).contains(&p)) {
            return Err(ModelError::Input(format!(
                "packed rows: position {p} outside 0..{max} (max_position_embeddings)"
            )));
        }
        let (cos, sin) = rope_at(config, positions);
        let d = config.head_dim;
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v, [n, d]), (device, DType::F32)).cast(dtype)
        };
        let mut mask = vec![true; batch * seq * seq];
        for b in 0..batch {
            let seg = &segments[b * seq..(b + 1) * seq];
            for q in 0..seq {
                for k in 0..=q {
                    mask[(b * seq + q) * seq + k] = seg[k] != seg[q] || seg[q] == 0;
                }
            }
        }
        let mask =
            Tensor::<4, Bool>::from_data(TensorData::new(mask, [batch, 1, seq, seq]), device);
        Ok(Self {
            cos: table(cos),
            sin: table(sin),
            mask,
            adapter_dropout: None,
        })
    }

    /// This context in training, with adapter dropout (see [`AdapterDropout`]).
    pub fn with_adapter_dropout(self, dropout: AdapterDropout) -> Self {
        Self {
            adapter_dropout: Some(dropout),
            ..self
        }
    }
}

/// `cos` and `sin` of `position · inv_freq` for positions `start..start + seq`, `[seq, head_dim]`
/// row-major, in f32 as HF computes them.
fn rope_tables(config: &LlamaConfig, start: usize, seq: usize) -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<i64> = (start..start + seq).map(|p| p as i64).collect();
    rope_at(config, &positions)
}

/// [`rope_tables`] for any positions, one table row per position.
fn rope_at(config: &LlamaConfig, positions: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let d = config.head_dim;
    let theta = config.rope_theta as f32;
    let mut inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = config.rope_scaling
    {
        let old = original_max_position_embeddings as f64;
        let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
        for f in inv_freq.iter_mut() {
            let freq = *f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            *f = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            } as f32;
        }
    }
    let n = positions.len();
    let (mut cos, mut sin) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
    for &pos in positions {
        // HF's `emb = cat(freqs, freqs)`: both halves of a row use the same frequencies.
        for _ in 0..2 {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// The stages the engine runs one at a time: embedding, each decoder block, final norm + head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitId {
    Embed,
    Block(usize),
    Head,
}

impl Llama {
    /// Builds the model by asking `source` for every key of [`LlamaConfig::param_table`].
    pub fn load(config: &LlamaConfig, source: &mut impl ParamSource) -> Result<Self> {
        config.validate()?;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = Embedding::load(source, "model.embed_tokens", v, h)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(config, i, source))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(source, "model.norm", h, config.rms_norm_eps)?;
        let lm_head = match config.tie_word_embeddings {
            true => None,
            false => Some(Linear::load(source, "lm_head", v, h)?),
        };
        Ok(Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
        })
    }

    /// # Shapes
    /// `ids: [batch, seq]` -> logits `[batch, seq, vocab]`
    pub fn forward(&self, ids: Tensor<2, Int>, ctx: &Context) -> Tensor<3> {
        let h = self.embed(ids);
        let h = self
            .model
            .layers
            .iter()
            .fold(h, |h, layer| layer.forward(h, ctx));
        self.head(h, ctx)
    }

    /// Logits `[batch, seq, vocab]` for `seq` new positions after the `cache.len()` cached ones,
    /// whose keys and values are appended to `cache`: a prefill of whole (left-padded) prompts,
    /// then one-token steps. `attention_mask` is `[batch, seq]` for the new tokens (1 real,
    /// 0 padding; `None` = all real); the cache remembers it for later steps. Positions continue
    /// from the cached length in every row, as [`Context::new`] numbers a padded batch, so the
    /// logits equal those of [`Llama::forward`] on the whole sequence.
    pub fn forward_cached(
        &self,
        ids: Tensor<2, Int>,
        attention_mask: Option<&[i64]>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let [batch, seq] = ids.dims();
        if batch != cache.batch {
            return Err(ModelError::Input(format!(
                "input_ids has batch {batch}, the cache was made for {}",
                cache.batch
            )));
        }
        if cache.layers.len() != self.model.layers.len() {
            return Err(ModelError::Input(format!(
                "the cache has {} layers, the model {}",
                cache.layers.len(),
                self.model.layers.len()
            )));
        }
        if let Some(m) = attention_mask
            && m.len() != batch * seq
        {
            return Err(ModelError::Input(format!(
                "attention_mask has {} values, input_ids is {batch}x{seq}",
                m.len()
            )));
        }
        let past = cache.len;
        let total = past + seq;
        let padded = cache.padding.is_some() || attention_mask.is_some_and(|m| m.contains(&0));
        let full_mask: Option<Vec<i64>> = padded.then(|| {
            let mut full = Vec::with_capacity(batch * total);
            for b in 0..batch {
                match &cache.padding {
                    Some(p) => full.extend_from_slice(&p[b * past..(b + 1) * past]),
                    None => full.extend(std::iter::repeat_n(1, past)),
                }
                match attention_mask {
                    Some(m) => full.extend_from_slice(&m[b * seq..(b + 1) * seq]),
                    None => full.extend(std::iter::repeat_n(1, seq)),
                }
            }
            full
        });
        let device = ids.device();
        let ctx = Context::with_offset(
            &cache.config,
            batch,
            past,
            seq,
            full_mask.as_deref(),
            &device,
            self.dtype(),
        )?;
        let mut h = self.embed(ids);
        for (layer, layer_cache) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_cached(h, &ctx, layer_cache);
        }
        cache.len = total;
        cache.padding = full_mask;
        Ok(self.head_with(h, true, None))
    }

    /// The embedding unit.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(ids)
    }

    /// The head unit: final norm and the (possibly tied) projection to the vocabulary.
    pub fn head(&self, h: Tensor<3>, ctx: &Context) -> Tensor<3> {
        self.head_with(h, false, ctx.adapter_dropout.as_ref())
    }

    fn head_with(
        &self,
        h: Tensor<3>,
        few_rows: bool,
        dropout: Option<&AdapterDropout>,
    ) -> Tensor<3> {
        let h = self.model.norm.forward(h);
        match &self.lm_head {
            Some(lm_head) if few_rows => lm_head.forward_few_rows(h),
            Some(lm_head) => lm_head.forward_with(h, dropout),
            None => kiln_kernels::linear(h, self.model.embed_tokens.weight.val()),
        }
    }

    /// The units in forward order.
    pub fn units(&self) -> Vec<UnitId> {
        let blocks = (0..self.model.layers.len()).map(UnitId::Block);
        std::iter::once(UnitId::Embed)
            .chain(blocks)
            .chain([UnitId::Head])
            .collect()
    }

    /// The dtype of the parameters (the compute dtype when the model was cast).
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.weight.val().dtype()
    }
}

/// Which unit owns the parameter `key` (an HF path).
pub fn unit_of(key: &str) -> Option<UnitId> {
    if key.starts_with("model.embed_tokens.") {
        return Some(UnitId::Embed);
    }
    if key.starts_with("model.norm.") || key.starts_with("lm_head.") {
        return Some(UnitId::Head);
    }
    let rest = key.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok().map(UnitId::Block)
}
