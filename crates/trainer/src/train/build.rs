//! What every rank builds before the loop: the device, the tokenizer, the model with its LoRA
//! adapter, and the engine's configuration.

use std::path::Path;

use burn::tensor::{DType, Device};
use kiln_lora::{LoraModel, TargetModules};
use kiln_models::{Llama, LlamaConfig, TensorMap};
use kiln_precision::{AdamWConfig, ParamGroup, Policy};

use crate::config::{ComputeDtype, DistBackend, PrecisionConfig, ReduceDtype, TrainConfig};
use crate::data::{Tokenizer, TokenizerSpec};
use crate::{Result, TrainerError};

/// The device a rank computes on (`dist.device`, see [`crate::device`]), with autodiff.
pub(super) fn device_for(
    config: &TrainConfig,
    backend: DistBackend,
    rank: usize,
) -> Result<Device> {
    let local = match backend {
        DistBackend::Threads | DistBackend::Auto => rank,
        _ => kiln_dist::RankEnv::detect()
            .ok()
            .flatten()
            .map_or(rank, |e| e.local_rank),
    };
    let device = crate::device::rank_device(&config.dist, backend, local)?;
    crate::device::check_dtype(&device, policy_of(&config.precision).compute)?;
    Ok(device.autodiff())
}

/// The policy of `[precision]`: compute and reduction dtypes, f32 master weights.
pub fn policy_of(precision: &PrecisionConfig) -> Policy {
    let policy = match precision.compute {
        ComputeDtype::F32 => Policy::f32(),
        ComputeDtype::Bf16 => Policy::bf16(),
        ComputeDtype::F16 => Policy::fp16(),
    };
    let reduce = match precision.reduce {
        ReduceDtype::F32 => DType::F32,
        ReduceDtype::Bf16 => DType::BF16,
        ReduceDtype::F16 => DType::F16,
    };
    Policy { reduce, ..policy }
}

/// The LoRA config of the run (PEFT semantics), if LoRA is on: the `[lora]` fields, or the
/// `adapter_config.json` of the PEFT adapter the run starts from (`lora.adapter`).
pub fn lora_config(config: &TrainConfig) -> Result<Option<kiln_lora::LoraConfig>> {
    if !lora_on(config) {
        return Ok(None);
    }
    Ok(Some(match &config.lora.adapter {
        Some(dir) => kiln_lora::LoraConfig::from_file(dir.join(kiln_lora::peft::CONFIG_FILE))?,
        None => fresh_lora_config(config),
    }))
}

/// Whether the run trains LoRA adapters (`lora.enabled`, or an adapter to start from).
fn lora_on(config: &TrainConfig) -> bool {
    config.lora.enabled || config.lora.adapter.is_some()
}

/// The adapter the `[lora]` fields describe (a fresh one, without `lora.adapter`).
fn fresh_lora_config(config: &TrainConfig) -> kiln_lora::LoraConfig {
    let l = &config.lora;
    kiln_lora::LoraConfig {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: TargetModules::Names(l.target_modules.clone()),
        use_rslora: l.use_rslora,
        ..Default::default()
    }
}

/// The run's tokenizer: `data.tokenizer`, where `auto` (the default) is the `tokenizer.json` of
/// `model.pretrained` when the folder has one (with its `tokenizer_config.json` and chat
/// template), else the byte tokenizer; a byte-level pretrained model with fewer than 259 ids
/// (too few for kiln's byte tokenizer's BOS/EOS/PAD) gets raw bytes with its own special ids.
/// Refuses a tokenizer whose ids do not fit the model's vocabulary.
pub fn tokenizer_for(config: &TrainConfig, model_config: &LlamaConfig) -> Result<Tokenizer> {
    let folder = config
        .model
        .pretrained
        .as_ref()
        .map(|dir| dir.join("tokenizer.json"))
        .filter(|file| file.is_file());
    let mut tokenizer = match (&config.data.tokenizer, folder) {
        (TokenizerSpec::Auto, Some(file)) => Tokenizer::from_file(&file)?,
        (spec, _) => Tokenizer::from_spec(spec)?,
    };
    if let (Tokenizer::Byte, Some(dir)) = (&tokenizer, &config.model.pretrained)
        && model_config.vocab_size < tokenizer.vocab_size()
    {
        tokenizer = byte_tokenizer_of(dir, model_config)?;
    }
    if tokenizer.vocab_size() > model_config.vocab_size {
        return Err(TrainerError::invalid(
            "data.tokenizer",
            format!(
                "{} ids, more than the model's vocabulary of {}",
                tokenizer.vocab_size(),
                model_config.vocab_size
            ),
        ));
    }
    Ok(tokenizer)
}

