//! `kiln train`: the training loop every rank runs (SPMD), and the launch that starts the ranks.
//!
//! The same config runs on N thread ranks (`dist.world_size`), on ranks that are processes under
//! `mpirun` (detected from the environment; feature `mpi`), or one rank per GPU over NCCL
//! (feature `nccl`). Every rank builds the same model from the same seed, reads the same global
//! batch and keeps its slice; the engine does the rest. Only rank 0 prints and writes files
//! (checkpoints are written by every rank into one folder).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device};
use kiln_dist::{Communicator, LocalWorld, ReduceOp};
use kiln_lora::{LoraModel, TargetModules};
use kiln_models::{
    AdapterDropout, GenerateConfig, Llama, LlamaConfig, SplitMix64, TensorMap, generate,
};
use kiln_precision::{AdamWConfig, ParamGroup, Policy};
use kiln_zero::{Engine, Stage, StepReport, latest_checkpoint};
use serde::{Deserialize, Serialize};

use crate::config::{
    ComputeDtype, DistBackend, PrecisionConfig, ReduceDtype, TokenizerSpec, TrainConfig,
};
use crate::data::{
    AdditionTask, DataPosition, Dataset, Example, Tokenizer, collate, micro_batches, rank_range,
    rank_slice,
};
use crate::metrics::{EvalRecord, MetricsWriter, Progress, ProgressStats, TrainRecord};
use crate::{Result, TrainerError};
use kiln_zero::llama::{Batch, LlamaUnits};

/// Where a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// A fresh run.
    No,
    /// The newest checkpoint under `<output_dir>/checkpoints` (a fresh run if there is none).
    Latest,
    /// This checkpoint folder.
    From(PathBuf),
}

/// Held-out results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub loss: f32,
    pub perplexity: f32,
    /// Exact-match accuracy by greedy generation (tasks that have it).
    pub accuracy: Option<f32>,
    /// A few (prompt, completion) samples.
    pub samples: Vec<(String, String)>,
}

/// What a run did (rank 0's view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub skipped_steps: u64,
    pub wall_s: f64,
    /// Tokens processed per second (rows x seq_len of every step over the loop's wall time).
    pub tokens_per_s: f64,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Optimizer (AdamW moments) bytes per rank.
    pub optimizer_bytes: u64,
    /// Model-state bytes per rank (engine report).
    pub model_state_bytes: u64,
    pub eval: Option<EvalResult>,
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
    pub world_size: usize,
    /// The rank this summary comes from (only rank 0 prints it).
    pub rank: usize,
    pub backend: String,
}

/// The trainer's state in a checkpoint manifest (`extra`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    /// Steps done.
    step: u64,
    data_position: DataPosition,
    skipped_steps: u64,
    model_config: serde_json::Value,
    lora: Option<serde_json::Value>,
    config: String,
}

/// Set by Ctrl-C; every rank checks the all-reduced flag after each step.
fn interrupted_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        if let Err(e) = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C while the checkpoint is written: leave at once. The half
                // written one stays a `.tmp` folder; `latest` still names the one before.
                eprintln!(
                    "\nkiln: second Ctrl-C: leaving without this step's checkpoint; \
                     `kiln train --resume` continues from the newest complete one, if any"
                );
                std::process::exit(130);
            }
            eprintln!("\nkiln: interrupted; saving a checkpoint at the end of this step");
        }) {
            tracing::warn!("no Ctrl-C handler: {e}");
        }
        flag
    })
    .clone()
}

/// Runs `config`, launching its ranks: N threads, or this process as one rank under `mpirun`.
pub fn train(config: &TrainConfig, resume: &Resume) -> Result<TrainSummary> {
    config.validate()?;
    let env = kiln_dist::RankEnv::detect()?;
    let backend = match (config.dist.backend, &env) {
        (DistBackend::Auto, Some(env)) if env.world_size > 1 => DistBackend::Mpi,
        (DistBackend::Auto, _) => DistBackend::Threads,
        (b, _) => b,
    };
    match backend {
        DistBackend::Threads | DistBackend::Auto => {
            let world = config.dist.world_size;
            let out = LocalWorld::run(world, |comm| {
                rank_main(comm, config, resume, "threads").map_err(|e| e.to_string())
            })
            .map_err(|e| TrainerError::Run(e.to_string()))?;
            Ok(out.into_iter().next().expect("rank 0"))
        }
        DistBackend::Mpi => {
            #[cfg(feature = "mpi")]
            {
                let comm = Communicator::mpi()?;
                let threads = kiln_dist::threads_per_rank(1)?;
                kiln_dist::with_threads(threads, || rank_main(comm, config, resume, "mpi"))?
            }
            #[cfg(not(feature = "mpi"))]
            Err(TrainerError::invalid(
                "dist.backend",
                "this kiln was built without the `mpi` feature (cargo build --features mpi)",
            ))
        }
        DistBackend::Nccl => {
            #[cfg(feature = "nccl")]
            {
                let comm = Communicator::nccl()?;
                rank_main(comm, config, resume, "nccl")
            }
            #[cfg(not(feature = "nccl"))]
            Err(TrainerError::invalid(
                "dist.backend",
                "this kiln was built without the `nccl` feature (cargo build --features nccl)",
            ))
        }
    }
}

