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
use kiln_models::{LlamaConfig, save_safetensors};

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
pub fn export(checkpoint: &Path, out: &Path, merge: bool, dtype: DType) -> Result<Exported> {
    let (manifest, params) = kiln_zero::read_full_checkpoint(checkpoint)?;
    let (config, lora) = checkpoint_configs(&manifest.extra, checkpoint)?;
    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    let (adapter, base): (Vec<_>, Vec<_>) =
        params.into_iter().partition(|(p, _)| p.contains(".lora."));
    let write_model = |tensors: Vec<(String, TensorData)>| -> Result<Exported> {
        let n = tensors.iter().map(|(_, d)| d.num_elements()).sum();
        save_safetensors(&tensors, dtype, out.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&config.to_hf_json())
            .map_err(|e| TrainerError::Argument(e.to_string()))?;
        std::fs::write(out.join("config.json"), json).map_err(|e| TrainerError::io(out, e))?;
        Ok(Exported {
            files: vec!["model.safetensors".into(), "config.json".into()],
            params: n,
        })
    };
    let Some(lora) = lora else {
        return write_model(base);
    };
    let factors: BTreeMap<String, TensorData> = adapter.into_iter().collect();
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
    let mut merged = Vec::with_capacity(base.len());
    for (path, w0) in base {
        let module = path.strip_suffix(".weight");
        let data = match module.filter(|m| modules.iter().any(|x| x == m)) {
            Some(m) => {
                let t = |d: TensorData| {
                    let shape = d.shape().to_vec();
                    Tensor::<2>::from_data(d.convert_dtype(DType::F32), (&device, DType::F32))
                        .reshape([shape[0], shape[1]])
                };
                let (a, b) = (t(factor(m, Factor::A)?), t(factor(m, Factor::B)?));
                let shape = w0.shape().to_vec();
                let w = t(w0) + b.matmul(a) * scaling;
                TensorData::new(
                    w.into_data()
                        .try_to_vec::<f32>()
                        .map_err(|e| TrainerError::Argument(format!("{path}: {e:?}")))?,
                    shape,
                )
            }
            None => w0,
        };
        merged.push((path, data));
    }
    write_model(merged)
}
