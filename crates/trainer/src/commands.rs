//! What each `kiln` subcommand does (main.rs only parses and prints errors).

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use kiln_models::{GenerateConfig, Llama, LlamaConfig, causal_lm_loss_sum, generate};
use kiln_zero::{ActivationShape, activation_bytes, estimate_table_with};

use crate::cli::{EstimateArgs, EvalArgs, ExportArgs, GenerateArgs, Recipe, TrainArgs};
use crate::config::{DistBackend, Task, TrainConfig};
use crate::data::{Dataset, Tokenizer, collate};
use crate::train::{
    EvalResult, Resume, TrainSummary, addition_accuracy, checkpoint_config, human,
    model_from_params, policy_of, state_config, tokenizer_for, train,
};
use crate::{Result, TrainerError, say};

/// `kiln train`.
pub fn run_train(args: &TrainArgs) -> Result<TrainSummary> {
    let config = TrainConfig::load(args.config.config.as_deref(), &args.overrides())?;
    match args.recipe {
        None => {}
        Some(Recipe::LoraVsFull) => return run_lora_vs_full(&config).map(|(s, _)| s),
    }
    let resume = match &args.resume {
        None => Resume::No,
        Some(None) => Resume::Latest,
        Some(Some(dir)) => Resume::From(dir.clone()),
    };
    let summary = train(&config, &resume)?;
    if summary.rank == 0 {
        // The run's product is its output folder: a reader of stdout that went away does not
        // change the run's exit code.
        let _ = print_summary(&summary, &config);
    }
    Ok(summary)
}

fn print_summary(s: &TrainSummary, config: &TrainConfig) -> Result<()> {
    let wall = std::time::Duration::from_secs_f64(s.wall_s);
    say!(
        "kiln: {} steps in {} ({:.0} tokens/s) on {} ranks ({}); loss {} -> {}{}\n",
        s.steps,
        human(wall),
        s.tokens_per_s,
        s.world_size,
        s.backend,
        s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        if s.skipped_steps > 0 {
            format!(", {} skipped (inf/nan)", s.skipped_steps)
        } else {
            String::new()
        }
    )?;
    say!(
        "kiln: {} of {} parameters trained; AdamW state {:.2} MB and model state {:.2} MB per rank\n",
        s.trainable_params,
        s.total_params,
        s.optimizer_bytes as f64 / 1e6,
        s.model_state_bytes as f64 / 1e6
    )?;
    match &s.eval {
        Some(e) => print_eval(e)?,
        None if !s.interrupted => say!("kiln: {NO_HELD_OUT}\n")?,
        None => {}
    }
    if let Some(c) = &s.checkpoint {
        say!("kiln: checkpoint {}\n", c.display())?;
    }
    if s.interrupted {
        say!(
            "kiln: interrupted after step {}; continue with `kiln train --resume` (same config)\n",
            s.steps
        )?;
    }
    say!(
        "kiln: metrics {}/metrics.jsonl, loss curve {}/loss.svg\n",
        config.train.output_dir.display(),
        config.train.output_dir.display()
    )
}

/// What a run without held-out rows says instead of a held-out loss.
const NO_HELD_OUT: &str = "no held-out evaluation: the data has no held-out row with a token \
    that counts in the loss (data.eval_examples = 0, fewer than 10 rows of text or JSONL, of \
    which a tenth is held out, or prompts that fill data.seq_len)";

fn print_eval(e: &EvalResult) -> Result<()> {
    say!(
        "kiln: held-out loss {:.4}, perplexity {:.3}{}\n",
        e.loss,
        e.perplexity,
        e.accuracy.map_or(String::new(), |a| format!(
            ", exact-match accuracy {:.1}%",
            a * 100.0
        ))
    )?;
    for (prompt, completion) in &e.samples {
        say!("  {prompt}{completion}\n")?;
    }
    Ok(())
}

/// A model with its config and tokenizer, loaded from a kiln checkpoint or an HF folder.
pub struct Loaded {
    pub model: Llama,
    pub model_config: LlamaConfig,
    pub config: TrainConfig,
    pub tokenizer: Tokenizer,
}