/// The device a rank computes on: its GPU under NCCL (feature `cuda`), the CPU otherwise.
fn device_for(backend: &str, rank: usize) -> Device {
    #[cfg(feature = "cuda")]
    if backend == "nccl" {
        let local = kiln_dist::RankEnv::detect()
            .ok()
            .flatten()
            .map_or(rank, |e| e.local_rank);
        return Device::cuda(local).autodiff();
    }
    let _ = (backend, rank);
    Device::flex().autodiff()
}

/// The policy of `[precision]`: compute and reduction dtypes, f32 master weights.
pub fn policy_of(precision: &PrecisionConfig) -> Policy {
    let policy = match precision.compute {
        ComputeDtype::F32 => Policy::f32(),
        ComputeDtype::Bf16 => Policy::bf16(),
        ComputeDtype::F16 => Policy::fp16(),
    };
    let reduce = match precision.reduce {
        ReduceDtype::F32 => DType::F32,
        ReduceDtype::Bf16 => DType::BF16,
        ReduceDtype::F16 => DType::F16,
    };
    Policy { reduce, ..policy }
}

/// The stage of `zero.stage`.
pub fn stage_of(stage: u8) -> Result<Stage> {
    Ok(match stage {
        0 => Stage::Ddp,
        1 => Stage::One,
        2 => Stage::Two,
        3 => Stage::Three,
        s => {
            return Err(TrainerError::invalid(
                "zero.stage",
                format!("{s}: must be 0, 1, 2 or 3"),
            ));
        }
    })
}

/// The LoRA config of the run (PEFT semantics), if LoRA is on: the `[lora]` fields, or the
/// `adapter_config.json` of the PEFT adapter the run starts from (`lora.adapter`).
pub fn lora_config(config: &TrainConfig) -> Result<Option<kiln_lora::LoraConfig>> {
    if !lora_on(config) {
        return Ok(None);
    }
    Ok(Some(match &config.lora.adapter {
        Some(dir) => kiln_lora::LoraConfig::from_file(dir.join(kiln_lora::peft::CONFIG_FILE))?,
        None => fresh_lora_config(config),
    }))
}

/// Whether the run trains LoRA adapters (`lora.enabled`, or an adapter to start from).
fn lora_on(config: &TrainConfig) -> bool {
    config.lora.enabled || config.lora.adapter.is_some()
}

/// The adapter the `[lora]` fields describe (a fresh one, without `lora.adapter`).
fn fresh_lora_config(config: &TrainConfig) -> kiln_lora::LoraConfig {
    let l = &config.lora;
    kiln_lora::LoraConfig {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: TargetModules::Names(l.target_modules.clone()),
        use_rslora: l.use_rslora,
        ..Default::default()
    }
}

/// The run's tokenizer: `data.tokenizer`, where `auto` (the default) is the `tokenizer.json` of
/// `model.pretrained` when the folder has one (with its `tokenizer_config.json` and chat
/// template), else the byte tokenizer; a byte-level pretrained model with fewer than 259 ids
/// (too few for kiln's byte tokenizer's BOS/EOS/PAD) gets raw bytes with its own special ids.
/// Refuses a tokenizer whose ids do not fit the model's vocabulary.
pub fn tokenizer_for(config: &TrainConfig, model_config: &LlamaConfig) -> Result<Tokenizer> {
    let folder = config
        .model
        .pretrained
        .as_ref()
        .map(|dir| dir.join("tokenizer.json"))
        .filter(|file| file.is_file());
    let mut tokenizer = match (&config.data.tokenizer, folder) {
        (TokenizerSpec::Auto, Some(file)) => Tokenizer::from_file(&file)?,
        (spec, _) => Tokenizer::from_spec(spec)?,
    };
    if let (Tokenizer::Byte, Some(dir)) = (&tokenizer, &config.model.pretrained)
        && model_config.vocab_size < tokenizer.vocab_size()
    {
        tokenizer = byte_tokenizer_of(dir, model_config)?;
    }
    if tokenizer.vocab_size() > model_config.vocab_size {
        return Err(TrainerError::invalid(
            "data.tokenizer",
            format!(
                "{} ids, more than the model's vocabulary of {}",
                tokenizer.vocab_size(),
                model_config.vocab_size
            ),
        ));
    }
    Ok(tokenizer)
}

