//! `LoraConfig`: PEFT's `LoraConfig`, its defaults and its `adapter_config.json` encoding.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::error::{LoraError, Result};

/// Which modules get an adapter. A module is named by its path without the `.weight` suffix
/// (`model.layers.0.self_attn.q_proj`), exactly as PEFT names `nn.Module`s.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// PEFT's list form: a module matches when its name equals an entry or ends with `.<entry>`.
    Names(Vec<String>),
    /// PEFT's string form: a regular expression that must match the whole module name.
    Regex(String),
    /// PEFT's `"all-linear"`: every linear layer except the output head `lm_head`.
    AllLinear,
}

impl Default for TargetModules {
    /// PEFT's default for Llama (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]`).
    fn default() -> Self {
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl TargetModules {
    /// A predicate on module names. `is_linear` says whether the module is a linear layer
    /// (used by `AllLinear` only).
    pub(crate) fn matcher(&self) -> Result<impl Fn(&str, bool) -> bool + '_> {
        let regex = match self {
            TargetModules::Regex(pattern) => Some(
                Regex::new(&format!("^(?:{pattern})$")).map_err(|e| LoraError::Config {
                    field: "target_modules",
                    reason: format!("invalid regular expression {pattern:?}: {e}"),
                })?,
            ),
            _ => None,
        };
        Ok(move |module: &str, is_linear: bool| match self {
            TargetModules::Names(names) => names.iter().any(|t| {
                module == t
                    || module
                        .strip_suffix(t.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
            TargetModules::Regex(_) => regex.as_ref().is_some_and(|r| r.is_match(module)),
            TargetModules::AllLinear => is_linear && module.rsplit('.').next() != Some("lm_head"),
        })
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(names) => json!(names),
            TargetModules::Regex(pattern) => json!(pattern),
            TargetModules::AllLinear => json!("all-linear"),
        }
    }

    fn from_json(value: &Value) -> Result<Self> {
        match value {
            Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
            Value::String(s) => Ok(TargetModules::Regex(s.clone())),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .map(TargetModules::Names)
                .ok_or_else(|| bad("target_modules", "a list must hold only strings")),
            Value::Null => Ok(TargetModules::default()),
            other => Err(bad(
                "target_modules",
                format!("expected a list or a string, found {other}"),
            )),
        }
    }
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

/// How a fresh adapter starts. B is zero either way, so a fresh adapter changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT `init_lora_weights=True`: A ~ torch `kaiming_uniform_(a=sqrt(5))`, i.e.
    /// U(-1/sqrt(in_features), 1/sqrt(in_features)).
    #[default]
    Kaiming,
    /// PEFT `init_lora_weights="gaussian"`: A ~ N(0, std = 1/r), as PEFT's `normal_(std=1/r)`.
    Gaussian,
}

/// PEFT's `LoraConfig` (the fields kiln acts on), with PEFT's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update `B A` (PEFT `r`, default 8).
    pub r: usize,
    /// PEFT `lora_alpha` (default 8): the update is scaled by `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub alpha: f64,
    /// PEFT `lora_dropout` (default 0): dropout on the adapter's input in training, applied by
    /// layers that run the adapter on activations (kiln-models' `Linear`; see the crate docs).
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// rsLoRA scaling `alpha / sqrt(r)` (PEFT `use_rslora`, default false).
    pub use_rslora: bool,
    /// PEFT `init_lora_weights`.
    pub init: LoraInit,
    /// PEFT `fan_in_fan_out`: true when the base weights are stored `[in, out]` (GPT-2 `Conv1D`,
    /// burn-nn `Linear`); false (default) for HF `nn.Linear` layout `[out, in]`.
    pub fan_in_fan_out: bool,
    /// PEFT `task_type` (`"CAUSAL_LM"`, ...; default none).
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    /// Every other `adapter_config.json` field, written back unchanged.
    pub other: BTreeMap<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            init: LoraInit::Kaiming,
            fan_in_fan_out: false,
            task_type: None,
            base_model_name_or_path: None,
            other: BTreeMap::new(),
        }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> LoraError {
    LoraError::Config {
        field,
        reason: reason.into(),
    }
}

/// PEFT 0.21's `adapter_config.json` fields that kiln does not act on, at the values meaning
/// "feature off". A config whose value differs from these asks for something kiln cannot do.
fn inert_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!({})),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("inference_mode", json!(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_bias", json!(false)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        ("modules_to_save", Value::Null),
        ("monteclora_config", Value::Null),
        ("qalora_group_size", json!(16)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_parameters", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
        ("velora_config", Value::Null),
    ]
}

/// Fields that may hold any value without changing what the adapter computes.
const HARMLESS: &[&str] = &[
    "auto_mapping",
    "inference_mode",
    "megatron_core",
    "qalora_group_size",
    "revision",
    "loftq_config",
    "peft_version",
];

impl LoraConfig {
    /// The factor applied to `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        match self.use_rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }

    /// Checks the values kiln relies on.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(bad("r", "must be at least 1"));
        }
        // alpha = 0 makes the adapter a no-op that still trains, a negative one flips it:
        // neither is what a user means (kiln's TOML `lora.alpha` refuses them too).
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(
                "lora_alpha",
                format!("must be a positive number, found {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.dropout),
            ));
        }
        self.target_modules.matcher().map(|_| ())
    }

    /// The `adapter_config.json` object, with every field PEFT 0.21 writes.
    pub fn to_json(&self) -> Value {
        let mut map: Map<String, Value> = inert_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        map.extend(self.other.iter().map(|(k, v)| (k.clone(), v.clone())));
        let alpha = match self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            true => json!(self.alpha as i64),
            false => json!(self.alpha),
        };
        let init = match self.init {
            LoraInit::Kaiming => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
        };
        map.insert(
            "base_model_name_or_path".into(),
            json!(self.base_model_name_or_path),
        );
        map.insert("fan_in_fan_out".into(), json!(self.fan_in_fan_out));
        map.insert("init_lora_weights".into(), init);
        map.insert("lora_alpha".into(), alpha);
        map.insert("lora_dropout".into(), json!(self.dropout));
        map.insert("peft_type".into(), json!("LORA"));
        map.insert("r".into(), json!(self.r));
        map.insert("target_modules".into(), self.target_modules.to_json());
        map.insert("task_type".into(), json!(self.task_type));
        map.insert("use_rslora".into(), json!(self.use_rslora));
        Value::Object(map)
    }

    /// Reads an `adapter_config.json` file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        // At most 64 MB: a device or an endless pipe is an error, not a read that fills memory.
        let read = || -> std::io::Result<String> {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)?
                .take(64 << 20)
                .read_to_string(&mut text)?;
            Ok(text)
        };
        let text = read().map_err(|source| LoraError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| LoraError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json).map_err(|e| LoraError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads an `adapter_config.json` object. Refuses configs that ask for something kiln does not
    /// do (DoRA, biases, per-module ranks, ...), naming the field.
    pub fn from_json(value: &Value) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| bad("(root)", "adapter_config.json must hold a JSON object"))?;
        let get = |k: &str| map.get(k).unwrap_or(&Value::Null);
        match get("peft_type").as_str() {
            Some("LORA") => {}
            other => {
                return Err(bad(
                    "peft_type",
                    format!("expected \"LORA\", found {other:?}"),
                ));
            }
        }
        let r = get("r").as_u64().ok_or_else(|| {
            bad(
                "r",
                format!("expected a positive integer, found {}", get("r")),
            )
        })? as usize;
        let alpha = get("lora_alpha").as_f64().ok_or_else(|| {
            bad(
                "lora_alpha",
                format!("expected a number, found {}", get("lora_alpha")),
            )
        })?;
        let dropout = match get("lora_dropout") {
            Value::Null => 0.0,
            v => v
                .as_f64()
                .ok_or_else(|| bad("lora_dropout", format!("expected a number, found {v}")))?,
        };
        let flag = |field: &'static str| match get(field) {
            Value::Null => Ok(false),
            v => v
                .as_bool()
                .ok_or_else(|| bad(field, format!("expected a boolean, found {v}"))),
        };
        let init = match get("init_lora_weights") {
            Value::Bool(true) | Value::Null => LoraInit::Kaiming,
            Value::String(s) if s == "gaussian" => LoraInit::Gaussian,
            other => {
                return Err(LoraError::Unsupported(format!(
                    "adapter config field `init_lora_weights` = {other} (kiln knows true and \"gaussian\")"
                )));
            }
        };
        let text = |field: &'static str| match get(field) {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            v => Err(bad(field, format!("expected a string, found {v}"))),
        };
        let inert = inert_fields();
        for (field, off) in &inert {
            let value = get(field);
            let is_off = value == off
                || value.is_null()
                || (value.as_object().is_some_and(|o| o.is_empty()));
            if !is_off && !HARMLESS.contains(field) {
                return Err(LoraError::Unsupported(format!(
                    "adapter config field `{field}` = {value} (kiln supports {off})"
                )));
            }
        }
        let known = [
            "base_model_name_or_path",
            "fan_in_fan_out",
            "init_lora_weights",
            "lora_alpha",
            "lora_dropout",
            "peft_type",
            "r",
            "target_modules",
            "task_type",
            "use_rslora",
        ];
        let config = Self {
            r,
            alpha,
            dropout,
            target_modules: TargetModules::from_json(get("target_modules"))?,
            use_rslora: flag("use_rslora")?,
            init,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            task_type: text("task_type")?,
            base_model_name_or_path: text("base_model_name_or_path")?,
            // Inert fields at their defaults are implied; anything else is written back as read.
            other: map
                .iter()
                .filter(|(k, v)| {
                    !known.contains(&k.as_str())
                        && !inert.iter().any(|(f, off)| f == k && off == *v)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_match_by_suffix_on_dot_boundaries_as_peft() {
        let t = TargetModules::Names(vec!["q_proj".into()]);
        let m = t.matcher().unwrap();
        assert!(m("model.layers.0.self_attn.q_proj", true));
        assert!(m("q_proj", true));
        assert!(!m("model.layers.0.self_attn.xq_proj", true));
    }

    #[test]
    fn a_string_target_is_a_full_match_regex() {
        let t = TargetModules::Regex(r".*\.(q|v)_proj".into());
        let m = t.matcher().unwrap();
        assert!(m("model.layers.0.self_attn.v_proj", true));
        assert!(!m("model.layers.0.self_attn.v_proj.extra", true));
        assert!(!TargetModules::Regex("q_proj".into()).matcher().unwrap()(
            "a.q_proj", true
        ));
    }

    #[test]
    fn all_linear_skips_the_output_head() {
        let m_all = TargetModules::AllLinear;
        let m = m_all.matcher().unwrap();
        assert!(m("model.layers.0.mlp.up_proj", true));
        assert!(!m("lm_head", true));
        assert!(!m("model.embed_tokens", false));
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_sqrt_r() {
        let c = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scaling(), 2.0);
        let rs = LoraConfig {
            use_rslora: true,
            ..c
        };
        assert_eq!(rs.scaling(), 8.0);
    }

    #[test]
    fn json_round_trips_and_refuses_dora() {
        let c = LoraConfig {
            target_modules: TargetModules::Regex(".*proj".into()),
            init: LoraInit::Gaussian,
            alpha: 1.5,
            ..Default::default()
        };
        assert_eq!(LoraConfig::from_json(&c.to_json()).unwrap(), c);
        let mut dora = c.to_json();
        dora["use_dora"] = json!(true);
        let err = LoraConfig::from_json(&dora).unwrap_err().to_string();
        assert!(err.contains("use_dora"), "{err}");
    }
}
