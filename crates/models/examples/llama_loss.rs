//! Loads a Hugging Face Llama folder and prints its causal-LM loss on a batch.
//!
//! `cargo run -p kiln-models --example llama_loss [-- MODEL_DIR [IO_FILE]]`; with no arguments it
//! uses the fixture model and inputs shipped in `fixtures/llama`, whose reference loss comes from
//! transformers.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Device, Int, Tensor};
use kiln_models::{Context, Llama, LlamaConfig, SafetensorsSource, causal_lm_loss};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama");
    let fixture = fixture.canonicalize().unwrap_or(fixture);
    let mut args = std::env::args().skip(1);
    let model_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(fixture.join("model"));
    let io_file = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(fixture.join("io.safetensors"));
    let device = Device::flex();

    let config = LlamaConfig::from_file(model_dir.join("config.json"))?;
    println!(
        "{}: {} parameters, {} layers, {} heads / {} kv heads",
        model_dir.display(),
        config.num_params(),
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
    );

    let io = SafetensorsSource::open(&io_file, &device, DType::F32)?;
    let ids: Tensor<2, Int> = Tensor::from_data(io.data("input_ids")?, &device);
    let labels: Tensor<2, Int> = Tensor::from_data(io.data("labels")?, &device);
    let [batch, seq] = ids.dims();
    for dtype in [DType::F32, DType::BF16] {
        let start = Instant::now();
        let (_, model) = Llama::from_pretrained(&model_dir, &device, dtype)?;
        let loaded = start.elapsed();
        let ctx = Context::new(&config, batch, seq, None, &device, dtype)?;
        let start = Instant::now();
        let loss: f32 =
            causal_lm_loss(model.forward(ids.clone(), &ctx), labels.clone()).into_scalar();
        println!(
            "{dtype:?} weights and compute: loaded in {loaded:.1?}, loss on {batch}x{seq} tokens {loss:.6} in {:.1?}",
            start.elapsed()
        );
    }
    if let Ok(reference) = io.data("loss") {
        let reference: Vec<f32> = reference.try_into_vec()?;
        println!("transformers reference loss: {:.6}", reference[0]);
    }
    Ok(())
}
