//! Command-line definitions of the `kiln` binary (clap derive); no behaviour.
//!
//! ```text
//! kiln train    [--config FILE] [--set k=v]... [--world-size N] [--resume [DIR]]
//! kiln eval     [--config FILE] [--set k=v]... (--checkpoint DIR | --pretrained DIR) [--data FILE...]
//! kiln generate (--checkpoint DIR | --pretrained DIR) --prompt TEXT [--max-new-tokens N]
//!               [--temperature T] [--top-p P] [--seed S] [--greedy]
//! kiln estimate [--model config.json | --psi N] [--frozen N] [-n N] [--stage S] [--k K]
//!               [--batch B --seq S]
//! kiln export   --checkpoint DIR --out DIR [--merge] [--peft]
//! ```

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// kiln: train and fine-tune Llama models with mixed precision, ZeRO and LoRA.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum Command {
    /// Train (or fine-tune) a model as the config describes.
    Train(TrainArgs),
    /// Evaluation loss, perplexity and (for addition) exact-match accuracy.
    Eval(EvalArgs),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Per-rank memory of model states for each ZeRO stage.
    Estimate(EstimateArgs),
    /// Export a checkpoint as Hugging Face safetensors or a PEFT adapter.
    Export(ExportArgs),
}

/// A TOML config file and `--set` overrides (see [`crate::config::TrainConfig::load`]).
#[derive(Debug, Clone, PartialEq, Default, Args)]
pub struct ConfigArgs {
    /// TOML config file (default: the built-in tiny addition job).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a config field, e.g. `--set optim.lr=3e-4` (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// `kiln train`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Number of ranks: sugar for `--set dist.world_size=N` (wins over `--set`).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub world_size: Option<usize>,
    /// Resume from a checkpoint folder, or without a value from the latest checkpoint in
    /// `train.output_dir`.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// A built-in recipe instead of one run: `lora-vs-full` pretrains the default job (or reuses
    /// it), then fine-tunes it on subtraction with full fine-tuning and with LoRA (r = 8 on q, v)
    /// and prints the comparison table.
    #[arg(long, value_name = "NAME")]
    pub recipe: Option<Recipe>,
}

/// `kiln train --recipe`: the built-in recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recipe {
    /// Full fine-tuning next to LoRA on subtraction, from the default job.
    LoraVsFull,
}

impl TrainArgs {
    /// The overrides to pass to `TrainConfig::load`: `--set` values, then `--world-size`.
    pub fn overrides(&self) -> Vec<String> {
        let mut out = self.config.set.clone();
        if let Some(n) = self.world_size {
            out.push(format!("dist.world_size={n}"));
        }
        out
    }
}

/// The model to load: exactly one of a kiln checkpoint or a Hugging Face folder.
#[derive(Debug, Clone, PartialEq, Default, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// A kiln checkpoint folder.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// A Hugging Face model folder (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    pub pretrained: Option<PathBuf>,
}

/// `kiln eval`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub source: ModelSource,
    /// Data files to evaluate on (instead of the config's held-out rows).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub data: Vec<PathBuf>,
}

/// `kiln generate`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct GenerateArgs {
    /// The device (`--set dist.device=wgpu`) and, for `--pretrained`, the tokenizer and dtype.
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub source: ModelSource,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 32,
        allow_negative_numbers = true
    )]
    pub max_new_tokens: usize,
    #[arg(
        long,
        value_name = "T",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub top_p: f32,
    #[arg(
        long,
        value_name = "S",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub seed: u64,
    /// Always take the most likely token (ignores temperature and top-p).
    #[arg(long)]
    pub greedy: bool,
}

/// `kiln estimate`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct EstimateArgs {
    /// Count the parameters of a Hugging Face config.json.
    #[arg(long, value_name = "CONFIG", conflicts_with = "psi")]
    pub model: Option<PathBuf>,
    /// Trainable parameters (Ψ), e.g. 7.5e9.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub psi: Option<f64>,
    /// Frozen parameters (e.g. a LoRA base model).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frozen: f64,
    /// Number of ranks.
    #[arg(
        short = 'n',
        long = "ranks",
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub ranks: usize,
    /// Only this ZeRO stage (0-3); default: all.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u8).range(0..=3))]
    pub stage: Option<u8>,
    /// Bytes of master weights + optimizer state per trainable parameter.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 12.0,
        allow_negative_numbers = true
    )]
    pub k: f64,
    /// Micro-batch rows, for the activation memory (with `--seq`).
    #[arg(
        long,
        value_name = "B",
        requires = "seq",
        allow_negative_numbers = true
    )]
    pub batch: Option<usize>,
    /// Sequence length, for the activation memory (with `--batch`).
    #[arg(
        long,
        value_name = "S",
        requires = "batch",
        allow_negative_numbers = true
    )]
    pub seq: Option<usize>,
    /// Bytes per activation element: 2 (bf16, f16; the default) or 4 (f32).
    #[arg(long, value_name = "BYTES", default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=4))]
    pub activation_bytes: u8,
}

