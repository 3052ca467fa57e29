//! Data: examples with masked labels, the three tasks (tokenizers in [`crate::tokenizer`]),
//! and a deterministic, resumable, shardable stream of global batches.
//!
//! # Labels
//! An [`Example`] holds `ids` and `labels` of the same length (`seq_len`). `labels` are the ids
//! themselves, with [`IGNORE_INDEX`] (-100) where a token must not be learned (prompt tokens,
//! padding), exactly as `kiln_models::causal_lm_loss_sum` expects: position `t` predicts
//! `labels[t + 1]`. Rows are right-padded, so with a causal mask the padding never influences a
//! counted position and no attention mask is needed for training.
//!
//! # Determinism
//! Every rank builds the same [`Dataset`] from the same config and seed and calls
//! [`Dataset::global_batch`] with the same [`DataPosition`], so all ranks see the same global
//! batch; [`rank_slice`] then picks each rank's rows and [`micro_batches`] cuts them.
//! The position is saved in checkpoints so a resumed run continues at the exact row.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use kiln_models::IGNORE_INDEX;

use crate::config::{DataConfig, Task};
use crate::error::{Result, TrainerError};

pub use crate::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB_SIZE, Tokenizer};

/// One row: `ids` and `labels`, both `seq_len` long (see the module docs for the convention).
///
/// A packed row ([`crate::packing`]) holds several examples and says where each is:
/// `segments` numbers them 1, 2, ... (0 for padding) and `positions` restarts at 0 with each,
/// so attention stays inside an example and each sees the positions it would see alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Vec<i64>>,
}

impl Example {
    /// A row of one example (no packing).
    pub fn new(ids: Vec<i64>, labels: Vec<i64>) -> Self {
        Self {
            ids,
            labels,
            segments: None,
            positions: None,
        }
    }

    /// `[BOS] prompt response EOS`, labels masking BOS and the prompt, truncated to `seq_len`
    /// (keeping the start) and right-padded. Returns whether it was truncated.
    pub fn supervised(
        prompt: &[i64],
        response: &[i64],
        tokenizer: &Tokenizer,
        seq_len: usize,
    ) -> (Example, bool) {
        let (mut example, truncated) =
            Self::supervised_unpadded(prompt, response, tokenizer, seq_len);
        example.pad_to(seq_len, tokenizer.pad());
        (example, truncated)
    }

    /// [`supervised`](Self::supervised) without the padding (for packing).
    pub fn supervised_unpadded(
        prompt: &[i64],
        response: &[i64],
        tokenizer: &Tokenizer,
        seq_len: usize,
    ) -> (Example, bool) {
        let n = prompt.len() + response.len() + 2;
        let mut ids = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        if let Some(bos) = tokenizer.bos() {
            ids.push(bos);
            labels.push(IGNORE_INDEX);
        }
        ids.extend_from_slice(prompt);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, prompt.len()));
        ids.extend_from_slice(response);
        labels.extend_from_slice(response);
        ids.push(tokenizer.eos());
        labels.push(tokenizer.eos());
        let truncated = ids.len() > seq_len;
        ids.truncate(seq_len);
        labels.truncate(seq_len);
        (Example::new(ids, labels), truncated)
    }

    /// Right-pads to `seq_len` with `pad` (labels [`IGNORE_INDEX`]; segment 0, position 0).
    pub fn pad_to(&mut self, seq_len: usize, pad: i64) {
        self.ids.resize(seq_len, pad);
        self.labels.resize(seq_len, IGNORE_INDEX);
        if let Some(s) = self.segments.as_mut() {
            s.resize(seq_len, 0);
        }
        if let Some(p) = self.positions.as_mut() {
            p.resize(seq_len, 0);
        }
    }

    /// Tokens that count in the loss: positions `t >= 1` with `labels[t] != -100`.
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Rows stacked for a model call: `ids` and `labels` flattened row-major, `[batch, seq_len]`;
/// for packed rows also their `segments` and `positions` (same layout, see [`Example`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub segments: Option<Vec<u32>>,
    pub positions: Option<Vec<i64>>,
    pub batch: usize,
    pub seq_len: usize,
}

