//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::LoraConfig;
use crate::error::{LoraError, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix for a `LoraModel` wrapped in a `PeftModel`: `base_model.model.<module path>`.
pub const KEY_PREFIX: &str = "base_model.model.";

/// One of the two factors of a LoRA update `B A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Factor {
    /// `lora_A`: `[r, in_features]`.
    A,
    /// `lora_B`: `[out_features, r]`.
    B,
}

/// The PEFT key of a factor: `base_model.model.<module>.lora_A.weight`.
pub fn peft_key(module: &str, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!("{KEY_PREFIX}{module}.{f}.weight")
}

/// The module and factor of a PEFT key, or `None` for any other key.
pub fn parse_key(key: &str) -> Option<(&str, Factor)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        return Some((module, Factor::A));
    }
    rest.strip_suffix(".lora_B.weight").map(|m| (m, Factor::B))
}

/// The contents of a PEFT adapter folder, as on disk: the config and the tensors by PEFT key.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub tensors: BTreeMap<String, TensorData>,
}

/// `(A, B)` of one module.
pub type FactorPair<'a> = (&'a TensorData, &'a TensorData);

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LoraConfig::from_file(dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let read = || -> std::io::Result<Vec<u8>> {
            if !std::fs::metadata(&weights_path)?.is_file() {
                return Err(std::io::Error::other(
                    "not a regular file (a folder, device or pipe)",
                ));
            }
            std::fs::read(&weights_path)
        };
        let bytes = read().map_err(|source| LoraError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let bad_file = |reason: String| LoraError::Safetensors {
            path: weights_path.clone(),
            reason,
        };
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad_file(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (key, view) in file.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::F64 => DType::F64,
                other => {
                    return Err(bad_file(format!(
                        "tensor `{key}` has dtype {other:?}; kiln reads F32, F16, BF16, F64"
                    )));
                }
            };
            let data =
                TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
            // A NaN or inf factor poisons every forward and step: refuse it at the door.
            if let Some((index, value)) =
                data.iter::<f32>().enumerate().find(|(_, v)| !v.is_finite())
            {
                return Err(LoraError::NonFinite {
                    path: weights_path.clone(),
                    key,
                    index,
                    value,
                });
            }
            tensors.insert(key, data);
        }
        let adapter = Self { config, tensors };
        adapter.pairs(&weights_path.display().to_string())?;
        Ok(adapter)
    }

    /// The factors of every module, checked: each key is a PEFT LoRA key, each module has both
    /// factors, and they are non-empty 2-D tensors of rank `config.r`.
    pub fn pairs(&self, source_name: &str) -> Result<BTreeMap<String, FactorPair<'_>>> {
        let unexpected = |key: &str, reason: String| LoraError::UnexpectedKey {
            key: key.into(),
            reason,
            source_name: source_name.into(),
        };
        let mut halves: BTreeMap<&str, [Option<&TensorData>; 2]> = BTreeMap::new();
        for (key, data) in &self.tensors {
            let (module, factor) = parse_key(key).ok_or_else(|| {
                unexpected(
                    key,
                    format!(
                        "kiln reads `{KEY_PREFIX}<module>.lora_A.weight` and `.lora_B.weight` only"
                    ),
                )
            })?;
            halves.entry(module).or_default()[factor as usize] = Some(data);
        }
        let r = self.config.r;
        let mut pairs = BTreeMap::new();
        for (module, [a, b]) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some(_), None) => {
                    return Err(unexpected(
                        &peft_key(module, Factor::A),
                        "its lora_B is missing".into(),
                    ));
                }
                _ => {
                    return Err(unexpected(
                        &peft_key(module, Factor::B),
                        "its lora_A is missing".into(),
                    ));
                }
            };
            for (data, factor) in [(a, Factor::A), (b, Factor::B)] {
                let shape = data.shape().as_slice();
                let rank_dim = if factor == Factor::A { 0 } else { 1 };
                if shape.len() != 2 || shape.contains(&0) || shape[rank_dim] != r {
                    return Err(unexpected(
                        &peft_key(module, factor),
                        format!("shape {shape:?} is not a non-empty 2-D factor of rank r={r}"),
                    ));
                }
            }
            pairs.insert(module.to_string(), (a, b));
        }
        Ok(pairs)
    }

    /// Writes the folder; each file goes to a temporary name first and is renamed when complete.
    /// Refuses an empty adapter or one with missing, empty or mis-shaped factors (as a ZeRO-3
    /// gather gone wrong produces), so a broken adapter never replaces a good one.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let weights_path = dir.join(WEIGHTS_FILE);
        let incomplete = |reason: String| LoraError::Incomplete {
            path: dir.to_path_buf(),
            reason,
        };
        if self.tensors.is_empty() {
            return Err(incomplete("the adapter holds no tensors".into()));
        }
        self.pairs(&weights_path.display().to_string())
            .map_err(|e| incomplete(e.to_string()))?;
        self.config.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| LoraError::Io {
            path: dir.to_path_buf(),
            source,
        })?;

        let views = self
            .tensors
            .iter()
            .map(|(key, data)| {
                let dtype = match data.dtype() {
                    DType::F32 => Dtype::F32,
                    DType::F16 => Dtype::F16,
                    DType::BF16 => Dtype::BF16,
                    DType::F64 => Dtype::F64,
                    other => return Err(incomplete(format!("tensor `{key}` has dtype {other:?}"))),
                };
                safetensors::tensor::TensorView::new(dtype, data.shape().to_vec(), data.as_bytes())
                    .map(|view| (key.clone(), view))
                    .map_err(|e| incomplete(format!("tensor `{key}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let tmp = tmp_path(&weights_path);
        safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
            LoraError::Safetensors {
                path: tmp.clone(),
                reason: e.to_string(),
            }
        })?;
        rename(&tmp, &weights_path)?;

        let config_path = dir.join(CONFIG_FILE);
        let mut json = self.config.to_json();
        // PEFT writes the resolved module names, not "all-linear".
        if self.config.target_modules == crate::TargetModules::AllLinear {
            let mut names: Vec<&str> = self
                .tensors
                .keys()
                .filter_map(|k| parse_key(k))
                .filter_map(|(m, _)| m.rsplit('.').next())
                .collect();
            names.sort();
            names.dedup();
            json["target_modules"] = serde_json::json!(names);
        }
        let text = serde_json::to_string_pretty(&json).map_err(|source| LoraError::Json {
            path: config_path.clone(),
            source,
        })?;
        let tmp = tmp_path(&config_path);
        std::fs::write(&tmp, text).map_err(|source| LoraError::Io {
            path: tmp.clone(),
            source,
        })?;
        rename(&tmp, &config_path)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| LoraError::Io {
        path: to.to_path_buf(),
        source,
    })
}
