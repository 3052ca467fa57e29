//! `data.packing = true` changes how examples sit in rows, never what is learned: the loss of
//! the packed rows equals the loss of the same examples one per padded row (the reference:
//! each example alone, a plain causal mask), token for token.

use burn::tensor::{DType, Device};
use kiln_models::{Llama, LlamaConfig, causal_lm_loss_sum};
use kiln_trainer::config::{DataConfig, Task};
use kiln_trainer::data::{Dataset, Example, Tokenizer};
use kiln_trainer::train::batch_of;

fn tiny() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 259, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 128}"#,
    )
    .unwrap()
}

/// Every training row of a jsonl dataset, packed or not.
fn rows(path: &std::path::Path, packing: bool) -> Vec<Example> {
    let config = DataConfig {
        task: Task::Jsonl,
        paths: vec![path.to_path_buf()],
        seq_len: 48,
        eval_examples: 0,
        packing,
        ..DataConfig::default()
    };
    let d = Dataset::new(&config, Tokenizer::Byte, 0).unwrap();
    let n = d.rows_per_epoch().unwrap() as usize;
    d.global_batch(&mut Default::default(), n).unwrap()
}

/// (loss sum, tokens in the loss) over `rows`, three rows a micro-batch as training cuts them.
fn loss(model: &Llama, config: &LlamaConfig, rows: &[Example], plain_mask: bool) -> (f64, f64) {
    let device = Device::flex();
    let (mut sum, mut count) = (0.0, 0.0);
    for micro in rows.chunks(3) {
        let mut batch = batch_of(config, micro, &device, DType::F32, None).unwrap();
        if plain_mask {
            let [b, s] = batch.ids.dims();
            batch.ctx = kiln_models::Context::new(config, b, s, None, &device, DType::F32).unwrap();
        }
        let (s, c) = causal_lm_loss_sum(model.forward(batch.ids.clone(), &batch.ctx), batch.labels);
        sum += f64::from(scalar(s));
        count += f64::from(scalar(c));
    }
    (sum, count)
}

fn scalar(t: burn::tensor::Tensor<1>) -> f32 {
    t.into_data().iter::<f32>().next().unwrap()
}

#[test]
fn packed_rows_have_the_loss_of_the_examples_alone() {
    let dir = std::env::temp_dir().join(format!("kiln-packing-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sft.jsonl");
    // Prompts and responses of many lengths (3..=30 tokens per example with BOS/EOS), mixing
    // both supervised shapes.
    let lines: String = (0..14)
        .map(|i| {
            let prompt: String = (0..(i * 5) % 17 + 1)
                .map(|k| (b'a' + (k * 3 + i) as u8 % 26) as char)
                .collect();
            let answer: String = (0..(i * 3) % 11 + 1)
                .map(|k| (b'0' + (k + i) as u8 % 10) as char)
                .collect();
            let key = if i % 2 == 0 { "response" } else { "completion" };
            format!("{{\"prompt\": \"{prompt}\", \"{key}\": \"{answer}\"}}\n")
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    let (unpacked, packed) = (rows(&path, false), rows(&path, true));
    assert_eq!(unpacked.len(), 14);
    assert!(
        packed.len() < unpacked.len() / 2,
        "{} packed rows",
        packed.len()
    );
    assert!(packed.iter().all(|r| r.segments.is_some()));
    let config = tiny();
    let model = Llama::random(&config, 3, &Device::flex(), DType::F32).unwrap();
    let (want_sum, want_count) = loss(&model, &config, &unpacked, false);
    let (sum, count) = loss(&model, &config, &packed, false);
    assert_eq!(count, want_count, "tokens in the loss");
    let rel = ((sum - want_sum) / want_sum).abs();
    assert!(rel <= 1e-5, "packed loss {sum} vs {want_sum} ({rel:e})");
    // The comparison can fail: without the segment mask and restarted positions the examples
    // of a row see each other.
    // (A random model attends almost uniformly, so the leak is small, but far above 1e-5.)
    let (leaky, _) = loss(&model, &config, &packed, true);
    let leak = ((leaky - want_sum) / want_sum).abs();
    assert!(leak > 1e-4, "{leaky} vs {want_sum} ({leak:e})");
}
