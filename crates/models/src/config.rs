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

/// Parameters per unit of a Llama ([`LlamaConfig::unit_sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitSizes {
    /// `model.embed_tokens`.
    pub embed: usize,
    /// One decoder block.
    pub block: usize,
    /// The final norm and, unless tied, `lm_head`.
    pub head: usize,
    /// The whole model.
    pub total: usize,
}

impl UnitSizes {
    /// The largest unit (what ZeRO-3 gathers at once).
    pub fn largest(&self) -> usize {
        self.embed.max(self.block).max(self.head)
    }
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
        let text = crate::weights::read_text_capped(path, crate::weights::CONFIG_CAP).map_err(
            |source| ModelError::Io {
                path: path.into(),
                source,
            },
        )?;
        // Every error names the file: a bad field of `config.json` is reported as
        // `dir/config.json: config field `rope_theta`: ...`.
        Self::from_json(&text).map_err(|e| ModelError::Parse {
            path: path.into(),
            reason: match e {
                ModelError::Input(reason) => reason,
                other => other.to_string(),
            },
        })
    }

    /// Parses and validates the text of a HF `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        // serde_path_to_error names the field of a wrong type (`hidden_size: invalid type ...`).
        let raw: HfConfig =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| {
                    let path = e.path().to_string();
                    match path.as_str() {
                        "" | "." => ModelError::Input(e.into_inner().to_string()),
                        _ => {
                            ModelError::Input(format!("config field `{path}`: {}", e.into_inner()))
                        }
                    }
                })?;
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let nested_theta = match rope.and_then(|r| r.get("rope_theta")) {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                bad(
                    "rope_parameters.rope_theta",
                    format!("expected a number, found {v}"),
                )
            })?),
        };
        let rope_theta = raw.rope_theta.or(nested_theta).unwrap_or(10_000.0);
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
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            // HF's `_validate_llama3_parameters` (it only warns): a factor below 1, equal low
            // and high factors or no original context make the frequencies inf or NaN.
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(bad(
                    "rope_parameters.factor",
                    format!("{factor} must be a number >= 1 (llama3 rope)"),
                ));
            }
            if !(low_freq_factor.is_finite() && low_freq_factor > 0.0) {
                return Err(bad(
                    "rope_parameters.low_freq_factor",
                    format!("{low_freq_factor} must be a positive number (llama3 rope)"),
                ));
            }
            if !(high_freq_factor.is_finite() && high_freq_factor > low_freq_factor) {
                return Err(bad(
                    "rope_parameters.high_freq_factor",
                    format!(
                        "{high_freq_factor} must be a number above low_freq_factor {low_freq_factor} (llama3 rope)"
                    ),
                ));
            }
            if original_max_position_embeddings == 0 {
                return Err(bad(
                    "rope_parameters.original_max_position_embeddings",
                    "must be positive (llama3 rope)",
                ));
            }
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
        self.unit_sizes()?;
        Ok(())
    }

    /// Parameters of the embedding, of one decoder block and of the head unit (final norm, and
    /// `lm_head` unless tied), computed without building the key table, with checked arithmetic:
    /// a config whose sizes overflow is an error naming the sizes, not a wrapped count.
    pub fn unit_sizes(&self) -> Result<UnitSizes> {
        let overflow = || {
            bad(
                "hidden_size",
                format!(
                    "the sizes (vocab_size {}, hidden_size {}, intermediate_size {}, {} layers, {} heads of {}) \
                     give more than 2^64 parameters",
                    self.vocab_size,
                    self.hidden_size,
                    self.intermediate_size,
                    self.num_hidden_layers,
                    self.num_attention_heads,
                    self.head_dim
                ),
            )
        };
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(overflow);
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = mul(self.num_attention_heads, d)?;
        let kv = mul(self.num_key_value_heads, d)?;
        let embed = mul(self.vocab_size, h)?;
        // q, o: q·h each; k, v: kv·h each; gate, up, down: i·h each; two norms: h each.
        let attn = mul(q.checked_add(kv).ok_or_else(overflow)?, mul(2, h)?)?;
        let block = [attn, mul(mul(3, i)?, h)?, mul(2, h)?]
            .into_iter()
            .try_fold(0usize, |a, b| a.checked_add(b))
            .ok_or_else(overflow)?;
        let head = if self.tie_word_embeddings {
            h
        } else {
            embed.checked_add(h).ok_or_else(overflow)?
        };
        let total = mul(block, self.num_hidden_layers)?
            .checked_add(embed)
            .and_then(|t| t.checked_add(head))
            .ok_or_else(overflow)?;
        Ok(UnitSizes {
            embed,
            block,
            head,
            total,
        })
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

    /// Ψ: the number of parameters (a validated config's count fits in `usize`).
    pub fn num_params(&self) -> usize {
        self.unit_sizes().map_or(usize::MAX, |s| s.total)
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
                format!(
                    "llama3 rope needs a number `{key}`, found {}",
                    rope.get(key).unwrap_or(&serde_json::Value::Null)
                ),
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: {
                let key = "original_max_position_embeddings";
                let v = rope.get(key).unwrap_or(&serde_json::Value::Null);
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        bad(
                            "rope_parameters.original_max_position_embeddings",
                            format!("expected a positive integer, found {v}"),
                        )
                    })?
            },
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
