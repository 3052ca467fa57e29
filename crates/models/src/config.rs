//! `LlamaConfig`: Hugging Face `config.json`, transformers 4 and 5 layouts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Rotary embedding frequencies: HF `rope_type` `default` or `llama3`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Default,
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The hyperparameters of a Llama, as HF's `LlamaConfig`, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// `config.json` as written by transformers 4 (rope at the top level, `rope_scaling`) or 5
/// (`rope_parameters`); optional fields take HF's defaults.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

fn bad(field: &'static str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        field,
        reason: reason.into(),
    }
}

fn required(field: &'static str, value: Option<usize>) -> Result<usize> {
    match value {
        None => Err(bad(field, "missing")),
        Some(0) => Err(bad(field, "must be positive")),
        Some(v) => Ok(v),
    }
}

impl LlamaConfig {
    /// Reads and validates a HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Input(reason) => ModelError::Parse {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a HF `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: HfConfig =
            serde_json::from_str(text).map_err(|e| ModelError::Input(e.to_string()))?;
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            None => RopeScaling::Default,
            Some(r) => rope_scaling_from(r)?,
        };
        let hidden_size = required("hidden_size", raw.hidden_size)?;
        let num_attention_heads = required("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = required(
            "num_key_value_heads",
            Some(raw.num_key_value_heads.unwrap_or(num_attention_heads)),
        )?;
        let head_dim = match raw.head_dim {
            Some(d) => required("head_dim", Some(d))?,
            None if !hidden_size.is_multiple_of(num_attention_heads) => {
                return Err(bad(
                    "num_attention_heads",
                    format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                ));
            }
            None => hidden_size / num_attention_heads,
        };
        let config = LlamaConfig {
            vocab_size: required("vocab_size", raw.vocab_size)?,
            hidden_size,
            intermediate_size: required("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: required("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
        };
        if raw.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("`{}` is not supported (only silu)", raw.hidden_act),
            ));
        }
        if raw.attention_bias {
            return Err(bad(
                "attention_bias",
                "biases in attention are not supported",
            ));
        }
        if raw.mlp_bias {
            return Err(bad("mlp_bias", "biases in the MLP are not supported"));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the invariants the model relies on; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(bad(
                "rms_norm_eps",
                format!("{} must be a positive number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(bad(
                "rope_theta",
                format!("{} must be a number above 1", self.rope_theta),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(field, "must be positive"));
            }
        }
        Ok(())
    }

    /// Writes the config in transformers-5 layout, so HF can load what kiln exports.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut rope = match self.rope_scaling {
            RopeScaling::Default => serde_json::json!({"rope_type": "default"}),
            RopeScaling::Llama3 { .. } => {
                serde_json::to_value(self.rope_scaling).unwrap_or_default()
            }
        };
        rope["rope_theta"] = self.rope_theta.into();
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
        })
    }

    /// Every parameter of the model with its HF name and shape, in HF `state_dict` order:
    /// the one key table for loading, sharding order, checkpoints and adapters.
    pub fn param_table(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut table = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for layer in 0..self.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            table.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        table.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            table.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        table
    }

    /// Ψ: the number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_table()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

fn rope_scaling_from(rope: &serde_json::Value) -> Result<RopeScaling> {
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let number = |key: &'static str| -> Result<f64> {
        rope.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            bad(
                "rope_parameters",
                format!("llama3 rope needs a number `{key}`"),
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
        }),
        other => Err(bad(
            "rope_parameters",
            format!("rope_type `{other}` is not supported (default, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;

    #[test]
    fn transformers4_layout_with_llama3_rope_and_gqa() {
        let c = LlamaConfig::from_json(V4).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.num_key_value_heads, 2);
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
        let again = LlamaConfig::from_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("num_key_value_heads", serde_json::json!(3)),
            ("rms_norm_eps", serde_json::json!(-1.0)),
            ("hidden_act", serde_json::json!("gelu")),
            ("vocab_size", serde_json::json!(0)),
            ("hidden_size", serde_json::Value::Null),
        ];
        for (field, value) in cases {
            let mut json: serde_json::Value = serde_json::from_str(V4).unwrap();
            json[field] = value;
            let err = LlamaConfig::from_json(&json.to_string())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