/// The byte tokenizer for a byte-level HF model with fewer than 259 ids: raw bytes, with the
/// model's own `bos_token_id` / `eos_token_id` from its `config.json`.
fn byte_tokenizer_of(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    let path = dir.join("config.json");
    let text = kiln_models::read_text_capped(&path, kiln_models::CONFIG_CAP).map_err(|e| {
        TrainerError::Io {
            path: path.clone(),
            source: e,
        }
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainerError::Tokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let eos = special_id(&json, "eos_token_id", &path, config.vocab_size)?.ok_or_else(|| {
        TrainerError::Tokenizer {
            path: path.clone(),
            reason: format!(
                "no tokenizer.json, a vocabulary of {} (< 259, too small for kiln's byte tokenizer) \
                 and no eos_token_id to use raw bytes with",
                config.vocab_size
            ),
        }
    })?;
    Ok(Tokenizer::ByteSpecial {
        bos: special_id(&json, "bos_token_id", &path, config.vocab_size)?,
        eos,
        pad: special_id(&json, "pad_token_id", &path, config.vocab_size)?.unwrap_or(eos),
    })
}

/// A special token id of an HF `config.json` (`path`): absent or null is `None`; an integer, or
/// a list of them (HF's several end-of-sequence ids; kiln stops at the first), must be a token
/// of the model's vocabulary.
fn special_id(
    json: &serde_json::Value,
    key: &str,
    path: &Path,
    vocab: usize,
) -> Result<Option<i64>> {
    let bad = |reason: String| TrainerError::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("{key}: {reason}"),
    };
    let value = match json.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(ids)) => match ids.first() {
            Some(first) => first,
            None => return Err(bad("an empty list".into())),
        },
        Some(v) => v,
    };
    let id = value
        .as_i64()
        .ok_or_else(|| bad(format!("expected a token id (an integer), found {value}")))?;
    if !(0..vocab as i64).contains(&id) {
        return Err(bad(format!(
            "{id} is outside the model's vocabulary 0..{vocab}"
        )));
    }
    Ok(Some(id))
}

/// Whether a parameter path trains.
pub type Trainable = fn(&str) -> bool;

/// The model every rank starts from.
pub struct Built {
    pub model: Llama,
    /// Whether a parameter path trains.
    pub trainable: Trainable,
    /// The adapter's config (PEFT semantics), with LoRA.
    pub lora: Option<kiln_lora::LoraConfig>,
}

impl Built {
    /// The adapter's `lora_dropout` (0 without LoRA).
    pub fn lora_dropout(&self) -> f64 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout)
    }
}

/// Builds the model every rank starts from: the pretrained weights or a seeded random init,
/// with the LoRA adapter attached (a loaded PEFT adapter, whose `adapter_config.json` then gives
/// r, alpha, dropout and targets, or a fresh one from the seed).
pub fn build_model(
    config: &TrainConfig,
    model_config: &LlamaConfig,
    device: &Device,
) -> Result<Built> {
    let model = match &config.model.pretrained {
        Some(dir) => Llama::from_pretrained(dir, device, DType::F32)?.1,
        None => Llama::random(model_config, config.train.seed, device, DType::F32)?,
    };
    if !lora_on(config) {
        return Ok(Built {
            model,
            trainable: |_| true,
            lora: None,
        });
    }
    let mut lora_model = LoraModel::new(model);
    match &config.lora.adapter {
        Some(dir) => lora_model.load_adapter("default", dir)?,
        None => {
            let fresh = fresh_lora_config(config);
            lora_model.add_adapter("default", fresh, config.train.seed ^ 0x4C6F_5241)?
        }
    }
    // The config of the adapter as attached (for a loaded one, its adapter_config.json).
    let lora = lora_model.config("default")?.clone();
    Ok(Built {
        model: lora_model.into_model(),
        trainable: |p| p.contains(".lora."),
        lora: Some(lora),
    })
}

/// The LoRA dropout of optimizer step `step` (`None` when `p` is 0), for the rows of the
/// step's global batch from `first_row` on. The seed is a function of the run's seed and the
/// step, so a resumed run drops what the uninterrupted run dropped.
pub fn step_dropout(
    p: f64,
    seed: u64,
    step: u64,
    first_row: usize,
) -> Result<Option<AdapterDropout>> {
    if p == 0.0 {
        return Ok(None);
    }
    let seed = SplitMix64::at(seed ^ 0x0064_726f_706f_7574, step);
    let dropout = AdapterDropout::new(p, seed, first_row as u64)
        .map_err(|e| TrainerError::invalid("lora.dropout", e.to_string()))?;
    Ok(Some(dropout))
}

