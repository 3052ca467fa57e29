//! The synthetic task: `a+b=` (or `a-b=`) with the answer written least significant digit first,
//! held-out pairs that training never sees, and exact match by generation.

use std::collections::HashSet;

use super::config::{Operation, check_digits};
use super::example::Example;
use super::rng::{SHUFFLE_SALT, below, shuffle, splitmix64};
use super::tokenizer::Tokenizer;
use crate::error::{Result, TrainerError};

const TRAIN_SALT: u64 = 0x7472_6169_6e00_0001;
const EVAL_SALT: u64 = 0x6576_616c_0000_0002;

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
        check_digits(digits)?;
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

#[cfg(test)]
mod tests {
    use super::super::example::IGNORE_INDEX;
    use super::super::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD};
    use super::*;

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
}
