//! Properties of the model that need no reference file: GQA equals repeated kv heads, running the
//! units one at a time with detached boundaries gives the full model's gradients, and random init
//! is deterministic.

mod common;

use std::collections::HashMap;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::*;
use kiln_models::{Context, Llama, LlamaConfig, TensorMap, causal_lm_loss, named_tensors};

fn tiny(kv_heads: usize) -> LlamaConfig {
    LlamaConfig::from_json(&format!(
        r#"{{"vocab_size": 48, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0}}"#
    ))
    .unwrap()
}

fn ids(config: &LlamaConfig, batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 7 + 3) % config.vocab_size) as i64)
        .collect();
    Tensor::from_data(TensorData::new(v, [batch, seq]), device)
}

#[test]
fn grouped_query_attention_equals_repeated_kv_heads() {
    let device = Device::flex();
    let (gqa, mha) = (tiny(2), tiny(4));
    let model = Llama::random(&gqa, 11, &device, DType::F32).unwrap();
    let d = gqa.head_dim;
    let mut tensors: HashMap<String, TensorData> = named_tensors(&model).into_iter().collect();
    for layer in 0..gqa.num_hidden_layers {
        for proj in ["k_proj", "v_proj"] {
            let key = format!("model.layers.{layer}.self_attn.{proj}.weight");
            let rows: Vec<f32> = tensors[&key].clone().try_into_vec().unwrap();
            let h = gqa.hidden_size;
            // Query head j reads kv head j / 2: kv head k of the MHA model is GQA kv head k / 2.
            let repeated: Vec<f32> = (0..mha.num_key_value_heads)
                .flat_map(|k| rows[(k / 2) * d * h..(k / 2 + 1) * d * h].to_vec())
                .collect();
            tensors.insert(
                key,
                TensorData::new(repeated, [mha.num_key_value_heads * d, h]),
            );
        }
    }
    let repeated = Llama::load(
        &mha,
        &mut TensorMap::new(tensors, &device, DType::F32, "the repeated kv heads"),
    )
    .unwrap();
    let x = ids(&gqa, 2, 9, &device);
    let ctx = Context::new(&gqa, 2, 9, None, &device, DType::F32).unwrap();
    let diff = max_abs_diff(
        &to_vec(model.forward(x.clone(), &ctx)),
        &to_vec(repeated.forward(x, &ctx)),
    );
    assert!(diff <= 1e-5, "GQA vs repeated kv heads: {diff}");
}

#[test]
fn unit_by_unit_backward_equals_whole_model_backward() {
    let device = Device::flex().autodiff();
    let config = tiny(2);
    let model = Llama::random(&config, 5, &device, DType::F32).unwrap();
    let (batch, seq) = (3, 8);
    let x = ids(&config, batch, seq, &device);
    let mask: Vec<i64> = (0..batch * seq)
        .map(|i| i64::from(!(i / seq == 1 && i % seq < 3)))
        .collect();
    let ctx = Context::new(&config, batch, seq, Some(&mask), &device, DType::F32).unwrap();

    let whole = named_grads(
        &model,
        &causal_lm_loss(model.forward(x.clone(), &ctx), x.clone()).backward(),
    );

    // Forward unit by unit, keeping only the detached input of each block.
    let mut inputs = vec![];
    let mut h = model.embed(x.clone()).detach();
    for layer in &model.model.layers {
        inputs.push(h.clone());
        h = layer.forward(h, &ctx).detach();
    }
    // Backward in reverse, feeding each unit its upstream gradient.
    let mut per_unit = vec![];
    let h_in = h.require_grad();
    let grads = causal_lm_loss(model.head(h_in.clone(), &ctx), x.clone()).backward();
    let mut upstream = h_in.grad(&grads).unwrap();
    per_unit.extend(named_grads(&model, &grads));
    for (layer, input) in model.model.layers.iter().zip(inputs).rev() {
        let input = input.require_grad();
        let grads = (layer.forward(input.clone(), &ctx) * upstream.clone())
            .sum()
            .backward();
        upstream = input.grad(&grads).unwrap();
        per_unit.extend(named_grads(&model, &grads));
    }
    let grads = (model.embed(x) * upstream).sum().backward();
    per_unit.extend(named_grads(&model, &grads));

    assert_eq!(per_unit.len(), whole.len());
    for (path, reference) in &whole {
        let (_, ours) = per_unit.iter().find(|(p, _)| p == path).unwrap();
        let diff = max_abs_diff(ours, reference);
        assert!(
            diff <= 1e-5 * max_abs(reference).max(1e-6),
            "{path}: {diff}"
        );
    }
}

