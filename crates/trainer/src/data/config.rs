//! `[data]` of the job: the task, its files, the tokenizer, and the checks of those fields
//! ([`DataConfig::validate`], the one place they are made).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// `data.task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Synthetic `a+b=` examples ([`super::AdditionTask`]); `data.paths` is not used.
    #[default]
    Addition,
    /// Plain text files, concatenated and packed into rows of `seq_len`.
    Text,
    /// JSON Lines of `prompt`/`response`, `prompt`/`completion` or `messages` records, the
    /// shape recognised per line ([`super::jsonl`]); the loss is on the response or the
    /// assistant turns only.
    Jsonl,
}

/// `data.tokenizer`: `"auto"` (the default), `"byte"`, or the path of a Hugging Face
/// `tokenizer.json` (or of the folder holding it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TokenizerSpec {
    /// The `tokenizer.json` of `model.pretrained` when it has one, else the byte tokenizer.
    #[default]
    Auto,
    /// Bytes 0..=255 plus BOS/EOS/PAD (vocabulary 259), see [`super::Tokenizer`].
    Byte,
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
}

impl From<String> for TokenizerSpec {
    fn from(s: String) -> Self {
        match s.as_str() {
            "auto" => TokenizerSpec::Auto,
            "byte" => TokenizerSpec::Byte,
            _ => TokenizerSpec::File(s.into()),
        }
    }
}

impl From<TokenizerSpec> for String {
    fn from(t: TokenizerSpec) -> Self {
        match t {
            TokenizerSpec::Auto => "auto".into(),
            TokenizerSpec::Byte => "byte".into(),
            TokenizerSpec::File(p) => p.to_string_lossy().into_owned(),
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub task: Task,
    /// Input files for `text` and `jsonl`.
    pub paths: Vec<PathBuf>,
    /// Tokens per row (default 32, at least 8).
    pub seq_len: usize,
    pub tokenizer: TokenizerSpec,
    /// A Jinja chat template file for `messages` records, instead of the tokenizer's own
    /// (`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`).
    pub chat_template: Option<PathBuf>,
    /// `jsonl`: several examples per row ([`super::packing`]) instead of one padded example.
    pub packing: bool,
    /// Operand digits for `addition` (default 2, 1..=9).
    pub digits: u32,
    /// `add` (default) or `sub` for the `addition` task.
    pub operation: Operation,
    /// Held-out examples for evaluation (default 200).
    pub eval_examples: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            task: Task::Addition,
            paths: Vec::new(),
            seq_len: 32,
            tokenizer: TokenizerSpec::Auto,
            chat_template: None,
            packing: false,
            digits: 2,
            operation: Operation::Add,
            eval_examples: 200,
        }
    }
}

/// The arithmetic of the synthetic task (`data.operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    #[default]
    Add,
    /// `a - b` with the larger operand first: the related task of the LoRA recipe.
    Sub,
}

/// The operand digits the addition task supports (`data.digits`).
pub const DIGITS: std::ops::RangeInclusive<u32> = 1..=9;

/// `data.digits` is in [`DIGITS`].
pub fn check_digits(digits: u32) -> Result<()> {
    if !DIGITS.contains(&digits) {
        return Err(TrainerError::invalid(
            "data.digits",
            format!("{digits} must be in 1..=9"),
        ));
    }
    Ok(())
}

impl DataConfig {
    /// Checks the `[data]` fields alone and together; the error names the dotted field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(TrainerError::invalid(field, reason));
        if self.seq_len < 8 {
            return bad(
                "data.seq_len",
                format!("{} must be at least 8", self.seq_len),
            );
        }
        match self.task {
            Task::Addition => {
                if self.packing {
                    return bad(
                        "data.packing",
                        "applies to task jsonl (addition rows are one example each)".into(),
                    );
                }
                check_digits(self.digits)?;
                // BOS, d digits, '+', d digits, '=', d + 1 digits, EOS.
                let need = 3 * self.digits as usize + 5;
                if self.seq_len < need {
                    return bad(
                        "data.seq_len",
                        format!(
                            "{} is too short for {}-digit addition (needs {need})",
                            self.seq_len, self.digits
                        ),
                    );
                }
            }
            Task::Text | Task::Jsonl => {
                if self.packing && self.task == Task::Text {
                    return bad(
                        "data.packing",
                        "applies to task jsonl (text is always packed as one stream)".into(),
                    );
                }
                if self.paths.is_empty() {
                    return bad(
                        "data.paths",
                        format!(
                            "task {} needs at least one file",
                            if self.task == Task::Text {
                                "text"
                            } else {
                                "jsonl"
                            }
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}
