//! The key/value cache and generation: cached logits equal the uncached forward at every
//! position (also for a left-padded batch), greedy generation equals a naive argmax loop over the
//! full forward, and sampling is seeded and validated.

mod common;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::*;
use kiln_models::{
    Context, GenerateConfig, KvCache, Llama, LlamaConfig, RandomInit, SplitMix64, generate,
};

/// The HF fixture model (MHA, default rope).
fn fixture() -> (LlamaConfig, Llama) {
    let root = fixtures().join("llama/model");
    Llama::from_pretrained(root, &Device::flex(), DType::F32).unwrap()
}

/// A tiny random model with grouped-query attention and llama3 rope scaling. Weights are drawn
/// wider than HF's 0.02 so that logits are well apart and argmax is not decided by rounding.
fn tiny_gqa() -> (LlamaConfig, Llama) {
    let config = LlamaConfig::from_json(
        r#"{"vocab_size": 48, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 64,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}"#,
    )
    .unwrap();
    let mut init = RandomInit::new(5, &Device::flex(), DType::F32);
    init.std = 0.3;
    let model = Llama::load(&config, &mut init).unwrap();
    (config, model)
}

fn models() -> Vec<(&'static str, LlamaConfig, Llama)> {
    let (fc, fm) = fixture();
    let (tc, tm) = tiny_gqa();
    vec![("fixture", fc, fm), ("tiny_gqa", tc, tm)]
}

/// Deterministic token ids for `len` positions of row `row`.
fn tokens(config: &LlamaConfig, row: usize, len: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7 + row * 13 + 3) % config.vocab_size) as i64)
        .collect()
}

/// Left-pads `rows` to one width: (ids, attention mask), both `[batch, width]` row-major.
fn left_pad(rows: &[Vec<i64>]) -> (Vec<i64>, Vec<i64>, usize) {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (vec![], vec![]);
    for r in rows {
        let pad = width - r.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, r.len())));
    }
    (ids, mask, width)
}

fn int2(v: Vec<i64>, batch: usize, seq: usize) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v, [batch, seq]), &Device::flex())
}

/// Columns `from..from + len` of a `[batch, width]` row-major buffer.
fn columns(v: &[i64], batch: usize, width: usize, from: usize, len: usize) -> Vec<i64> {
    (0..batch)
        .flat_map(|b| v[b * width + from..b * width + from + len].to_vec())
        .collect()
}

/// Runs the prompts (left-padded) and `steps` more tokens per row through the uncached forward,
/// then through the cache in chunks (`chunks` of the prompt width, then one token at a time),
/// and compares the logits of every real position.
fn check_cached_parity(
    name: &str,
    config: &LlamaConfig,
    model: &Llama,
    prompts: &[Vec<i64>],
    chunks: &[usize],
    steps: usize,
    capacity: usize,
) {
    let batch = prompts.len();
    let rows: Vec<Vec<i64>> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| {
            let mut r = p.clone();
            r.extend(tokens(config, b + 5, steps));
            r
        })
        .collect();
    // Pad on the left by the prompt padding only: continuation tokens are real in every row.
    let prompt_width = prompts.iter().map(Vec::len).max().unwrap();
    let rows_padded: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![-1; prompt_width + steps - r.len()];
            v.extend(r);
            v
        })
        .collect();
    let total = prompt_width + steps;
    let ids: Vec<i64> = rows_padded.concat().iter().map(|&t| t.max(0)).collect();
    let mask: Vec<i64> = rows_padded
        .concat()
        .iter()
        .map(|&t| (t >= 0) as i64)
        .collect();
    let padded = mask.contains(&0);

    let device = Device::flex();
    let ctx = Context::new(
        config,
        batch,
        total,
        padded.then_some(mask.as_slice()),
        &device,
        DType::F32,
    )
    .unwrap();
    let full = to_vec(model.forward(int2(ids.clone(), batch, total), &ctx));
    let vocab = config.vocab_size;
    let scale = max_abs(&full);

    let mut cache = KvCache::with_capacity(config, batch, capacity);
    let mut spans: Vec<usize> = chunks.to_vec();
    assert_eq!(spans.iter().sum::<usize>(), prompt_width);
    spans.extend(std::iter::repeat_n(1, steps));
    let mut from = 0;
    let mut worst = 0.0f32;
    for len in spans {
        let chunk_mask = columns(&mask, batch, total, from, len);
        let logits = model
            .forward_cached(
                int2(columns(&ids, batch, total, from, len), batch, len),
                padded.then_some(chunk_mask.as_slice()),
                &mut cache,
            )
            .unwrap();
        assert_eq!(logits.dims(), [batch, len, vocab]);
        let ours = to_vec(logits);
        for b in 0..batch {
            for i in 0..len {
                let pos = from + i;
                if mask[b * total + pos] == 0 {
                    continue;
                }
                let a = &ours[(b * len + i) * vocab..(b * len + i + 1) * vocab];
                let e = &full[(b * total + pos) * vocab..(b * total + pos + 1) * vocab];
                worst = worst.max(max_abs_diff(a, e));
            }
        }
        from += len;
        assert_eq!(cache.len(), from);
    }
    eprintln!(
        "{name}: cached vs full logits, max abs diff {worst:e} (max|logits| {scale}, capacity {capacity})"
    );
    assert!(worst <= 1e-4 * scale, "{name}: {worst} > 1e-4 * {scale}");
}