/// Loads a checkpoint (the run's own config, model and tokenizer) or an HF folder (with its
/// `tokenizer.json` when present and `data.tokenizer` is `auto`, see
/// [`crate::train::tokenizer_for`]). `config` is used for an HF folder.
pub fn load_model(
    checkpoint: Option<&Path>,
    pretrained: Option<&Path>,
    config: TrainConfig,
    device: &Device,
) -> Result<Loaded> {
    let (config, model_config, model) = match (checkpoint, pretrained) {
        (Some(dir), _) => {
            // One read of the manifest: the trainer state, the configs and the parameters.
            let (manifest, params) = kiln_zero::read_full_checkpoint(dir)?;
            let (config, _) = state_config(&manifest.extra, dir)?;
            let (model_config, lora) = crate::export::checkpoint_configs(&manifest.extra, dir)?;
            let dtype = policy_of(&config.precision).compute;
            crate::device::check_dtype(device, dtype)?;
            let model = model_from_params(&model_config, lora.as_ref(), params, device, dtype)?;
            (config, model_config, model)
        }
        (None, Some(dir)) => {
            let mut config = config;
            config.model.pretrained = Some(dir.to_path_buf());
            let dtype = policy_of(&config.precision).compute;
            crate::device::check_dtype(device, dtype)?;
            let (model_config, model) = Llama::from_pretrained(dir, device, dtype)?;
            (config, model_config, model)
        }
        (None, None) => {
            return Err(TrainerError::Argument(
                "give --checkpoint DIR or --pretrained DIR".into(),
            ));
        }
    };
    let tokenizer = tokenizer_for(&config, &model_config)?;
    Ok(Loaded {
        model,
        model_config,
        config,
        tokenizer,
    })
}

/// `kiln eval`: held-out loss and perplexity on one process, and exact-match accuracy for the
/// addition task.
pub fn run_eval(args: &EvalArgs) -> Result<EvalResult> {
    let config = TrainConfig::load(args.config.config.as_deref(), &args.config.set)?;
    let device = crate::device::rank_device(&config.dist, DistBackend::Threads, 0)?;
    let loaded = load_model(
        args.source.checkpoint.as_deref(),
        args.source.pretrained.as_deref(),
        config,
        &device,
    )?;
    let mut config = loaded.config.clone();
    if !args.data.is_empty() {
        let jsonl = args
            .data
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "jsonl"));
        config.data.task = if jsonl { Task::Jsonl } else { Task::Text };
        config.data.paths = args.data.clone();
    }
    config.check_seq_len(&loaded.model_config)?;
    let dataset = Dataset::new(&config.data, loaded.tokenizer, config.train.seed)?;
    let dtype = policy_of(&config.precision).compute;
    let (mut sum, mut count) = (0.0f64, 0.0f64);
    for rows in dataset.eval().chunks(config.train.micro_batch.max(1)) {
        let batch =
            crate::train::model_batch(&loaded.model_config, collate(rows)?, &device, dtype)?;
        let logits = loaded.model.forward(batch.ids.clone(), &batch.ctx);
        let (s, c) = causal_lm_loss_sum(logits, batch.labels);
        sum += f64::from(scalar(s)?);
        count += f64::from(scalar(c)?);
    }
    if count == 0.0 {
        return Err(TrainerError::Argument(format!(
            "{} ({} held-out rows)",
            NO_HELD_OUT.replacen("no held-out evaluation", "nothing to evaluate", 1),
            dataset.eval().len()
        )));
    }
    let loss = (sum / count) as f32;
    let (accuracy, samples) = match dataset.addition() {
        Some(task) => {
            let (a, s) = addition_accuracy(
                &loaded.model,
                &device,
                &loaded.model_config,
                task,
                &dataset,
                true,
            )?;
            (Some(a), s)
        }
        None => (None, vec![]),
    };
    let e = EvalResult {
        step: 0,
        loss,
        perplexity: loss.exp(),
        accuracy,
        samples,
    };
    print_eval(&e)?;
    Ok(e)
}

fn scalar(t: burn::tensor::Tensor<1>) -> Result<f32> {
    t.into_data()
        .iter::<f32>()
        .next()
        .ok_or_else(|| TrainerError::Argument("empty loss tensor".into()))
}

/// `kiln generate`: the completion of `--prompt`.
pub fn run_generate(args: &GenerateArgs) -> Result<String> {
    let config = TrainConfig::load(args.config.config.as_deref(), &args.config.set)?;
    let device = crate::device::rank_device(&config.dist, DistBackend::Threads, 0)?;
    let loaded = load_model(
        args.source.checkpoint.as_deref(),
        args.source.pretrained.as_deref(),
        config,
        &device,
    )?;
    let tok = &loaded.tokenizer;
    let limit = loaded.model_config.max_position_embeddings;
    let mut prompt: Vec<i64> = tok.bos().into_iter().collect();
    prompt.extend(tok.encode(&args.prompt)?);
    // Checked before the prefill allocates (a 100 KB prompt's attention is quadratic).
    if prompt.len() > limit {
        return Err(TrainerError::Argument(format!(
            "--prompt: {} tokens, more than the model's max_position_embeddings {limit}",
            prompt.len()
        )));
    }
    let room = limit - prompt.len();
    if args.max_new_tokens > room {
        eprintln!(
            "kiln: warning: --max-new-tokens {} capped to {room}: the prompt's {} tokens and the new \
             ones must fit the model's max_position_embeddings {limit}",
            args.max_new_tokens,
            prompt.len()
        );
    }
    let settings = GenerateConfig {
        max_new_tokens: args.max_new_tokens.min(room),
        temperature: f64::from(args.temperature),
        top_p: f64::from(args.top_p),
        seed: args.seed,
        eos_token_id: Some(tok.eos()),
        greedy: args.greedy,
    };
    let out = generate(
        &loaded.model,
        &loaded.model_config,
        &[prompt],
        &settings,
        &device,
    )?;
    let ids: Vec<i64> = out[0].iter().copied().filter(|&t| t != tok.eos()).collect();
    let text = tok.decode(&ids)?;
    say!("{}{}\n", args.prompt, text)?;
    Ok(text)
}