/// This rank's rows cut into micro-batches of `micro` rows, as model input; with `dropout`
/// (training with LoRA dropout, `first_row` = this rank's first row) every micro-batch draws the
/// masks of its own rows.
pub fn batches(
    model_config: &LlamaConfig,
    rows: &[Example],
    micro: usize,
    device: &Device,
    dtype: DType,
    dropout: Option<AdapterDropout>,
) -> Result<Vec<Batch>> {
    let mut dropout = dropout;
    micro_batches(rows, micro)?
        .into_iter()
        .map(|rows| {
            let batch = batch_of(model_config, rows, device, dtype, dropout);
            dropout = dropout.map(|d| d.skip_rows(rows.len() as u64));
            batch
        })
        .collect()
}

/// One micro-batch of `rows` (equal lengths), with adapter dropout from its first row on.
pub fn batch_of(
    model_config: &LlamaConfig,
    rows: &[Example],
    device: &Device,
    dtype: DType,
    dropout: Option<AdapterDropout>,
) -> Result<Batch> {
    let mut batch = model_batch(model_config, collate(rows)?, device, dtype)?;
    if let Some(d) = dropout {
        batch.ctx = batch.ctx.with_adapter_dropout(d);
    }
    Ok(batch)
}

/// The model input of collated rows: packed rows ([`crate::data::Example`]) get the context of
/// their segments and positions (attention within an example, positions restarting).
pub fn model_batch(
    config: &LlamaConfig,
    rows: crate::data::Batch,
    device: &Device,
    dtype: DType,
) -> Result<Batch> {
    let crate::data::Batch {
        ids,
        labels,
        segments,
        positions,
        batch,
        seq_len,
    } = rows;
    Ok(match (segments, positions) {
        (Some(segments), Some(positions)) => Batch::packed(
            config,
            ids,
            labels,
            &segments,
            &positions,
            (batch, seq_len),
            device,
            dtype,
        )?,
        _ => Batch::new(config, ids, labels, seq_len, device, dtype)?,
    })
}

/// The engine's configuration of a run: stage, precision policy, AdamW, clipping.
pub fn zero_config(config: &TrainConfig) -> Result<kiln_zero::ZeroConfig> {
    let o = &config.optim;
    Ok(kiln_zero::ZeroConfig {
        stage: stage_of(config.zero.stage)?,
        policy: policy_of(&config.precision),
        adamw: AdamWConfig {
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
        },
        group: ParamGroup {
            lr: o.lr,
            weight_decay: o.weight_decay,
        },
        max_grad_norm: o.max_grad_norm,
        recompute: config.zero.recompute,
    })
}

