//! The loop every rank runs (SPMD): set up, then one optimizer step after another, with
//! metrics, progress, checkpoints and evaluation.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::DType;
use kiln_dist::{Communicator, ReduceOp};
use kiln_zero::llama::LlamaUnits;
use kiln_zero::{Engine, StepReport, latest_checkpoint};
use serde::{Deserialize, Serialize};

use super::batches::{batches, step_dropout};
use super::build::{Built, build_model, check_model_fits, device_for, tokenizer_for, zero_config};
use super::eval::{EvalResult, evaluate};
use super::state::{TrainerState, trim_metrics};
use crate::config::{DistBackend, TrainConfig};
use crate::data::{DataPosition, Dataset, rank_range};
use crate::metrics::{EvalRecord, MetricsWriter, Progress, ProgressStats, TrainRecord};
use crate::{Result, TrainerError};

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
    pub backend: DistBackend,
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

/// One rank's run.
pub(super) fn rank_main(
    comm: Communicator,
    config: &TrainConfig,
    resume: &Resume,
    backend: DistBackend,
) -> Result<TrainSummary> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let device = device_for(config, backend, rank)?;
    let model_config = config.model_config()?;
    let tokenizer = tokenizer_for(config, &model_config)?;
    let dataset = Dataset::new(&config.data, tokenizer, config.train.seed)?;
    let zc = zero_config(config)?;
    let (policy, stage) = (zc.policy, zc.stage);
    // Thread ranks share this process's memory; MPI and NCCL ranks have a process each.
    let local_ranks = if backend == DistBackend::Threads {
        world
    } else {
        1
    };
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
        backend,
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

/// The elapsed time as `1m 02s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m {:02}s", s / 60, s % 60)
}