/// Parameters of the largest unit (embedding, a block, or norm + head) of a config.
pub fn largest_unit(config: &LlamaConfig) -> Result<usize> {
    Ok(config.unit_sizes()?.largest())
}

/// `--name value` must be a finite number `>= min`.
fn finite_at_least(flag: &str, value: f64, min: f64) -> Result<f64> {
    if value.is_finite() && value >= min {
        Ok(value)
    } else {
        Err(TrainerError::Argument(format!(
            "{flag} {value}: must be a finite number >= {min}"
        )))
    }
}

/// `kiln estimate`: the per-rank model-state table (and activations with `--batch --seq`).
pub fn run_estimate(args: &EstimateArgs) -> Result<String> {
    let config = match &args.model {
        Some(path) => Some(LlamaConfig::from_file(path)?),
        None => None,
    };
    let (psi, largest) = match (&config, args.psi) {
        (Some(c), _) => (c.num_params() as f64, largest_unit(c)? as f64),
        (None, Some(psi)) => (finite_at_least("--psi", psi, 0.0)?, 0.0),
        (None, None) => {
            return Err(TrainerError::Argument(
                "give --model config.json or --psi N".into(),
            ));
        }
    };
    let frozen = finite_at_least("--frozen", args.frozen, 0.0)?;
    let k = finite_at_least("--k", args.k, 0.0)?;
    if args.ranks == 0 {
        return Err(TrainerError::Argument(
            "-n/--ranks 0: there must be at least 1 rank".into(),
        ));
    }
    for (flag, v) in [("--batch", args.batch), ("--seq", args.seq)] {
        if v == Some(0) {
            return Err(TrainerError::Argument(format!(
                "{flag} 0: must be at least 1"
            )));
        }
    }
    let mut out = estimate_table_with(psi, frozen, args.ranks, k, largest, false);
    if let Some(stage) = args.stage {
        out += &format!("(stage {stage} selected; all stages shown for comparison)\n");
    }
    if let (None, Some(_)) = (&config, args.batch) {
        out += "(--batch and --seq need --model config.json for the activation memory)\n";
    }
    if let (Some(c), Some(batch), Some(seq)) = (&config, args.batch, args.seq) {
        let shape = ActivationShape {
            batch,
            seq,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            layers: c.num_hidden_layers,
            vocab: c.vocab_size,
            bytes: usize::from(args.activation_bytes),
        };
        out += &format!(
            "activations per rank ({} bytes per element, micro-batch {batch} x {seq}): {:.3} GB kept for backward (stages 0-2 default), {:.3} GB with per-unit recompute (stage 3 default)\n",
            args.activation_bytes,
            activation_bytes(&shape, false) / 1e9,
            activation_bytes(&shape, true) / 1e9
        );
        if seq > c.max_position_embeddings {
            out += &format!(
                "(--seq {seq} is longer than the model's max_position_embeddings {}: kiln would not train it)\n",
                c.max_position_embeddings
            );
        }
    }
    say!("{out}")?;
    Ok(out)
}

/// `kiln export`.
pub fn run_export(args: &ExportArgs) -> Result<PathBuf> {
    let (config, _) = checkpoint_config(&args.checkpoint)?;
    if args.peft && !config.lora.enabled {
        return Err(TrainerError::Argument(format!(
            "{}: --peft needs a LoRA run (lora.enabled = false in its config)",
            args.checkpoint.display()
        )));
    }
    let e = crate::export::export(&args.checkpoint, &args.out, args.merge, DType::F32)?;
    // The export's product is its files; a closed stdout does not fail it.
    let _ = say!(
        "kiln: exported {} parameters to {} ({})\n",
        e.params,
        args.out.display(),
        e.files.join(", ")
    );
    Ok(args.out.clone())
}