/// Stacks rows of equal length into a [`Batch`] (for `Tensor::<2, Int>::from_data`). Rows are
/// all packed or all not.
pub fn collate(rows: &[Example]) -> Result<Batch> {
    let seq_len = rows.first().map_or(0, |r| r.ids.len());
    let packed = rows.first().is_some_and(|r| r.segments.is_some());
    let mut ids = Vec::with_capacity(rows.len() * seq_len);
    let mut labels = Vec::with_capacity(rows.len() * seq_len);
    let (mut segments, mut positions) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        if r.ids.len() != seq_len || r.labels.len() != seq_len {
            return Err(TrainerError::Argument(format!(
                "collate: row {i} has {} ids and {} labels, row 0 has {seq_len}",
                r.ids.len(),
                r.labels.len()
            )));
        }
        ids.extend_from_slice(&r.ids);
        labels.extend_from_slice(&r.labels);
        match (packed, &r.segments, &r.positions) {
            (false, None, None) => {}
            (true, Some(s), Some(p)) if s.len() == seq_len && p.len() == seq_len => {
                segments.extend_from_slice(s);
                positions.extend_from_slice(p);
            }
            _ => {
                return Err(TrainerError::Argument(format!(
                    "collate: row {i} is {}packed like row 0, or its segments and positions \
                     are not {seq_len} long",
                    if packed { "not " } else { "" }
                )));
            }
        }
    }
    Ok(Batch {
        ids,
        labels,
        segments: packed.then_some(segments),
        positions: packed.then_some(positions),
        batch: rows.len(),
        seq_len,
    })
}

/// splitmix64's output function: a well-mixed 64-bit hash of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform index in `0..n` from a 64-bit random value (`n > 0`).
fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

const TRAIN_SALT: u64 = 0x7472_6169_6e00_0001;
const EVAL_SALT: u64 = 0x6576_616c_0000_0002;
const SPLIT_SALT: u64 = 0x7370_6c69_7400_0003;
const SHUFFLE_SALT: u64 = 0x7368_7566_0000_0004;

/// The arithmetic of the synthetic task (`data.operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    #[default]
    Add,
    /// `a - b` with the larger operand first: the related task of the LoRA recipe.
    Sub,
}

/// Synthetic addition: `"123+45="` -> `"168"` + EOS, operands uniform in `[0, 10^digits)`.
///
/// Pairs whose hash (independent of the seed) is 0 mod 10 are held out: they appear only in
/// [`eval_pairs`](Self::eval_pairs), never in [`train_pair`](Self::train_pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdditionTask {
    pub digits: u32,
    pub seed: u64,
    /// `+`, or `-` for the related subtraction task (larger operand first).
    pub op: Operation,
}

impl AdditionTask {
    /// `digits` in 1..=9.
    pub fn new(digits: u32, seed: u64) -> Result<Self> {
        Self::with_op(digits, seed, Operation::Add)
    }

    /// The task with operation `op`; the held-out pairs are the same for both operations.
    pub fn with_op(digits: u32, seed: u64, op: Operation) -> Result<Self> {
        if !(1..=9).contains(&digits) {
            return Err(TrainerError::invalid(
                "data.digits",
                format!("{digits} must be in 1..=9"),
            ));
        }
        Ok(Self { digits, seed, op })
    }

    /// The value the answer spells: `a + b`, or `|a - b|` for subtraction.
    pub fn result(&self, a: u64, b: u64) -> u64 {
        match self.op {
            Operation::Add => a + b,
            Operation::Sub => a.abs_diff(b),
        }
    }

    /// `10^digits`: operands are below it.
    pub fn modulus(&self) -> u64 {
        10u64.pow(self.digits)
    }

    /// Whether `(a, b)` belongs to the held-out evaluation set.
    pub fn is_eval_pair(a: u64, b: u64) -> bool {
        splitmix64(splitmix64(a ^ EVAL_SALT) ^ b).is_multiple_of(10)
    }

    /// The `i`-th training pair: a deterministic function of `(seed, i)`, never an eval pair.
    pub fn train_pair(&self, i: u64) -> (u64, u64) {
        let m = self.modulus();
        let mut r = splitmix64(splitmix64(self.seed ^ TRAIN_SALT) ^ i);
        loop {
            let a = below(r, m);
            let b = below(splitmix64(r), m);
            if !Self::is_eval_pair(a, b) {
                return (a, b);
            }
            r = splitmix64(r ^ 0xA5A5_A5A5_A5A5_A5A5);
        }
    }

