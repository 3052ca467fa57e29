//! Training with LoRA: init leaves the model unchanged, only the factors train and hold optimizer
//! state, the loss falls while the base stays bit-identical; switching, disabling, merging.

mod common;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::*;
use kiln_lora::{LoraConfig, LoraInit, LoraModel, TargetModules};
use kiln_models::{AdapterDropout, Llama, LlamaConfig, causal_lm_loss};

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": false}"#,
    )
    .unwrap()
}

/// A fixed batch: `[batch, seq]` token ids with a simple pattern to learn.
fn batch(config: &LlamaConfig, device: &Device) -> Tensor<2, Int> {
    let (b, s) = (4, 12);
    let ids: Vec<i64> = (0..b * s)
        .map(|i| ((i * 7 + i / s) % config.vocab_size) as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [b, s]), device)
}

#[test]
fn a_fresh_adapter_has_kaiming_a_zero_b_and_leaves_logits_unchanged() {
    let device = Device::flex();
    let config = tiny_config();
    let model = Llama::random(&config, 3, &device, DType::F32).unwrap();
    let ids = batch(&config, &device);
    let ctx = context(&config, &ids, &device);
    let before = to_vec(model.forward(ids.clone(), &ctx));

    let mut lora = LoraModel::new(model);
    lora.add_adapter("kaiming", LoraConfig::default(), 1)
        .unwrap();
    let peft = lora.to_peft("kaiming").unwrap();
    assert!(!peft.tensors.is_empty());
    for (key, data) in &peft.tensors {
        let values = data.clone().try_into_vec::<f32>().unwrap();
        if key.contains("lora_A") {
            let fan_in = data.shape()[1];
            let bound = (6.0 / ((1.0 + 5.0) * fan_in as f64)).sqrt() as f32;
            assert!((bound - 1.0 / (fan_in as f32).sqrt()).abs() < 1e-7);
            assert!(
                values.iter().all(|v| v.abs() <= bound),
                "{key}: outside ±{bound}"
            );
            // Not degenerate: the values spread over most of the interval.
            assert!(
                max_abs(&values) > 0.9 * bound,
                "{key}: max {} of {bound}",
                max_abs(&values)
            );
        } else {
            assert!(
                values.iter().all(|&v| v == 0.0),
                "{key}: B must start at zero"
            );
        }
    }
    let after = to_vec(lora.model().forward(ids.clone(), &ctx));
    assert_eq!(
        before, after,
        "a fresh adapter must leave the logits exactly unchanged"
    );

    let gaussian = LoraConfig {
        init: LoraInit::Gaussian,
        r: 4,
        ..LoraConfig::default()
    };
    lora.add_adapter("gaussian", gaussian, 2).unwrap();
    let peft = lora.to_peft("gaussian").unwrap();
    let a: Vec<f32> = peft
        .tensors
        .iter()
        .filter(|(k, _)| k.contains("lora_A"))
        .flat_map(|(_, d)| d.clone().try_into_vec::<f32>().unwrap())
        .collect();
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    assert!(
        (std - 0.25).abs() < 0.03,
        "gaussian A std {std}, PEFT uses 1/r = 0.25"
    );
}

