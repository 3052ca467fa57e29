//! `kiln export`: a sharded checkpoint to Hugging Face files, with no ranks needed.
//!
//! - full fine-tune: `model.safetensors` + `config.json` (loadable by transformers and kiln);
//! - LoRA: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) with the
//!   trained factors, never an empty adapter (`PeftAdapter::save` refuses one);
//! - LoRA with `merge`: the base with `W0 + scaling · B A` folded in, as a plain HF model.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_lora::{Factor, LoraConfig, PeftAdapter, burn_factor_path, peft_key};
use kiln_models::{LlamaConfig, write_safetensors};

use crate::{Result, TrainerError};

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// Files written, relative to the output folder.
    pub files: Vec<String>,
    /// Parameters in the written model or adapter.
    pub params: usize,
}

/// The model config and LoRA config a checkpoint's trainer state carries.
pub fn checkpoint_configs(
    extra: &serde_json::Value,
    path: &Path,
) -> Result<(LlamaConfig, Option<LoraConfig>)> {
    let model = extra.get("model_config").ok_or_else(|| {
        TrainerError::Checkpoint(format!(
            "{}: the manifest's extra has no model_config (not written by kiln train?)",
            path.display()
        ))
    })?;
    let model = LlamaConfig::from_json(&model.to_string())?;
    let lora = match extra.get("lora") {
        Some(v) if !v.is_null() => Some(LoraConfig::from_json(v)?),
        _ => None,
    };
    Ok((model, lora))
}

/// Exports the checkpoint folder `checkpoint` into `out`. With LoRA, writes the PEFT adapter
/// unless `merge`, which writes the merged model instead. `dtype` is the dtype of the model
/// weights written (adapters are written in f32, as PEFT saves them).
///
/// The model is streamed: each tensor is read from the checkpoint (f32), merged with its
/// adapter when asked, written and dropped before the next, so an export holds one tensor
/// (the largest, e.g. the embedding) rather than the model. With tied embeddings the head is
/// the embedding: one tensor is written and no `lm_head.weight`, as transformers expects.
pub fn export(checkpoint: &Path, out: &Path, merge: bool, dtype: DType) -> Result<Exported> {
    let reader = kiln_zero::CheckpointReader::open(checkpoint)?;
    let (config, lora) = checkpoint_configs(&reader.manifest().extra, checkpoint)?;
    crate::out::create_dir(out, "--out")?;
    let (adapter, base): (Vec<_>, Vec<_>) = reader
        .params()
        .map(|(p, s)| (p.to_string(), s.to_vec()))
        .filter(|(p, _)| !(config.tie_word_embeddings && p == "lm_head.weight"))
        .partition(|(p, _)| p.contains(".lora."));
    let write_model = |value: &dyn Fn(&str) -> Result<TensorData>| -> Result<Exported> {
        let n = base.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        write_safetensors(out.join("model.safetensors"), &base, dtype, |i| {
            value(&base[i].0)
        })?;
        let json = serde_json::to_string_pretty(&config.to_hf_json())
            .map_err(|e| TrainerError::Argument(e.to_string()))?;
        std::fs::write(out.join("config.json"), json).map_err(|e| TrainerError::io(out, e))?;
        Ok(Exported {
            files: vec!["model.safetensors".into(), "config.json".into()],
            params: n,
        })
    };
    let read = |path: &str| -> Result<TensorData> { Ok(reader.read(path)?) };
    let Some(lora) = lora else {
        return write_model(&read);
    };
    // The adapter factors are small (r · (in + out) per target): read them all.
    let factors: BTreeMap<String, TensorData> = adapter
        .iter()
        .map(|(p, _)| Ok((p.clone(), read(p)?)))
        .collect::<Result<_>>()?;
    let modules: Vec<String> = factors
        .keys()
        .filter_map(|k| k.strip_suffix(".weight.lora.b").map(str::to_string))
        .collect();
    if modules.is_empty() {
        return Err(TrainerError::Checkpoint(format!(
            "{}: the run used LoRA but the checkpoint holds no adapter factors",
            checkpoint.display()
        )));
    }
    let factor = |module: &str, f: Factor| -> Result<TensorData> {
        let key = burn_factor_path(module, f);
        factors
            .get(&key)
            .cloned()
            .ok_or_else(|| TrainerError::Checkpoint(format!("{}: no {key}", checkpoint.display())))
    };
    if !merge {
        let mut tensors = BTreeMap::new();
        for m in &modules {
            tensors.insert(peft_key(m, Factor::A), factor(m, Factor::A)?);
            tensors.insert(peft_key(m, Factor::B), factor(m, Factor::B)?);
        }
        let params = tensors.values().map(|d| d.num_elements()).sum();
        PeftAdapter {
            config: lora,
            tensors,
        }
        .save(out)?;
        return Ok(Exported {
            files: vec![
                "adapter_config.json".into(),
                "adapter_model.safetensors".into(),
            ],
            params,
        });
    }
    let device = Device::flex();
    let scaling = lora.scaling();
    let merged = |path: &str| -> Result<TensorData> {
        let w0 = read(path)?;
        let module = path
            .strip_suffix(".weight")
            .filter(|m| modules.iter().any(|x| x == m));
        let Some(m) = module else {
            return Ok(w0);
        };
        let t = |d: TensorData| {
            let shape = d.shape().to_vec();
            Tensor::<2>::from_data(d.convert_dtype(DType::F32), (&device, DType::F32))
                .reshape([shape[0], shape[1]])
        };
        let (a, b) = (t(factor(m, Factor::A)?), t(factor(m, Factor::B)?));
        let shape = w0.shape().to_vec();
        let w = t(w0) + b.matmul(a) * scaling;
        Ok(TensorData::new(
            w.into_data()
                .try_to_vec::<f32>()
                .map_err(|e| TrainerError::Argument(format!("{path}: {e:?}")))?,
            shape,
        ))
    };
    write_model(&merged)
}