/// One rank's run.
fn rank_main(
    comm: Communicator,
    config: &TrainConfig,
    resume: &Resume,
    backend: &str,
) -> Result<TrainSummary> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let device = device_for(backend, rank);
    let model_config = config.model_config()?;
    let tokenizer = tokenizer_for(config, &model_config)?;
    let dataset = Dataset::new(&config.data, tokenizer, config.train.seed)?;
    let zc = zero_config(config)?;
    let (policy, stage) = (zc.policy, zc.stage);
    // Thread ranks share this process's memory; MPI and NCCL ranks have a process each.
    let local_ranks = if backend == "threads" { world } else { 1 };
    check_model_fits(config, &model_config, local_ranks)?;
    if lead && dataset.no_loss_rows() > 0 {
        eprintln!(
            "kiln: warning: {} rows have no token that counts in the loss (JSONL records whose \
             prompt fills data.seq_len = {}); they are trained on without effect",
            dataset.no_loss_rows(),
            config.data.seq_len
        );
    }
    let built = build_model(config, &model_config, &device)?;
    let lora_dropout = built.lora_dropout();
    let lora_json = built.lora.as_ref().map(|l| l.to_json());
    let Built {
        model, trainable, ..
    } = built;
    let (mut total_params, mut trainable_params) = (0, 0);
    for (path, numel) in kiln_precision::param_counts(&model) {
        total_params += numel;
        if trainable(&path) {
            trainable_params += numel;
        }
    }
    let mut engine = Engine::new(LlamaUnits::new(model), comm, zc, trainable)?;

    let out_dir = config.train.output_dir.clone();
    let ckpt_root = out_dir.join("checkpoints");
    if lead {
        crate::out::create_dir(&out_dir, "train.output_dir")?;
        std::fs::write(out_dir.join("config.toml"), config.to_toml()?)
            .map_err(|e| TrainerError::io(&out_dir, e))?;
    }
    let state_of = |step: u64, pos: DataPosition, skipped: u64| -> Result<serde_json::Value> {
        let s = TrainerState {
            step,
            data_position: pos,
            skipped_steps: skipped,
            model_config: model_config.to_hf_json(),
            lora: lora_json.clone(),
            config: config.to_toml()?,
        };
        serde_json::to_value(s).map_err(|e| TrainerError::Checkpoint(e.to_string()))
    };

    let mut step = 0u64;
    let mut pos = DataPosition::default();
    let mut skipped = 0u64;
    let from = match resume {
        Resume::No => None,
        Resume::Latest => Some(latest_checkpoint(&ckpt_root)?.ok_or_else(|| {
            TrainerError::Checkpoint(format!(
                "--resume: no checkpoint in {} to resume from (the run never saved one; start \
                 it again without --resume)",
                ckpt_root.display()
            ))
        })?),
        Resume::From(dir) => Some(dir.clone()),
    };
    if let Some(dir) = &from {
        let extra = engine.load_checkpoint(dir)?;
        let s: TrainerState = serde_json::from_value(extra).map_err(|e| {
            TrainerError::Checkpoint(format!("{}: trainer state: {e}", dir.display()))
        })?;
        (step, pos, skipped) = (s.step, s.data_position, s.skipped_steps);
        if lead {
            eprintln!("kiln: resumed from {} at step {step}", dir.display());
        }
    }

    if lead {
        trim_metrics(&out_dir, from.as_ref().map(|_| step))?;
    }
    let total = config.train.steps;
    let micro = config.train.micro_batch;
    let mut metrics = if lead {
        Some(MetricsWriter::create(&out_dir)?)
    } else {
        None
    };
    let mut progress = lead.then(|| Progress::new(total, config.train.log_interval.max(1)));
    if lead {
        let line = format!(
            "kiln train: Llama {:.2}M params ({} trainable), {:?} compute, ZeRO {:?}, {world} ranks ({backend}), {} steps x {} rows x {} tokens",
            total_params as f64 / 1e6,
            trainable_params,
            policy.compute,
            stage,
            total,
            config.train.global_batch,
            dataset.seq_len()
        );
        // Packing changes how many rows an epoch has: say it.
        let line = match dataset.rows_per_epoch() {
            Some(rows) => format!("{line} ({rows} rows an epoch)"),
            None => line,
        };
        if let Some(p) = progress.as_mut() {
            p.println(&line);
        }
    }
    let interrupted = interrupted_flag();
    let start = Instant::now();
    let mut tokens_done = 0u64;
    let (mut first_loss, mut last_loss) = (None, None);
    let mut last_ckpt = from.clone();
    let mut was_interrupted = false;
    let mut skipped_in_a_row = 0u64;
    let mut eval = None;
    let save = |engine: &mut Engine<LlamaUnits>,
                step: u64,
                pos: DataPosition,
                skipped: u64|
     -> Result<PathBuf> {
        let dir = engine.save_checkpoint(
            &ckpt_root,
            &format!("step-{step:08}"),
            state_of(step, pos, skipped)?,
        )?;
        Ok(dir)
    };
    while step < total {
        let lr = crate::schedule::lr_at(step, &config.optim, total);
        engine.set_lr(lr)?;
        let rows = dataset.global_batch(&mut pos, config.train.global_batch)?;
        if rows.iter().all(|r| r.target_tokens() == 0) {
            // Every rank sees the same global batch, so every rank stops here with this message.
            return Err(TrainerError::invalid(
                "data.seq_len",
                format!(
                    "step {}: none of the {} rows of the global batch has a token that counts in \
                     the loss ({} rows of the data are like that: JSONL records whose prompt fills \
                     data.seq_len = {}); raise data.seq_len or train.global_batch, or drop those records",
                    step + 1,
                    rows.len(),
                    dataset.no_loss_rows(),
                    config.data.seq_len
                ),
            ));
        }
        let mine = rank_range(rows.len(), rank, world)?;
        let dropout = step_dropout(lora_dropout, config.train.seed, step, mine.start)?;
        let micro_batches = batches(
            &model_config,
            &rows[mine],
            micro,
            &device,
            policy.compute,
            dropout,
        )?;
        let t = Instant::now();
        let r: StepReport = engine.step(&micro_batches)?;
        step += 1;
        // Throughput counts every token the model processes (rows x seq_len over all ranks),
        // as PyTorch/HF trainers report it; `r.tokens` (those in the loss) can be far fewer.
        let processed = (config.train.global_batch * dataset.seq_len()) as u64;
        tokens_done += processed;
        if r.found_inf {
            skipped += 1;
        }
        // Every rank holds the same report, so every rank takes the same branch.
        match (
            r.found_inf || !r.loss.is_finite(),
            policy.compute == DType::F16,
        ) {
            (false, _) => skipped_in_a_row = 0,
            (true, true) => {
                // f16: the loss scaler skips the step and halves the scale (torch's GradScaler).
                skipped_in_a_row += 1;
                if lead && skipped_in_a_row == SKIPS_BEFORE_WARNING {
                    eprintln!(
                        "kiln: warning: {SKIPS_BEFORE_WARNING} steps in a row skipped with inf/NaN \
                         gradients (step {step}, loss {}, loss scale {}): the run is not learning; \
                         try precision.compute = \"bf16\" or a lower optim.lr",
                        r.loss,
                        r.scale.unwrap_or(1.0)
                    );
                }
            }
            (true, false) => {
                return Err(TrainerError::NonFinite(format!(
                    "step {step}: the loss is {} and the gradients are {}: the training diverged \
                     (optim.lr = {:e}; or a model or adapter with bad weights); stopped without a \
                     checkpoint of it, {}",
                    r.loss,
                    if r.found_inf { "not finite" } else { "finite" },
                    config.optim.lr,
                    match &last_ckpt {
                        Some(c) => format!("the newest checkpoint is still {}", c.display()),
                        None => "no checkpoint was written".into(),
                    }
                )));
            }
        }
        first_loss.get_or_insert(r.loss);
        last_loss = Some(r.loss);
        let mem = engine.memory().total();
        let mut all_mem = vec![0f32; world];
        all_mem[rank] = mem as f32;
        engine.comm().all_reduce(&mut all_mem, ReduceOp::Sum)?;
        let tokens_per_s = processed as f64 / t.elapsed().as_secs_f64().max(1e-9);
        if let Some(m) = metrics.as_mut() {
            m.train(TrainRecord {
                step,
                loss: r.loss,
                lr,
                grad_norm: r.grad_norm,
                loss_scale: r.scale,
                skipped_steps: skipped,
                tokens_per_s,
                mem_bytes_per_rank: all_mem.iter().map(|&b| b as u64).collect(),
            })?;
        }
        if let Some(p) = progress.as_mut() {
            p.update(&ProgressStats {
                step,
                loss: r.loss,
                tokens_per_s,
                lr,
                loss_scale: r.scale,
            });
        }
        let mut stop = [if interrupted.load(Ordering::SeqCst) {
            1i64
        } else {
            0
        }];
        engine.comm().all_reduce(&mut stop, ReduceOp::Max)?;
        let every = config.train.checkpoint_interval;
        if stop[0] != 0 || (every > 0 && step.is_multiple_of(every)) {
            last_ckpt = Some(save(&mut engine, step, pos, skipped)?);
        }
        if stop[0] != 0 {
            was_interrupted = true;
            break;
        }
        let every = config.train.eval_interval;
        if every > 0 && step.is_multiple_of(every) && step < total {
            let e = evaluate(
                &mut engine,
                &dataset,
                &model_config,
                config,
                step,
                &device,
                false,
            )?;
            if let (Some(m), Some(e)) = (metrics.as_mut(), &e) {
                m.eval(EvalRecord {
                    step,
                    eval_loss: e.loss,
                    perplexity: e.perplexity,
                    accuracy: e.accuracy,
                })?;
            }
        }
    }
    let wall = start.elapsed();
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    if !was_interrupted {
        if last_ckpt
            .as_ref()
            .is_none_or(|c| !c.ends_with(format!("step-{step:08}")))
        {
            last_ckpt = Some(save(&mut engine, step, pos, skipped)?);
        }
        eval = evaluate(
            &mut engine,
            &dataset,
            &model_config,
            config,
            step,
            &device,
            true,
        )?;
        if let (Some(m), Some(e)) = (metrics.as_mut(), &eval) {
            m.eval(EvalRecord {
                step,
                eval_loss: e.loss,
                perplexity: e.perplexity,
                accuracy: e.accuracy,
            })?;
        }
    }
    let memory = engine.memory();
    if let Some(m) = &metrics {
        let records = crate::metrics::read_metrics(m.path())?;
        let series = crate::metrics::loss_series(&records);
        crate::plot::write_loss_svg(&out_dir.join("loss.svg"), &series.0, &series.1)?;
    }
    let summary = TrainSummary {
        steps: step,
        first_loss,
        last_loss,
        skipped_steps: skipped,
        wall_s: wall.as_secs_f64(),
        tokens_per_s: tokens_done as f64 / wall.as_secs_f64().max(1e-9),
        trainable_params,
        total_params,
        optimizer_bytes: memory.optimizer,
        model_state_bytes: memory.total(),
        eval,
        checkpoint: last_ckpt,
        interrupted: was_interrupted,
        world_size: world,
        rank,
        backend: backend.into(),
    };
    if lead {
        let json = serde_json::to_string_pretty(&summary)
            .map_err(|e| TrainerError::Checkpoint(e.to_string()))?;
        std::fs::write(out_dir.join("summary.json"), json)
            .map_err(|e| TrainerError::io(&out_dir, e))?;
    }
    Ok(summary)
}