/// One row of the LoRA-vs-full table.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeRow {
    pub method: String,
    pub trainable_params: usize,
    pub total_params: usize,
    pub optimizer_bytes: u64,
    pub model_state_bytes: u64,
    pub accuracy: Option<f32>,
    pub wall_s: f64,
}

/// The second built-in recipe, a small analogue of the LoRA paper's comparison: the default job
/// (addition) is the pretrained model; it is fine-tuned on the related subtraction task once
/// with every parameter trained, with LoRA (r = 8, alpha 16) on q_proj, v_proj as in the LoRA
/// paper, and with LoRA on every linear layer, with the same steps, data and ZeRO/precision
/// settings (LoRA at 5x the full fine-tune's learning rate, as is usual). `base` is the default job's config (with
/// the user's overrides); outputs go under `<base.train.output_dir>/lora-vs-full/`.
pub fn run_lora_vs_full(base: &TrainConfig) -> Result<(TrainSummary, Vec<RecipeRow>)> {
    let root = base.train.output_dir.join("lora-vs-full");
    let pretrain_dir = root.join("pretrain");
    let mut pre = base.clone();
    pre.train.output_dir = pretrain_dir.clone();
    let ckpt = match kiln_zero::latest_checkpoint(pretrain_dir.join("checkpoints"))? {
        Some(c) if checkpoint_config(&c)?.1 == pre.train.steps => {
            let _ = say!(
                "kiln recipe: reusing the pretrained model {}\n",
                c.display()
            );
            c
        }
        _ => {
            let _ = say!("kiln recipe: 1/4 pretraining the default job (addition)\n");
            let s = train(&pre, &Resume::No)?;
            if s.rank != 0 {
                return Ok((s, vec![]));
            }
            let _ = print_summary(&s, &pre);
            s.checkpoint.clone().ok_or_else(|| {
                TrainerError::Checkpoint("the pretraining run wrote no checkpoint".into())
            })?
        }
    };
    let hf = pretrain_dir.join("hf");
    crate::export::export(&ckpt, &hf, false, DType::F32)?;

    let mut rows = vec![];
    let mut last = None;
    let q_v = vec!["q_proj".to_string(), "v_proj".to_string()];
    let all_linear: Vec<String> = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .map(String::from)
    .to_vec();
    let runs = [
        ("full fine-tune", None, base.optim.lr * 0.4),
        ("LoRA r=8 (q, v)", Some(q_v), base.optim.lr * 2.0),
        (
            "LoRA r=8 (all linear)",
            Some(all_linear),
            base.optim.lr * 2.0,
        ),
    ];
    let n = runs.len() + 1;
    for (i, (method, targets, lr)) in runs.into_iter().enumerate() {
        let mut c = base.clone();
        c.model.pretrained = Some(hf.clone());
        c.data.operation = crate::data::Operation::Sub;
        c.train.steps = (base.train.steps / 2).max(1);
        c.optim.lr = lr;
        c.lora.enabled = targets.is_some();
        c.lora.r = 8;
        c.lora.alpha = 16.0;
        if let Some(t) = targets {
            c.lora.target_modules = t;
        }
        c.train.output_dir = root.join(format!("finetune-{}", i + 1));
        let _ = say!(
            "kiln recipe: {}/{n} fine-tuning on subtraction: {method}\n",
            i + 2
        );
        let s = train(&c, &Resume::No)?;
        if let (0, Some(e)) = (s.rank, &s.eval) {
            let _ = print_eval(e);
        }
        rows.push(RecipeRow {
            method: method.into(),
            trainable_params: s.trainable_params,
            total_params: s.total_params,
            optimizer_bytes: s.optimizer_bytes,
            model_state_bytes: s.model_state_bytes,
            accuracy: s.eval.as_ref().and_then(|e| e.accuracy),
            wall_s: s.wall_s,
        });
        last = Some(s);
    }
    let last = last.expect("three fine-tunes");
    if last.rank == 0 {
        let _ = say!("{}\n", recipe_table(&rows));
    }
    Ok((last, rows))
}

/// The comparison as a Markdown table.
pub fn recipe_table(rows: &[RecipeRow]) -> String {
    let mut out = String::from(
        "| method | trainable parameters | AdamW state / rank | model state / rank | held-out exact match (subtraction) | wall |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} ({:.2}%) | {:.1} KB | {:.1} KB | {} | {:.0} s |\n",
            r.method,
            r.trainable_params,
            100.0 * r.trainable_params as f64 / r.total_params.max(1) as f64,
            r.optimizer_bytes as f64 / 1e3,
            r.model_state_bytes as f64 / 1e3,
            r.accuracy
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            r.wall_s
        );
    }
    out
}