    /// Up to `n` distinct held-out pairs (fewer only when fewer exist, e.g. 1 digit), in a
    /// deterministic order that depends on the seed.
    pub fn eval_pairs(&self, n: usize) -> Vec<(u64, u64)> {
        let m = self.modulus();
        let mut rng = splitmix64(self.seed ^ SHUFFLE_SALT);
        let mut next = || {
            rng = splitmix64(rng);
            rng
        };
        if m * m <= 1 << 20 {
            let mut all: Vec<(u64, u64)> = (0..m)
                .flat_map(|a| (0..m).map(move |b| (a, b)))
                .filter(|&(a, b)| Self::is_eval_pair(a, b))
                .collect();
            shuffle(&mut all, &mut next);
            all.truncate(n);
            return all;
        }
        let mut seen = HashSet::with_capacity(n.min(1 << 16));
        let mut out = Vec::with_capacity(n.min(1 << 16));
        // Held-out pairs are 10% of at least 2^20: n draws succeed quickly; the cap only
        // guarantees termination.
        for _ in 0..(n as u64).saturating_mul(100).saturating_add(1000) {
            if out.len() == n {
                break;
            }
            let (a, b) = (below(next(), m), below(next(), m));
            if Self::is_eval_pair(a, b) && seen.insert((a, b)) {
                out.push((a, b));
            }
        }
        out
    }

    /// The prompt text: both operands zero-padded to `digits`, `"07+45="` (BOS is added as a
    /// token by [`example`](Self::example)).
    pub fn prompt(&self, a: u64, b: u64) -> String {
        let w = self.digits as usize;
        match self.op {
            Operation::Add => format!("{a:0w$}+{b:0w$}="),
            Operation::Sub => format!("{:0w$}-{:0w$}=", a.max(b), a.min(b)),
        }
    }

    /// The expected answer text: `a + b` zero-padded to `digits + 1` and written least
    /// significant digit first (07 + 45 = 52 -> `"250"`), the order in which carries are
    /// computed, so a small model can produce each digit from what it has already written
    /// (the usual format for teaching transformers arithmetic).
    pub fn answer(&self, a: u64, b: u64) -> String {
        let w = self.digits as usize + 1;
        format!("{:0w$}", self.result(a, b)).chars().rev().collect()
    }

    /// Whether a generated continuation (the text after the prompt, specials removed) answers
    /// `a + b`: its leading run of digits, after leading whitespace, equals [`answer`](Self::answer).
    pub fn exact_match(&self, generated: &str, a: u64, b: u64) -> bool {
        let s = generated.trim_start();
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        end > 0 && s[..end] == self.answer(a, b)
    }

    /// A generated answer in the usual reading order (`"250"` -> `"52"`), for display.
    pub fn readable(generated: &str) -> String {
        let digits: String = generated.chars().take_while(char::is_ascii_digit).collect();
        let s: String = digits.chars().rev().collect();
        let s = s.trim_start_matches('0');
        if s.is_empty() && !digits.is_empty() {
            "0".into()
        } else {
            s.into()
        }
    }

    /// The training/eval row for `(a, b)`: loss on the answer digits and EOS only.
    pub fn example(
        &self,
        a: u64,
        b: u64,
        tokenizer: &Tokenizer,
        seq_len: usize,
    ) -> Result<Example> {
        let prompt = tokenizer.encode(&self.prompt(a, b))?;
        let answer = tokenizer.encode(&self.answer(a, b))?;
        let (example, truncated) = Example::supervised(&prompt, &answer, tokenizer, seq_len);
        if truncated {
            return Err(TrainerError::invalid(
                "data.seq_len",
                format!(
                    "{seq_len} is too short for `{}{}` and its special tokens",
                    self.prompt(a, b),
                    self.answer(a, b)
                ),
            ));
        }
        Ok(example)
    }
}