/// Consecutive skipped (inf/NaN) f16 steps after which a run warns that it is not learning.
const SKIPS_BEFORE_WARNING: u64 = 10;

/// Refuses a model that cannot fit in this machine's memory before it is built: every rank of
/// this process (`local_ranks`) builds the whole f32 model, with LoRA adapters of `lora.r`.
fn check_model_fits(config: &TrainConfig, model: &LlamaConfig, local_ranks: usize) -> Result<()> {
    let params = model.unit_sizes()?.total as f64;
    let lora = if lora_on(config) && config.lora.adapter.is_none() {
        // At most every linear layer: r · (in + out) for q, k, v, o, gate, up, down.
        let (h, i) = (model.hidden_size as f64, model.intermediate_size as f64);
        let q = (model.num_attention_heads * model.head_dim) as f64;
        config.lora.r as f64 * model.num_hidden_layers as f64 * (4.0 * (h + q) + 3.0 * (h + i))
    } else {
        0.0
    };
    let field = match (
        &config.model.pretrained,
        &config.model.config,
        lora > params,
    ) {
        (_, _, true) => "lora.r".to_string(),
        (Some(_), _, _) => "model.pretrained".into(),
        (None, Some(_), _) => "model.config".into(),
        (None, None, _) => "model.preset".into(),
    };
    crate::config::check_fits(
        &field,
        &format!(
            "{local_ranks} rank(s) of a model of {params:.3e} parameters{} in f32 (with AdamW state)",
            if lora > 0.0 {
                format!(" and LoRA adapters of {lora:.3e}")
            } else {
                String::new()
            }
        ),
        local_ranks as f64 * (params + lora) * 4.0 * 2.0,
    )
}