#[test]
fn random_init_is_deterministic_and_seeded() {
    let device = Device::flex();
    let config = tiny(2);
    let a = named_tensors(&Llama::random(&config, 1, &device, DType::F32).unwrap());
    let b = named_tensors(&Llama::random(&config, 1, &device, DType::F32).unwrap());
    let c = named_tensors(&Llama::random(&config, 2, &device, DType::F32).unwrap());
    assert_eq!(a, b);
    assert_ne!(a, c);
    let (_, q) = a
        .iter()
        .find(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let q: Vec<f32> = q.clone().try_into_vec().unwrap();
    let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.004, "init std {std}");
    let (_, norm) = a.iter().find(|(k, _)| k == "model.norm.weight").unwrap();
    assert!(
        norm.clone()
            .try_into_vec::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0)
    );
}

/// Two examples packed into one row (segments 1, 2, positions restarting at 0) give each
/// example's logits as if it were alone in its row, in f32 and bf16, with padding after them.
#[test]
fn a_packed_row_computes_each_example_alone() {
    let device = Device::flex();
    let config = tiny(2);
    for dtype in [DType::F32, DType::BF16] {
        let model = Llama::random(&config, 5, &device, dtype).unwrap();
        let (a, b, pad) = (7usize, 5usize, 2usize);
        let seq = a + b + pad;
        let tokens: Vec<i64> = (0..seq).map(|i| ((i * 5 + 1) % 48) as i64).collect();
        let segments: Vec<u32> = (0..seq)
            .map(|i| {
                if i < a {
                    1
                } else if i < a + b {
                    2
                } else {
                    0
                }
            })
            .collect();
        let positions: Vec<i64> = (0..seq)
            .map(|i| if i < a { i } else if i < a + b { i - a } else { 0 } as i64)
            .collect();
        let ctx = Context::packed(&config, 1, seq, &segments, &positions, &device, dtype).unwrap();
        let row = Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [1, seq]), &device);
        let packed = to_vec(model.forward(row, &ctx));
        let vocab = config.vocab_size;
        for (start, len) in [(0, a), (a, b)] {
            let alone = Tensor::<2, Int>::from_data(
                TensorData::new(tokens[start..start + len].to_vec(), [1, len]),
                &device,
            );
            let ctx = Context::new(&config, 1, len, None, &device, dtype).unwrap();
            let want = to_vec(model.forward(alone, &ctx));
            let got = &packed[start * vocab..(start + len) * vocab];
            let tol = if dtype == DType::F32 { 1e-5 } else { 3e-2 } * max_abs(&want).max(1.0);
            let diff = max_abs_diff(got, &want);
            assert!(
                diff <= tol,
                "{dtype:?}: example at {start}: {diff} (tolerance {tol})"
            );
        }
    }
}

#[test]
fn packed_rows_reject_positions_outside_the_model() {
    let device = Device::flex();
    let config = tiny(2);
    let max = config.max_position_embeddings as i64;
    let err = Context::packed(&config, 1, 2, &[1, 1], &[0, max], &device, DType::F32).unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    let err = Context::packed(&config, 1, 3, &[1, 1], &[0, 1], &device, DType::F32).unwrap_err();
    assert!(err.to_string().contains("segment ids"), "{err}");
}