/// Fisher-Yates with the given source of random u64.
fn shuffle<T>(v: &mut [T], next: &mut impl FnMut() -> u64) {
    for i in (1..v.len()).rev() {
        let j = below(next(), i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Reads a data file: at most an eighth of the machine's memory (its rows take about 16 bytes
/// per token), so an endless device or a huge file is an error naming it, not an abort.
pub(crate) fn read_data(path: &Path) -> Result<String> {
    let cap = (crate::config::machine_memory() / 8.0) as u64;
    kiln_models::read_text_capped(path, cap).map_err(|e| TrainerError::io(path, e))
}

fn read_text(path: &Path) -> Result<String> {
    let text = read_data(path)?;
    if text.trim().is_empty() {
        return Err(TrainerError::Data {
            path: path.into(),
            reason: "empty file".into(),
        });
    }
    Ok(text)
}

/// Text files packed into rows: each file's tokens followed by EOS, all concatenated and cut
/// into rows of `seq_len` with `labels = ids`. The last partial row is padded (labels -100).
pub fn pack_text(paths: &[PathBuf], tokenizer: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    if seq_len == 0 {
        return Err(TrainerError::invalid("data.seq_len", "must be positive"));
    }
    let mut stream = Vec::new();
    for path in paths {
        stream.extend(tokenizer.encode(&read_text(path)?)?);
        stream.push(tokenizer.eos());
    }
    Ok(stream
        .chunks(seq_len)
        .map(|chunk| {
            let mut ids = chunk.to_vec();
            let mut labels = chunk.to_vec();
            ids.resize(seq_len, tokenizer.pad());
            labels.resize(seq_len, IGNORE_INDEX);
            Example::new(ids, labels)
        })
        .collect())
}

pub use crate::jsonl::{JsonlData, load_jsonl};

/// Where the training stream is: row `cursor` of epoch `epoch` (saved in checkpoints).
///
/// For addition (an endless stream) `epoch` stays 0 and `cursor` counts rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub cursor: u64,
}

enum Source {
    Addition(AdditionTask),
    Rows(Vec<Example>),
}

/// The training rows (shuffled per epoch for files, an endless stream for addition) and the
/// held-out evaluation rows.
pub struct Dataset {
    source: Source,
    tokenizer: Tokenizer,
    seq_len: usize,
    seed: u64,
    eval: Vec<Example>,
    eval_pairs: Vec<(u64, u64)>,
    truncated: usize,
    /// Rows (train and eval) without a token that counts in the loss.
    no_loss_rows: usize,
    permutation: Mutex<Option<(u64, Arc<Vec<u32>>)>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("rows_per_epoch", &self.rows_per_epoch())
            .field("eval", &self.eval.len())
            .field("seq_len", &self.seq_len)
            .field("seed", &self.seed)
            .field("truncated", &self.truncated)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// Builds the data of `config` (reading its files) with `tokenizer`; `seed` is
    /// `train.seed`.
    ///
    /// Evaluation rows: for addition, `eval_examples` held-out pairs; for files,
    /// `min(eval_examples, rows / 10)` rows picked by a fixed (seed-independent) shuffle and
    /// removed from training.
    pub fn new(config: &DataConfig, tokenizer: Tokenizer, seed: u64) -> Result<Self> {
        let seq_len = config.seq_len;
        let (source, eval, eval_pairs, truncated, no_loss_rows) = match config.task {
            Task::Addition => {
                let task = AdditionTask::with_op(config.digits, seed, config.operation)?;
                let pairs = task.eval_pairs(config.eval_examples);
                let eval = pairs
                    .iter()
                    .map(|&(a, b)| task.example(a, b, &tokenizer, seq_len))
                    .collect::<Result<Vec<_>>>()?;
                // Checks seq_len against the longest training prompt too.
                let m = task.modulus();
                task.example(m - 1, m - 1, &tokenizer, seq_len)?;
                (Source::Addition(task), eval, pairs, 0, 0)
            }
            Task::Text | Task::Jsonl => {
                if config.paths.is_empty() {
                    return Err(TrainerError::invalid(
                        "data.paths",
                        "needs at least one file",
                    ));
                }
                let (train, eval, truncated, blank) = if config.task == Task::Text {
                    let rows = pack_text(&config.paths, &tokenizer, seq_len)?;
                    let (train, eval) = split_eval(rows, config.eval_examples);
                    (train, eval, 0, 0)
                } else {
                    let template = crate::jsonl::chat_template_for(
                        config.chat_template.as_deref(),
                        &tokenizer,
                    )?;
                    let j = load_jsonl(&config.paths, &tokenizer, template.as_ref(), seq_len)?;
                    // JSONL records whose prompt fills seq_len keep no response token: nothing
                    // of them is learned. All of them like that is an error; some, a warning.
                    let blank = j.examples.iter().filter(|r| r.target_tokens() == 0).count();
                    if blank == j.examples.len() {
                        return Err(TrainerError::Data {
                            path: config.paths[0].clone(),
                            reason: format!(
                                "no record keeps a response token within data.seq_len = {seq_len} \
                                 (BOS and the prompt fill it): nothing to train on; raise data.seq_len"
                            ),
                        });
                    }
                    let pad = tokenizer.pad();
                    // Held-out examples are chosen before packing and stay one per row.
                    let (train, mut eval) = split_eval(j.examples, config.eval_examples);
                    for e in &mut eval {
                        e.pad_to(seq_len, pad);
                    }
                    let train = if config.packing {
                        crate::packing::pack(train, seq_len, pad)
                    } else {
                        JsonlData {
                            examples: train,
                            truncated: 0,
                        }
                        .padded(seq_len, pad)
                    };
                    (train, eval, j.truncated, blank)
                };
                if train.is_empty() {
                    return Err(TrainerError::Data {
                        path: config.paths[0].clone(),
                        reason: "no training rows".into(),
                    });
                }
                if train.len() > u32::MAX as usize {
                    return Err(TrainerError::Data {
                        path: config.paths[0].clone(),
                        reason: format!("{} rows: at most 2^32 - 1 are supported", train.len()),
                    });
                }
                (Source::Rows(train), eval, Vec::new(), truncated, blank)
            }
        };
        Ok(Self {
            source,
            tokenizer,
            seq_len,
            seed,
            eval,
            eval_pairs,
            truncated,
            no_loss_rows,
            permutation: Mutex::new(None),
        })
    }

    /// A dataset over given rows (shuffled per epoch with `seed`) and evaluation rows.
    pub fn from_rows(
        rows: Vec<Example>,
        eval: Vec<Example>,
        tokenizer: Tokenizer,
        seed: u64,
    ) -> Result<Self> {
        let seq_len = rows.first().map_or(0, |r| r.ids.len());
        if rows.is_empty() || rows.len() > u32::MAX as usize {
            return Err(TrainerError::Argument(format!(
                "Dataset::from_rows: {} rows (need 1..2^32)",
                rows.len()
            )));
        }
        Ok(Self {
            source: Source::Rows(rows),
            tokenizer,
            seq_len,
            seed,
            eval,
            eval_pairs: Vec::new(),
            truncated: 0,
            no_loss_rows: 0,
            permutation: Mutex::new(None),
        })
    }

    /// The tokenizer the rows were made with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Training rows per epoch; `None` for the endless addition stream.
    pub fn rows_per_epoch(&self) -> Option<u64> {
        match &self.source {
            Source::Addition(_) => None,
            Source::Rows(rows) => Some(rows.len() as u64),
        }
    }

    /// The addition task, when that is the data.
    pub fn addition(&self) -> Option<&AdditionTask> {
        match &self.source {
            Source::Addition(task) => Some(task),
            Source::Rows(_) => None,
        }
    }

    /// Held-out rows for the evaluation loss.
    pub fn eval(&self) -> &[Example] {
        &self.eval
    }

    /// For addition: the `(a, b)` of each [`eval`](Self::eval) row, for exact-match accuracy
    /// by generation; empty otherwise.
    pub fn eval_pairs(&self) -> &[(u64, u64)] {
        &self.eval_pairs
    }

    /// JSONL records cut at `seq_len` (train and eval).
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// Rows (train and eval) without a token that counts in the loss: JSONL records whose
    /// prompt fills `seq_len`.
    pub fn no_loss_rows(&self) -> usize {
        self.no_loss_rows
    }

    /// The position after `rows` training rows from the start.
    pub fn position_after(&self, rows: u64) -> DataPosition {
        match self.rows_per_epoch() {
            None => DataPosition {
                epoch: 0,
                cursor: rows,
            },
            Some(n) => DataPosition {
                epoch: rows / n,
                cursor: rows % n,
            },
        }
    }

    /// The training row at `pos`.
    pub fn row(&self, pos: DataPosition) -> Result<Example> {
        match &self.source {
            Source::Addition(task) => {
                let (a, b) = task.train_pair(pos.cursor);
                task.example(a, b, &self.tokenizer, self.seq_len)
            }
            Source::Rows(rows) => {
                let n = rows.len() as u64;
                if pos.cursor >= n {
                    return Err(TrainerError::Argument(format!(
                        "data position cursor {} is past the {n} training rows of an epoch \
                         (did the data change since the checkpoint?)",
                        pos.cursor
                    )));
                }
                let perm = self.epoch_permutation(pos.epoch, rows.len());
                Ok(rows[perm[pos.cursor as usize] as usize].clone())
            }
        }
    }

    /// The next `rows` training rows from `pos`, advancing it (across epochs as needed).
    /// Every rank calling this with the same position gets the same rows.
    pub fn global_batch(&self, pos: &mut DataPosition, rows: usize) -> Result<Vec<Example>> {
        let mut out = Vec::with_capacity(rows);
        for _ in 0..rows {
            out.push(self.row(*pos)?);
            pos.cursor += 1;
            if let Some(n) = self.rows_per_epoch()
                && pos.cursor >= n
            {
                pos.epoch += 1;
                pos.cursor = 0;
            }
        }
        Ok(out)
    }

    fn epoch_permutation(&self, epoch: u64, n: usize) -> Arc<Vec<u32>> {
        let mut cache = self
            .permutation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((e, perm)) = cache.as_ref()
            && *e == epoch
            && perm.len() == n
        {
            return perm.clone();
        }
        let mut perm: Vec<u32> = (0..n as u32).collect();
        let mut rng = splitmix64(splitmix64(self.seed ^ SHUFFLE_SALT) ^ epoch);
        shuffle(&mut perm, &mut || {
            rng = splitmix64(rng);
            rng
        });
        let perm = Arc::new(perm);
        *cache = Some((epoch, perm.clone()));
        perm
    }
}

/// Splits rows into (train, eval) with a fixed shuffle: `min(eval_examples, len / 10)` eval rows.
fn split_eval(rows: Vec<Example>, eval_examples: usize) -> (Vec<Example>, Vec<Example>) {
    let k = eval_examples.min(rows.len() / 10);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = SPLIT_SALT;
    shuffle(&mut order, &mut || {
        rng = splitmix64(rng);
        rng
    });
    let mut is_eval = vec![false; rows.len()];
    for &i in &order[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (row, e) in rows.into_iter().zip(is_eval) {
        if e { eval.push(row) } else { train.push(row) }
    }
    (train, eval)
}

/// Rank `rank`'s rows of a global batch: `[rank·B/N, (rank+1)·B/N)` for `B` rows and `N` ranks,
/// so the ranks together cover every row exactly once.
pub fn rank_slice<T>(rows: &[T], rank: usize, world: usize) -> Result<&[T]> {
    Ok(&rows[rank_range(rows.len(), rank, world)?])
}

/// The indices of [`rank_slice`] in a global batch of `rows` rows.
pub fn rank_range(rows: usize, rank: usize, world: usize) -> Result<std::ops::Range<usize>> {
    if world == 0 || rank >= world {
        return Err(TrainerError::Argument(format!(
            "rank_slice: rank {rank} is not in a world of {world}"
        )));
    }
    Ok(rank * rows / world..(rank + 1) * rows / world)
}

/// Consecutive micro-batches of `micro` rows (the last one shorter when `micro` does not divide).
pub fn micro_batches<T>(rows: &[T], micro: usize) -> Result<Vec<&[T]>> {
    if micro == 0 {
        return Err(TrainerError::Argument(
            "micro_batches: a micro-batch must hold at least 1 row (train.micro_batch)".into(),
        ));
    }
    Ok(rows.chunks(micro).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh folder for one test (unique per process and call).
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kiln-data-test-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `text` written to `dir/name`.
    pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn addition_config(digits: u32) -> DataConfig {
        DataConfig {
            digits,
            ..DataConfig::default()
        }
    }

    #[test]
    fn addition_example_masks_the_prompt() {
        let task = AdditionTask::new(3, 0).unwrap();
        let t = Tokenizer::Byte;
        let ex = task.example(123, 45, &t, 16).unwrap();
        let text: Vec<i64> = "123+045=".bytes().map(i64::from).collect();
        assert_eq!(ex.ids[0], BYTE_BOS);
        assert_eq!(&ex.ids[1..9], &text[..]);
        assert_eq!(
            &ex.ids[9..14],
            &[b'8' as i64, b'6' as i64, b'1' as i64, b'0' as i64, BYTE_EOS]
        );
        assert!(ex.ids[14..].iter().all(|&i| i == BYTE_PAD));
        assert!(ex.labels[..9].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(&ex.labels[9..14], &ex.ids[9..14]);
        assert!(ex.labels[14..].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(ex.target_tokens(), 5);
        let a3 = AdditionTask::new(3, 0).unwrap();
        assert_eq!(a3.prompt(123, 45), "123+045=");
        assert_eq!(a3.answer(999, 999), "8991");
        assert_eq!(a3.answer(123, 45), "8610");
        assert!(a3.exact_match("8610", 123, 45));
        assert!(a3.exact_match(" 8610\n9+", 123, 45));
        assert!(!a3.exact_match("86100", 123, 45));
        assert!(!a3.exact_match("", 123, 45));
        assert!(!a3.exact_match("x8610", 123, 45));
        assert_eq!(AdditionTask::readable("8610"), "168");
        assert_eq!(AdditionTask::readable("000"), "0");
        assert!(task.example(999, 999, &t, 10).is_err());
        assert!(AdditionTask::new(0, 0).is_err());
    }

    #[test]
    fn addition_eval_is_disjoint_from_training() {
        for digits in [1, 2, 3] {
            let task = AdditionTask::new(digits, 7).unwrap();
            let eval: HashSet<_> = task.eval_pairs(200).into_iter().collect();
            assert!(!eval.is_empty());
            assert!(eval.iter().all(|&(a, b)| AdditionTask::is_eval_pair(a, b)));
            let m = task.modulus();
            for i in 0..20_000 {
                let (a, b) = task.train_pair(i);
                assert!(a < m && b < m);
                assert!(
                    !eval.contains(&(a, b)),
                    "{digits} digits: pair {i} = {a}+{b}"
                );
            }
        }
        let task = AdditionTask::new(3, 7).unwrap();
        assert_eq!(task.eval_pairs(200).len(), 200);
        assert_eq!(task.eval_pairs(200), task.eval_pairs(200));
        // 1 digit: about 10 of the 100 pairs are held out.
        let few = AdditionTask::new(1, 0).unwrap().eval_pairs(200);
        assert!(!few.is_empty() && few.len() < 30, "{}", few.len());
        // Large operands sample instead of enumerating.
        let big = AdditionTask::new(6, 1).unwrap().eval_pairs(50);
        assert_eq!(big.len(), 50);
        // Training pairs are spread out: many distinct pairs, operands of every size.
        let distinct: HashSet<_> = (0..1000).map(|i| task.train_pair(i)).collect();
        assert!(distinct.len() > 990);
    }

    #[test]
    fn addition_dataset() {
        let d = Dataset::new(&addition_config(3), Tokenizer::Byte, 5).unwrap();
        assert_eq!(d.rows_per_epoch(), None);
        assert_eq!(d.eval().len(), 200);
        assert_eq!(d.eval_pairs().len(), 200);
        assert!(d.addition().is_some());
        let mut pos = DataPosition::default();
        let batch = d.global_batch(&mut pos, 32).unwrap();
        assert_eq!(
            pos,
            DataPosition {
                epoch: 0,
                cursor: 32
            }
        );
        assert!(
            batch
                .iter()
                .all(|r| r.ids.len() == 32 && r.labels.len() == 32)
        );
        let short = DataConfig {
            seq_len: 12,
            ..addition_config(3)
        };
        let e = Dataset::new(&short, Tokenizer::Byte, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.seq_len"), "{e}");
    }

    #[test]
    fn text_is_packed_with_eos_between_documents() {
        let dir = temp_dir("text");
        let a = write(&dir, "a.txt", "abcdefghij");
        let b = write(&dir, "b.txt", "xyz");
        let rows = pack_text(&[a.clone(), b.clone()], &Tokenizer::Byte, 8).unwrap();
        let stream: Vec<i64> = "abcdefghij"
            .bytes()
            .map(i64::from)
            .chain([BYTE_EOS])
            .chain("xyz".bytes().map(i64::from))
            .chain([BYTE_EOS])
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ids, stream[..8]);
        assert_eq!(rows[0].labels, rows[0].ids);
        assert_eq!(&rows[1].ids[..7], &stream[8..]);
        assert_eq!(rows[1].ids[7], BYTE_PAD);
        assert_eq!(rows[1].labels[7], IGNORE_INDEX);

        let empty = write(&dir, "empty.txt", " \n");
        let e = pack_text(&[a, empty], &Tokenizer::Byte, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
        let e = pack_text(&[dir.join("missing.txt")], &Tokenizer::Byte, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.txt"), "{e}");
    }

    fn file_dataset(seed: u64) -> Dataset {
        let dir = temp_dir("files");
        let text: String = (0..500).map(|i| format!("line {i}\n")).collect();
        let p = write(&dir, "corpus.txt", &text);
        let config = DataConfig {
            task: Task::Text,
            paths: vec![p],
            seq_len: 16,
            eval_examples: 5,
            ..DataConfig::default()
        };
        Dataset::new(&config, Tokenizer::Byte, seed).unwrap()
    }

    #[test]
    fn file_dataset_shuffles_each_epoch_and_covers_every_row() {
        let d = file_dataset(3);
        let n = d.rows_per_epoch().unwrap() as usize;
        assert_eq!(d.eval().len(), 5);
        let mut pos = DataPosition::default();
        let epoch0 = d.global_batch(&mut pos, n).unwrap();
        assert_eq!(
            pos,
            DataPosition {
                epoch: 1,
                cursor: 0
            }
        );
        let epoch1 = d.global_batch(&mut pos, n).unwrap();
        assert_ne!(epoch0, epoch1, "each epoch has its own order");
        let set = |v: &[Example]| v.iter().map(|e| e.ids.clone()).collect::<HashSet<_>>();
        assert_eq!(set(&epoch0), set(&epoch1));
        // Eval rows are not trained on.
        for e in d.eval() {
            assert!(!epoch0.contains(e));
        }
        // Another seed, another order; the same seed, the same order.
        let mut p = DataPosition::default();
        assert_ne!(file_dataset(4).global_batch(&mut p, n).unwrap(), epoch0);
        let mut p = DataPosition::default();
        assert_eq!(file_dataset(3).global_batch(&mut p, n).unwrap(), epoch0);
        let e = d
            .row(DataPosition {
                epoch: 0,
                cursor: n as u64,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("past the"), "{e}");
    }

    #[test]
    fn resuming_at_a_position_gives_the_same_next_batch() {
        for d in [
            file_dataset(1),
            Dataset::new(&addition_config(2), Tokenizer::Byte, 1).unwrap(),
        ] {
            let mut pos = DataPosition::default();
            for _ in 0..7 {
                d.global_batch(&mut pos, 13).unwrap();
            }
            let saved: DataPosition =
                serde_json::from_str(&serde_json::to_string(&pos).unwrap()).unwrap();
            assert_eq!(saved, d.position_after(7 * 13));
            let expected = d.global_batch(&mut pos, 13).unwrap();
            // A fresh dataset (a restarted process) at the saved position.
            let fresh = if d.addition().is_some() {
                Dataset::new(&addition_config(2), Tokenizer::Byte, 1).unwrap()
            } else {
                file_dataset(1)
            };
            let mut resumed = saved;
            assert_eq!(fresh.global_batch(&mut resumed, 13).unwrap(), expected);
            assert_eq!(resumed, pos);
        }
    }

    #[test]
    fn sharding_covers_every_row_once() {
        for b in [0usize, 1, 5, 16, 32, 33] {
            for world in 1..=5 {
                let rows: Vec<usize> = (0..b).collect();
                let mut seen = Vec::new();
                for rank in 0..world {
                    let slice = rank_slice(&rows, rank, world).unwrap();
                    assert!(slice.len() == b / world || slice.len() == b / world + 1);
                    for micro in micro_batches(slice, 3).unwrap() {
                        assert!(!micro.is_empty() && micro.len() <= 3);
                        seen.extend_from_slice(micro);
                    }
                }
                assert_eq!(seen, rows, "b={b} world={world}");
            }
        }
        assert!(rank_slice(&[1, 2], 2, 2).is_err());
        assert!(rank_slice(&[1, 2], 0, 0).is_err());
        assert!(micro_batches(&[1, 2], 0).is_err());
        // Ranks building their own dataset see the same global batch.
        let (d0, d1) = (file_dataset(9), file_dataset(9));
        let (mut p0, mut p1) = (DataPosition::default(), DataPosition::default());
        assert_eq!(
            d0.global_batch(&mut p0, 32).unwrap(),
            d1.global_batch(&mut p1, 32).unwrap()
        );
    }

    #[test]
    fn collate_stacks_rows() {
        let t = Tokenizer::Byte;
        let task = AdditionTask::new(2, 0).unwrap();
        let rows: Vec<Example> = (0..3)
            .map(|i| {
                let (a, b) = task.train_pair(i);
                task.example(a, b, &t, 12).unwrap()
            })
            .collect();
        let batch = collate(&rows).unwrap();
        assert_eq!((batch.batch, batch.seq_len), (3, 12));
        assert_eq!(&batch.ids[12..24], &rows[1].ids[..]);
        let mut bad = rows.clone();
        bad[2].ids.pop();
        assert!(collate(&bad).unwrap_err().to_string().contains("row 2"));
    }
}