/// A fresh run starts a new `metrics.jsonl`; a resumed one keeps the records up to the step it
/// resumes at (a run killed after its last checkpoint logged steps that will be redone).
fn trim_metrics(out_dir: &Path, resumed_at: Option<u64>) -> Result<()> {
    let path = out_dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = match resumed_at {
        None => String::new(),
        Some(step) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
    };
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| TrainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrainerError::io(&path, e))
}

/// Held-out loss over all ranks and, on rank 0, exact-match accuracy by greedy generation
/// (addition). A collective: every rank calls it. Returns `Some` on rank 0.
fn evaluate(
    engine: &mut Engine<LlamaUnits>,
    dataset: &Dataset,
    model_config: &LlamaConfig,
    config: &TrainConfig,
    step: u64,
    device: &Device,
    with_samples: bool,
) -> Result<Option<EvalResult>> {
    let (rank, world) = (engine.comm().rank(), engine.comm().world_size());
    let policy = policy_of(&config.precision);
    let rows = rank_slice(dataset.eval(), rank, world)?;
    let micro = config.train.micro_batch.max(1);
    let chunks = micro_batches(rows, micro)?;
    // A rank whose slice of the held-out rows is empty still joins every collective
    // (`Engine::evaluate` runs the most batches any rank has).
    let (sum, tokens) = engine.evaluate(chunks.len(), |i| {
        batch_of(model_config, chunks[i], device, policy.compute, None)
            .map_err(|e| kiln_zero::ZeroError::Model(e.to_string()))
    })?;
    if tokens == 0 {
        // No held-out token on any rank (every rank sees the same total): no loss to report,
        // rather than a loss of 0 and a perplexity of 1.
        return Ok(None);
    }
    let loss = (sum / tokens as f64) as f32;
    // Generation needs the whole model on one rank: every rank joins the gather (a collective;
    // the task is the same on all of them), rank 0 generates. Tasks without it gather nothing.
    let task = dataset.addition();
    let params = match task {
        Some(_) => engine.full_params()?,
        None => Vec::new(),
    };
    if rank != 0 {
        return Ok(None);
    }
    let mut accuracy = None;
    let mut samples = vec![];
    if let Some(task) = task {
        let lora = lora_config(config)?;
        let model = model_from_params(
            model_config,
            lora.as_ref(),
            params,
            &Device::flex(),
            policy.compute,
        )?;
        let (acc, s) = addition_accuracy(&model, model_config, task, dataset, with_samples)?;
        accuracy = Some(acc);
        samples = s;
    }
    Ok(Some(EvalResult {
        step,
        loss,
        perplexity: loss.exp(),
        accuracy,
        samples,
    }))
}