#[test]
fn cached_logits_equal_the_full_forward() {
    for (name, config, model) in models() {
        let prompt = vec![tokens(&config, 0, 7)];
        for capacity in [0, 32, 9] {
            // Prefill of the whole prompt, then one-token steps; capacity 9 outgrows its buffer.
            check_cached_parity(name, &config, &model, &prompt, &[7], 6, capacity);
        }
        // A prompt fed in chunks: several new positions after cached ones.
        check_cached_parity(name, &config, &model, &prompt, &[1, 4, 2], 3, 0);
    }
}

#[test]
fn cached_logits_equal_the_full_forward_for_a_left_padded_batch() {
    for (name, config, model) in models() {
        let prompts = vec![tokens(&config, 0, 3), tokens(&config, 1, 8)];
        for capacity in [0, 32] {
            check_cached_parity(name, &config, &model, &prompts, &[8], 6, capacity);
        }
        check_cached_parity(name, &config, &model, &prompts, &[6, 2], 4, 0);
    }
}

/// Greedy decoding by re-running the full forward on the whole left-padded batch each step.
fn naive_greedy(
    config: &LlamaConfig,
    model: &Llama,
    prompts: &[Vec<i64>],
    max_new: usize,
    eos: Option<i64>,
) -> Vec<Vec<i64>> {
    let batch = prompts.len();
    let (mut ids, mut mask, mut width) = left_pad(prompts);
    let mut out = vec![vec![]; batch];
    let mut done = vec![false; batch];
    for _ in 0..max_new {
        let ctx = Context::new(
            config,
            batch,
            width,
            Some(&mask),
            &Device::flex(),
            DType::F32,
        )
        .unwrap();
        let logits = to_vec(model.forward(int2(ids.clone(), batch, width), &ctx));
        let vocab = config.vocab_size;
        let mut next = vec![];
        for b in 0..batch {
            let row = &logits[(b * width + width - 1) * vocab..(b * width + width) * vocab];
            let best =
                (0..vocab).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as i64;
            if !done[b] {
                out[b].push(best);
                done[b] = eos == Some(best);
            }
            next.push(best);
        }
        let (mut ids2, mut mask2) = (vec![], vec![]);
        for b in 0..batch {
            ids2.extend_from_slice(&ids[b * width..(b + 1) * width]);
            ids2.push(next[b]);
            mask2.extend_from_slice(&mask[b * width..(b + 1) * width]);
            mask2.push(1);
        }
        (ids, mask, width) = (ids2, mask2, width + 1);
        if done.iter().all(|&d| d) {
            break;
        }
    }
    out
}

fn greedy(max_new_tokens: usize, eos_token_id: Option<i64>) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens,
        eos_token_id,
        greedy: true,
        ..GenerateConfig::default()
    }
}

#[test]
fn greedy_generation_equals_a_naive_argmax_loop() {
    let device = Device::flex();
    for (name, config, model) in models() {
        let prompts = vec![
            tokens(&config, 0, 3),
            tokens(&config, 1, 7),
            tokens(&config, 2, 5),
        ];
        let expected = naive_greedy(&config, &model, &prompts, 10, None);
        let ours = generate(&model, &config, &prompts, &greedy(10, None), &device).unwrap();
        eprintln!("{name}: greedy {ours:?}");
        assert_eq!(ours, expected, "{name}");

        // Stop at EOS per row: take a token that row 0 produces as EOS.
        let eos = expected[0][3];
        let expected = naive_greedy(&config, &model, &prompts, 10, Some(eos));
        let ours = generate(&model, &config, &prompts, &greedy(10, Some(eos)), &device).unwrap();
        assert_eq!(ours, expected, "{name} with eos {eos}");
        assert_eq!(ours[0].len(), expected[0].len());
        assert!(ours[0].len() <= 4 && ours[0].last() == Some(&eos), "{name}");

        // Each prompt alone (no padding) gives the same tokens as in the padded batch.
        for (p, batched) in prompts.iter().zip(&ours) {
            let alone = generate(
                &model,
                &config,
                std::slice::from_ref(p),
                &greedy(10, Some(eos)),
                &device,
            )
            .unwrap();
            assert_eq!(
                &alone[0], batched,
                "{name}: prompt {p:?} alone vs in the batch"
            );
        }
    }
}