#[test]
fn targets_follow_peft_rules() {
    let device = Device::flex();
    let config = tiny_config();
    let lora = LoraModel::new(Llama::random(&config, 3, &device, DType::F32).unwrap());
    let all = lora
        .targets(&LoraConfig {
            target_modules: TargetModules::AllLinear,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 7 * config.num_hidden_layers, "{all:?}");
    assert!(all.iter().all(|m| m != "lm_head" && !m.contains("embed")));
    let regex = lora
        .targets(&LoraConfig {
            target_modules: TargetModules::Regex(r"model\.layers\.1\..*\.(k|o)_proj".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        regex,
        [
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.o_proj"
        ]
    );
    let err = lora
        .targets(&LoraConfig {
            target_modules: TargetModules::Names(vec!["nothing".into()]),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("nothing"), "{err}");
}

#[test]
fn fine_tuning_lowers_the_loss_trains_only_the_factors_and_keeps_the_base_bit_identical() {
    fine_tune(0.0);
}

/// The same with PEFT's `lora_dropout`, applied by the model's linear layers to the adapters'
/// input (a new mask every step), as a PEFT training loop in `train()` mode does.
#[test]
fn fine_tuning_with_lora_dropout_lowers_the_loss_and_keeps_the_base_bit_identical() {
    fine_tune(0.1);
}

fn fine_tune(dropout: f64) {
    let device = Device::flex().autodiff();
    let config = tiny_config();
    let model = Llama::random(&config, 11, &device, DType::F32).unwrap();
    let base_before = params(&model);
    let mut lora = LoraModel::new(model);
    let lora_config = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: TargetModules::AllLinear,
        dropout,
        ..LoraConfig::default()
    };
    lora.add_adapter("task", lora_config.clone(), 5).unwrap();

    // PEFT's count: trainable = r (in + out) per target; all = base + adapter.
    let targets = lora.targets(&lora_config).unwrap();
    let expected: usize = targets
        .iter()
        .map(|m| lora.weights()[m].shape.iter().sum::<usize>() * lora_config.r)
        .sum();
    let counts = lora.trainable_parameters();
    println!("{counts}");
    assert_eq!(counts.trainable, expected);
    assert_eq!(counts.all, config.num_params() + expected);

    let ids = batch(&config, &device);
    let ctx = context(&config, &ids, &device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let adapter_ids = lora.adapter_param_ids();
    assert_eq!(adapter_ids.len(), 2 * targets.len());
    let mut losses = vec![];
    for step in 0..40 {
        let p = lora.config("task").unwrap().dropout;
        let ctx = ctx
            .clone()
            .with_adapter_dropout(AdapterDropout::new(p, step, 0).unwrap());
        let loss = causal_lm_loss(lora.model().forward(ids.clone(), &ctx), ids.clone());
        losses.push(to_vec(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), lora.model());
        if step == 0 {
            assert_eq!(
                grads.len(),
                adapter_ids.len(),
                "gradients exist for the factors only"
            );
            assert!(adapter_ids.iter().all(|id| grads.get::<2>(*id).is_some()));
        }
        lora.map_model(|m| optim.step(2e-2, m, grads));
    }
    // AdamW keeps two moments per parameter it has stepped: exactly the factors.
    assert_eq!(
        optim.to_record().len(),
        2 * adapter_ids.len(),
        "optimizer state beyond the factors"
    );
    eprintln!("loss: {:?}", losses);
    // A random base with a frozen head bounds how far the loss can fall (its logits are small),
    // so ask for a clear, steady fall rather than a fit.
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        losses.windows(10).all(|w| w[9] < w[0]),
        "loss not falling steadily: {losses:?}"
    );
    assert!(last < 0.9 * first, "loss did not fall: {first} -> {last}");

    let live: Vec<(String, Vec<f32>)> = params(lora.model())
        .into_iter()
        .filter(|(p, _)| !p.contains(".lora."))
        .collect();
    assert_eq!(live.len(), base_before.len());
    for ((p, before), (q, after)) in base_before.iter().zip(&live) {
        assert_eq!(p, q);
        let same = before
            .iter()
            .zip(after)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "base weight {p} changed during LoRA training");
    }
}

#[test]
fn switching_disabling_and_merging_adapters() {
    let device = Device::flex();
    let (config, model) = fixture_llama(&device);
    let cases = lora_cases();
    let io = Io::open(&cases[0].1);
    let ids = io.ints::<2>("input_ids", &device);
    let ctx = context(&config, &ids, &device);
    let base_logits = to_vec(model.forward(ids.clone(), &ctx));
    let base_weights = params(&model);

    let mut lora = LoraModel::new(model);
    let names: Vec<String> = cases
        .iter()
        .map(|(dir, _)| dir.file_name().unwrap().to_string_lossy().into())
        .collect();
    for ((dir, _), name) in cases.iter().zip(&names) {
        lora.load_adapter(name, dir).unwrap();
    }
    assert_eq!(
        lora.active_adapter(),
        Some(names[0].as_str()),
        "the first adapter loaded is active"
    );
    let run = |lora: &LoraModel<Llama>| to_vec(lora.model().forward(ids.clone(), &ctx));

    lora.disable_adapters().unwrap();
    assert_eq!(
        run(&lora),
        base_logits,
        "disabled adapters must give the base logits exactly"
    );
    for _round in 0..2 {
        for ((_, io_path), name) in cases.iter().zip(&names) {
            lora.set_adapter(name).unwrap();
            let reference = Io::open(io_path).floats("logits");
            let diff = max_abs_diff(&run(&lora), &reference);
            assert!(diff <= 1e-4, "{name}: logits off by {diff} after switching");
            lora.merge().unwrap();
            let diff = max_abs_diff(&run(&lora), &Io::open(io_path).floats("logits_merged"));
            assert!(diff <= 1e-4, "{name}: merged logits off by {diff}");
        }
        // Disabling unmerges, which leaves float rounding in the base (as PEFT's unmerge does).
        lora.disable_adapters().unwrap();
        let diff = max_abs_diff(&run(&lora), &base_logits);
        assert!(
            diff <= 1e-5,
            "disabled adapters: logits {diff} off the base"
        );
    }
    // Two merge/unmerge cycles per adapter; the base drifts by float rounding only.
    let mut worst = 0.0f32;
    for ((p, before), (q, after)) in base_weights.iter().zip(params(lora.base())) {
        assert_eq!(p, &q);
        worst = worst.max(max_abs_diff(before, &after));
    }
    eprintln!("base drift after merge/unmerge cycles: {worst:e}");
    assert!(worst <= 1e-6, "base weights drifted by {worst}");

    let err = lora.set_adapter("nope").unwrap_err();
    assert!(
        err.to_string().contains("nope") && err.to_string().contains(&names[0]),
        "{err}"
    );
    lora.delete_adapter(&names[0]).unwrap();
    assert_eq!(lora.adapter_names(), [names[1].as_str()]);
}
