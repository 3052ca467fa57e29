//! Llama, compatible with Hugging Face `config.json` and safetensors checkpoints.
//!
//! The model is a stack of units (embedding, decoder blocks, norm + head) that callers may run one
//! at a time; it knows nothing of ranks or precision policies.
//!
//! Inference: [`Llama::forward_cached`] runs new positions against a [`KvCache`] (a prefill of
//! left-padded prompts, then one-token steps) and [`generate()`] decodes greedily or with nucleus
//! sampling from a [`GenerateConfig`].

pub mod cache;
pub mod config;
pub mod error;
pub mod generate;
pub mod layers;
pub mod llama;
pub mod loss;
pub mod rng;
pub mod source;
#[cfg(feature = "wgpu")]
pub mod testing;
pub mod weights;

use std::path::Path;

use burn::tensor::{DType, Device};

pub use cache::{KvCache, LayerCache};
pub use config::{LlamaConfig, RopeScaling, UnitSizes};
pub use error::{ModelError, Result};
pub use generate::{GenerateConfig, generate};
pub use layers::{AdapterDropout, Linear};
pub use llama::{Context, DecoderLayer, Llama, UnitId, unit_of};
pub use loss::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_sum};
pub use rng::SplitMix64;
pub use source::{Init, ParamSource, RandomInit, TensorMap};
pub use weights::{
    CONFIG_CAP, SafetensorsSource, first_non_finite, named_tensors, open_regular, read_text_capped,
    save_safetensors, write_safetensors,
};

impl Llama {
    /// Loads a HF model folder (`config.json` + safetensors) with its weights cast to `dtype`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<(LlamaConfig, Llama)> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let mut source = SafetensorsSource::open(dir, device, dtype)?;
        let model = Llama::load(&config, &mut source)?;
        source.finish()?;
        Ok((config, model))
    }

    /// A freshly initialised model: the same values for the same seed on every machine.
    pub fn random(config: &LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Llama> {
        Llama::load(config, &mut RandomInit::new(seed, device, dtype))
    }
}