/// The byte tokenizer for a byte-level HF model with fewer than 259 ids: raw bytes, with the
/// model's own `bos_token_id` / `eos_token_id` from its `config.json`.
fn byte_tokenizer_of(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    let path = dir.join("config.json");
    let text = kiln_models::read_text_capped(&path, kiln_models::CONFIG_CAP).map_err(|e| {
        TrainerError::Io {
            path: path.clone(),
            source: e,
        }
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainerError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let eos = special_id(&json, "eos_token_id", &path, config.vocab_size)?.ok_or_else(|| {
        TrainerError::Tokenizer {
            path: path.clone(),
            reason: format!(
                "no tokenizer.json, a vocabulary of {} (< 259, too small for kiln's byte tokenizer) \
                 and no eos_token_id to use raw bytes with",
                config.vocab_size
            ),
        }
    })?;
    Ok(Tokenizer::ByteSpecial {
        bos: special_id(&json, "bos_token_id", &path, config.vocab_size)?,
        eos,
        pad: special_id(&json, "pad_token_id", &path, config.vocab_size)?.unwrap_or(eos),
    })
}

/// A special token id of an HF `config.json` (`path`): absent or null is `None`; an integer, or
/// a list of them (HF's several end-of-sequence ids; kiln stops at the first), must be a token
/// of the model's vocabulary.
fn special_id(
    json: &serde_json::Value,
    key: &str,
    path: &Path,
    vocab: usize,
) -> Result<Option<i64>> {
    let bad = |reason: String| TrainerError::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("{key}: {reason}"),
    };
    let value = match json.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(ids)) => match ids.first() {
            Some(first) => first,
            None => return Err(bad("an empty list".into())),
        },
        Some(v) => v,
    };
    let id = value
        .as_i64()
        .ok_or_else(|| bad(format!("expected a token id (an integer), found {value}")))?;
    if !(0..vocab as i64).contains(&id) {
        return Err(bad(format!(
            "{id} is outside the model's vocabulary 0..{vocab}"
        )));
    }
    Ok(Some(id))
}

/// Whether a parameter path trains.
pub type Trainable = fn(&str) -> bool;

/// The model every rank starts from.
pub struct Built {
    pub model: Llama,
    /// Whether a parameter path trains.
    pub trainable: Trainable,
    /// The adapter's config (PEFT semantics), with LoRA.
    pub lora: Option<kiln_lora::LoraConfig>,
}

impl Built {
    /// The adapter's `lora_dropout` (0 without LoRA).
    pub fn lora_dropout(&self) -> f64 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout)
    }
}

/// Builds the model every rank starts from: the pretrained weights or a seeded random init,
/// with the LoRA adapter attached (a loaded PEFT adapter, whose `adapter_config.json` then gives
/// r, alpha, dropout and targets, or a fresh one from the seed).
pub fn build_model(
    config: &TrainConfig,
    model_config: &LlamaConfig,
    device: &Device,
) -> Result<Built> {
    let model = match &config.model.pretrained {
        Some(dir) => Llama::from_pretrained(dir, device, DType::F32)?.1,
        None => Llama::random(model_config, config.train.seed, device, DType::F32)?,
    };
    if !lora_on(config) {
        return Ok(Built {
            model,
            trainable: |_| true,
            lora: None,
        });
    }
    let mut lora_model = LoraModel::new(model);
    match &config.lora.adapter {
        Some(dir) => lora_model.load_adapter("default", dir)?,
        None => {
            let fresh = fresh_lora_config(config);
            lora_model.add_adapter("default", fresh, config.train.seed ^ 0x4C6F_5241)?
        }
    }
    // The config of the adapter as attached (for a loaded one, its adapter_config.json).
    let lora = lora_model.config("default")?.clone();
    Ok(Built {
        model: lora_model.into_model(),
        trainable: |p| p.contains(".lora."),
        lora: Some(lora),
    })
}