/// A model holding `params` (HF paths; with LoRA, the factors at [`kiln_lora::burn_factor_path`]),
/// cast to `dtype`: each value is moved into the model, never a second copy of the whole model.
pub fn model_from_params(
    model_config: &LlamaConfig,
    lora: Option<&kiln_lora::LoraConfig>,
    params: Vec<(String, burn::tensor::TensorData)>,
    device: &Device,
    dtype: DType,
) -> Result<Llama> {
    let mut source = TensorMap::new(params, device, dtype, "the checkpoint's parameters");
    let base = Llama::load(model_config, &mut source)?;
    let factors = source.rest();
    let Some(lora) = lora else {
        if let Some(key) = factors.keys().next() {
            return Err(TrainerError::Checkpoint(format!(
                "parameter `{key}` is not in the model (LoRA factors without a LoRA config?)"
            )));
        }
        return Ok(base);
    };
    // A fresh adapter of the right shapes (r · (in + out) values per target), then the values.
    let mut lora_model = LoraModel::new(base);
    lora_model.add_adapter("default", lora.clone(), 0)?;
    let factors = factors
        .into_iter()
        .map(|(p, d)| (p, d.convert_dtype(dtype)))
        .collect();
    Ok(kiln_zero::load_params(lora_model.into_model(), factors)?)
}

/// Greedy exact-match accuracy on the held-out addition pairs, and a few samples.
pub fn addition_accuracy(
    model: &Llama,
    model_config: &LlamaConfig,
    task: &AdditionTask,
    dataset: &Dataset,
    with_samples: bool,
) -> Result<(f32, Vec<(String, String)>)> {
    let tok = dataset.tokenizer();
    let pairs = dataset.eval_pairs();
    let digits = task.answer(0, 0).len();
    let settings = GenerateConfig {
        max_new_tokens: digits + 1,
        greedy: true,
        eos_token_id: Some(tok.eos()),
        ..Default::default()
    };
    let mut correct = 0usize;
    let mut samples = vec![];
    for chunk in pairs.chunks(64) {
        let prompts = chunk
            .iter()
            .map(|&(a, b)| {
                let mut ids: Vec<i64> = tok.bos().into_iter().collect();
                ids.extend(tok.encode(&task.prompt(a, b))?);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = generate(model, model_config, &prompts, &settings, &Device::flex())?;
        for (&(a, b), ids) in chunk.iter().zip(out) {
            let ids: Vec<i64> = ids.into_iter().filter(|&t| t != tok.eos()).collect();
            let text = tok.decode(&ids)?;
            let right = task.exact_match(&text, a, b);
            if right {
                correct += 1;
            }
            if with_samples && samples.len() < 5 {
                samples.push((
                    task.prompt(a, b),
                    format!(
                        "{text}   (reads {}; {} {})",
                        AdditionTask::readable(&text),
                        if right { "right:" } else { "wrong, want" },
                        task.result(a, b)
                    ),
                ));
            }
        }
    }
    Ok((correct as f32 / pairs.len().max(1) as f32, samples))
}

/// Reads a checkpoint's trainer state: the run's config and where it stopped.
pub fn checkpoint_config(dir: &Path) -> Result<(TrainConfig, u64)> {
    state_config(&kiln_zero::read_manifest(dir)?.extra, dir)
}

/// The run's config and step in a checkpoint manifest's `extra` (the trainer state) of `dir`.
pub fn state_config(extra: &serde_json::Value, dir: &Path) -> Result<(TrainConfig, u64)> {
    let manifest = dir.join(kiln_zero::checkpoint::MANIFEST);
    let s = TrainerState::deserialize(extra).map_err(|e| {
        TrainerError::Checkpoint(format!("{}: trainer state: {e}", manifest.display()))
    })?;
    let config = TrainConfig::from_toml_str(&s.config).map_err(|e| {
        TrainerError::Checkpoint(format!(
            "{}: the run's config stored in it: {e}",
            manifest.display()
        ))
    })?;
    Ok((config, s.step))
}

/// The elapsed time as `1m 02s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m {:02}s", s / 60, s % 60)
}
