//! The resumable stream of global batches ([`Dataset`], [`DataPosition`]) and each rank's slice
//! of them ([`rank_slice`], [`micro_batches`]).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::addition::AdditionTask;
use super::config::{DataConfig, Task};
use super::example::Example;
use super::jsonl::{JsonlData, chat_template_for, load_jsonl};
use super::rng::{SHUFFLE_SALT, shuffle, splitmix64};
use super::text::pack_text;
use super::tokenizer::Tokenizer;
use crate::error::{Result, TrainerError};

const SPLIT_SALT: u64 = 0x7370_6c69_7400_0003;

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
        config.validate()?;
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
                let (train, eval, truncated, blank) = if config.task == Task::Text {
                    let rows = pack_text(&config.paths, &tokenizer, seq_len)?;
                    let (train, eval) = split_eval(rows, config.eval_examples);
                    (train, eval, 0, 0)
                } else {
                    let template = chat_template_for(config.chat_template.as_deref(), &tokenizer)?;
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
                        super::packing::pack(train, seq_len, pad)
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
mod tests {
    use std::collections::HashSet;

    use super::super::test_files::{temp_dir, write};
    use super::*;

    fn addition_config(digits: u32) -> DataConfig {
        DataConfig {
            digits,
            ..DataConfig::default()
        }
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
}