/// The engine's configuration of a run: stage, precision policy, AdamW, clipping.
pub fn zero_config(config: &TrainConfig) -> Result<kiln_zero::ZeroConfig> {
    let o = &config.optim;
    Ok(kiln_zero::ZeroConfig {
        stage: config.zero.stage,
        policy: policy_of(&config.precision),
        adamw: AdamWConfig {
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
        },
        group: ParamGroup {
            lr: o.lr,
            weight_decay: o.weight_decay,
        },
        max_grad_norm: o.max_grad_norm,
        recompute: config.zero.recompute,
    })
}

/// Refuses a model that cannot fit in this machine's memory before it is built: every rank of
/// this process (`local_ranks`) builds the whole f32 model, with LoRA adapters of `lora.r`.
pub(super) fn check_model_fits(
    config: &TrainConfig,
    model: &LlamaConfig,
    local_ranks: usize,
) -> Result<()> {
    let params = model.unit_sizes()?.total as f64;
    let lora = if lora_on(config) && config.lora.adapter.is_none() {
        // At most every linear layer: r · (in + out) for q, k, v, o, gate, up, down.
        let (h, i) = (model.hidden_size as f64, model.intermediate_size as f64);
        let q = (model.num_attention_heads * model.head_dim) as f64;
        config.lora.r as f64 * model.num_hidden_layers as f64 * (4.0 * (h + q) + 3.0 * (h + i))
    } else {
        0.0
    };
    let field = match (
        &config.model.pretrained,
        &config.model.config,
        lora > params,
    ) {
        (_, _, true) => "lora.r".to_string(),
        (Some(_), _, _) => "model.pretrained".into(),
        (None, Some(_), _) => "model.config".into(),
        (None, None, _) => "model.preset".into(),
    };
    crate::fits::check_fits(
        &field,
        &format!(
            "{local_ranks} rank(s) of a model of {params:.3e} parameters{} in f32 (with AdamW state)",
            if lora > 0.0 {
                format!(" and LoRA adapters of {lora:.3e}")
            } else {
                String::new()
            }
        ),
        local_ranks as f64 * (params + lora) * 4.0 * 2.0,
    )
}

/// A model holding `params` (HF paths; with LoRA, the factors at [`kiln_lora::burn_factor_path`]),
/// cast to `dtype`: each value is moved into the model, never a second copy of the whole model.
pub fn model_from_params(
    model_config: &LlamaConfig,
    lora: Option<&kiln_lora::LoraConfig>,
    params: Vec<(String, burn::tensor::TensorData)>,
    device: &Device,
    dtype: DType,
) -> Result<Llama> {
    let mut source = TensorMap::new(params, device, dtype, "the checkpoint's parameters");
    let base = Llama::load(model_config, &mut source)?;
    let factors = source.rest();
    let Some(lora) = lora else {
        if let Some(key) = factors.keys().next() {
            return Err(TrainerError::Checkpoint(format!(
                "parameter `{key}` is not in the model (LoRA factors without a LoRA config?)"
            )));
        }
        return Ok(base);
    };
    // A fresh adapter of the right shapes (r · (in + out) values per target), then the values.
    let mut lora_model = LoraModel::new(base);
    lora_model.add_adapter("default", lora.clone(), 0)?;
    let factors = factors
        .into_iter()
        .map(|(p, d)| (p, d.convert_dtype(dtype)))
        .collect();
    Ok(kiln_zero::load_params(lora_model.into_model(), factors)?)
}