/// `kiln export`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct ExportArgs {
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Merge LoRA adapters into the base weights.
    #[arg(long)]
    pub merge: bool,
    /// Write the LoRA adapter as a PEFT folder.
    #[arg(long)]
    pub peft: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Command, clap::Error> {
        Cli::try_parse_from(line.split_whitespace()).map(|c| c.command)
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn train() {
        let Command::Train(t) = parse(
            "kiln train --config job.toml --set optim.lr=3e-4 --set data.task=text --world-size 4",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(t.config.config, Some("job.toml".into()));
        assert_eq!(t.resume, None);
        assert_eq!(
            t.overrides(),
            vec!["optim.lr=3e-4", "data.task=text", "dist.world_size=4"]
        );
        let Command::Train(t) = parse("kiln train --resume").unwrap() else {
            panic!()
        };
        assert_eq!(t.resume, Some(None));
        let Command::Train(t) = parse("kiln train --resume runs/x/ckpt-100").unwrap() else {
            panic!()
        };
        assert_eq!(t.resume, Some(Some("runs/x/ckpt-100".into())));
        assert!(t.overrides().is_empty());
    }

    #[test]
    fn eval_and_generate_need_exactly_one_model() {
        let Command::Eval(e) = parse("kiln eval --checkpoint ck --data a.jsonl b.jsonl").unwrap()
        else {
            panic!()
        };
        assert_eq!(e.source.checkpoint, Some("ck".into()));
        assert_eq!(e.data.len(), 2);
        assert!(parse("kiln eval").is_err());
        assert!(parse("kiln eval --checkpoint a --pretrained b").is_err());

        let Command::Generate(g) =
            parse("kiln generate --pretrained hf --prompt 12+34= --greedy --max-new-tokens 5")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(g.source.pretrained, Some("hf".into()));
        assert_eq!(
            (g.prompt.as_str(), g.greedy, g.max_new_tokens),
            ("12+34=", true, 5)
        );
        assert_eq!((g.temperature, g.top_p, g.seed), (1.0, 1.0, 0));
        assert!(parse("kiln generate --prompt hi").is_err());
    }

    #[test]
    fn estimate_and_export() {
        let Command::Estimate(e) =
            parse("kiln estimate --psi 7.5e9 -n 64 --stage 3 --batch 4 --seq 2048").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (e.psi, e.ranks, e.stage, e.k),
            (Some(7.5e9), 64, Some(3), 12.0)
        );
        assert_eq!((e.batch, e.seq), (Some(4), Some(2048)));
        assert!(parse("kiln estimate --psi 1 --stage 4").is_err());
        assert!(parse("kiln estimate --psi 1 --batch 4").is_err());
        assert!(parse("kiln estimate --psi 1 --model c.json").is_err());
        let Command::Estimate(e) = parse("kiln estimate --model c.json --ranks 8").unwrap() else {
            panic!()
        };
        assert_eq!((e.model, e.ranks), (Some("c.json".into()), 8));

        let Command::Export(x) = parse("kiln export --checkpoint c --out o --peft").unwrap() else {
            panic!()
        };
        assert_eq!((x.merge, x.peft), (false, true));
        assert!(parse("kiln export --out o").is_err());
    }

    #[test]
    fn negative_numbers_are_values_not_flags() {
        let Command::Generate(g) =
            parse("kiln generate --pretrained m --prompt hi --temperature -1 --top-p -0.5")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!((g.temperature, g.top_p), (-1.0, -0.5));
        let Command::Estimate(e) = parse("kiln estimate --psi -1e9 --frozen -1 --k -12").unwrap()
        else {
            panic!()
        };
        assert_eq!((e.psi, e.frozen, e.k), (Some(-1e9), -1.0, -12.0));
        // An unsigned flag given a negative number is a value error naming the flag.
        let e = parse("kiln estimate --psi 1 -n -4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("-4") && e.contains("--ranks"), "{e}");
    }
}
