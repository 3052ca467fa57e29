//! The built-in models.

use kiln_models::LlamaConfig;

use crate::error::{Result, TrainerError};

/// Names of the built-in model presets ([`preset_config`]).
pub const PRESETS: &[&str] = &["tiny-addition"];

/// The `LlamaConfig` of a built-in preset (see [`PRESETS`]).
///
/// `tiny-addition`: vocabulary 259 (the byte tokenizer), hidden 64, intermediate 172, 2 layers,
/// 4 heads (2 key/value heads), rope θ 10000, 64 positions: 124,096 parameters.
pub fn preset_config(name: &str) -> Result<LlamaConfig> {
    let json = match name {
        "tiny-addition" => format!(
            r#"{{
                "vocab_size": {vocab},
                "hidden_size": 64,
                "intermediate_size": 172,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rope_theta": 10000.0,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false
            }}"#,
            vocab = crate::data::BYTE_VOCAB_SIZE
        ),
        other => {
            return Err(TrainerError::invalid(
                "model.preset",
                format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
            ));
        }
    };
    Ok(LlamaConfig::from_json(&json)?)
}