fn sampling(seed: u64, top_p: f64, temperature: f64) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: 12,
        temperature,
        top_p,
        seed,
        eos_token_id: None,
        greedy: false,
    }
}

#[test]
fn sampling_is_seeded_and_a_tiny_top_p_is_greedy() {
    let device = Device::flex();
    for (name, config, model) in models() {
        let prompts = vec![tokens(&config, 0, 4), tokens(&config, 1, 6)];
        let greedy_tokens =
            generate(&model, &config, &prompts, &greedy(12, None), &device).unwrap();
        let nucleus_of_one =
            generate(&model, &config, &prompts, &sampling(3, 1e-9, 1.0), &device).unwrap();
        assert_eq!(
            nucleus_of_one, greedy_tokens,
            "{name}: top_p -> 0 is greedy"
        );

        let a = generate(&model, &config, &prompts, &sampling(7, 0.9, 1.5), &device).unwrap();
        let b = generate(&model, &config, &prompts, &sampling(7, 0.9, 1.5), &device).unwrap();
        let c = generate(&model, &config, &prompts, &sampling(8, 0.9, 1.5), &device).unwrap();
        eprintln!("{name}: seed 7 {a:?}, seed 8 {c:?}");
        assert_eq!(a, b, "{name}: same seed, same samples");
        assert_ne!(a, c, "{name}: another seed, other samples");
        assert!(a.iter().all(|r| r.len() == 12));
        assert!(
            a.concat()
                .iter()
                .all(|&t| (0..config.vocab_size as i64).contains(&t))
        );
    }
}

#[test]
fn bad_generate_values_name_the_field() {
    let (config, model) = tiny_gqa();
    let device = Device::flex();
    let prompts = vec![tokens(&config, 0, 3)];
    let cases: Vec<(&str, GenerateConfig, Vec<Vec<i64>>)> = vec![
        ("temperature", sampling(0, 0.9, 0.0), prompts.clone()),
        ("temperature", sampling(0, 0.9, -1.0), prompts.clone()),
        ("temperature", sampling(0, 0.9, f64::NAN), prompts.clone()),
        ("top_p", sampling(0, 0.0, 1.0), prompts.clone()),
        ("top_p", sampling(0, 1.5, 1.0), prompts.clone()),
        ("top_p", sampling(0, f64::NAN, 1.0), prompts.clone()),
        ("prompts", greedy(4, None), vec![]),
        (
            "prompts",
            greedy(4, None),
            vec![tokens(&config, 0, 3), vec![]],
        ),
        ("prompts", greedy(4, None), vec![vec![1, 48]]),
        ("prompts", greedy(4, None), vec![vec![-1, 2]]),
    ];
    for (field, settings, prompts) in cases {
        let err = generate(&model, &config, &prompts, &settings, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
    }
    // Greedy ignores the sampling values; zero new tokens is an empty answer.
    let mut g = greedy(0, None);
    g.temperature = 0.0;
    assert_eq!(
        generate(&model, &config, &prompts, &g, &device).unwrap(),
        vec![Vec::<i64>::new()]
    );
}

#[test]
fn the_cache_checks_its_inputs() {
    let (config, model) = tiny_gqa();
    let mut cache = KvCache::new(&config, 2);
    let ids = int2(tokens(&config, 0, 3), 1, 3);
    assert!(model.forward_cached(ids, None, &mut cache).is_err());
    let ids = int2(tokens(&config, 0, 6), 2, 3);
    assert!(
        model
            .forward_cached(ids, Some(&[1, 1]), &mut cache)
            .is_err()
    );
    assert!(cache.is_empty());
}

#[test]
fn splitmix64_is_the_reference_stream() {
    // The first output of SplitMix64 seeded with 0 (Vigna's reference implementation).
    assert_eq!(SplitMix64::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    let mut rng = SplitMix64::new(1);
    assert!(
        (0..1000)
            .map(|_| rng.next_f64())
            .all(|u| (0.0..1.0).contains(&u))
    );
}
