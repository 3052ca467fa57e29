//! Loading a job: the TOML file, `--set key=value` overrides at dotted paths, errors that name
//! the file, line and field, and the resolved config written back as TOML.

use std::path::Path;

use super::job::TrainConfig;
use crate::error::{Result, TrainerError};

impl TrainConfig {
    /// Reads `path` (none: the defaults), applies `overrides` (`key=value`, dotted keys, values
    /// parsed as TOML and taken as a string when they do not parse), then validates.
    ///
    /// Errors name the file (with line and column for TOML syntax), the `--set` argument, or
    /// the full dotted field (`unknown field optim.lrr`).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = kiln_models::read_text_capped(path, kiln_models::CONFIG_CAP)
                    .map_err(|e| TrainerError::io(path, e))?;
                // Check the file alone first: its errors keep their line and column.
                let config_err = |reason: String| TrainerError::ConfigFile {
                    path: path.into(),
                    reason,
                };
                let de = toml::Deserializer::parse(&text).map_err(|e| config_err(e.to_string()))?;
                let _: TrainConfig = serde_path_to_error::deserialize(de)
                    .map_err(|e| config_err(describe(&e.path().to_string(), e.inner())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| config_err(e.to_string()))?
            }
        };
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        let config = Self::from_table(table).map_err(|reason| match path {
            Some(p) if !overrides.is_empty() => TrainerError::ConfigFile {
                path: p.into(),
                reason: format!("{reason} (after --set overrides)"),
            },
            _ => TrainerError::ConfigSchema { reason },
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses the text of a TOML config (no overrides) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| TrainerError::ConfigSchema {
            reason: e.to_string(),
        })?;
        let config: TrainConfig =
            serde_path_to_error::deserialize(de).map_err(|e| TrainerError::ConfigSchema {
                reason: describe(&e.path().to_string(), e.inner()),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: toml::Table) -> std::result::Result<Self, String> {
        serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| describe(&e.path().to_string(), e.inner()))
    }

    /// The resolved config as TOML (what a run saves in its output folder); loads back equal.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| TrainerError::ConfigSchema {
            reason: format!("cannot write as TOML: {e}"),
        })
    }
}

/// The message of a deserialization error with its dotted path (serde_path_to_error's path ends
/// at an unknown key itself, so `unknown field optim.lrr` names the whole path).
fn describe(path: &str, inner: &dyn std::fmt::Display) -> String {
    let inner = inner.to_string();
    let inner = inner.trim_end();
    if path.is_empty() || path == "." {
        return inner.to_string();
    }
    if let Some(rest) = inner.strip_prefix("unknown field `")
        && let Some((_, rest)) = rest.split_once('`')
    {
        format!("unknown field {path}{rest}")
    } else if inner.contains("unknown field `") {
        format!("unknown field {path}: {inner}")
    } else {
        format!("{path}: {inner}")
    }
}

/// Applies one `key=value` override to `table`.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<()> {
    let err = |reason: &str| TrainerError::Override {
        arg: arg.into(),
        reason: reason.into(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key=value"))?;
    let key = key.trim();
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        return Err(err("empty key segment"));
    }
    let value = parse_value(raw.trim());
    let (last, middle) = segments.split_last().expect("split yields one segment");
    let mut node = table;
    for (i, seg) in middle.iter().enumerate() {
        let entry = node
            .entry(seg.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(err(&format!(
                    "`{}` is a {}, not a table",
                    segments[..=i].join("."),
                    other.type_str()
                )));
            }
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// A `--set` value: TOML if it parses (`3`, `1e-3`, `true`, `["a", "b"]`, `"x"`), else a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kiln_zero::Stage;

    use super::super::presets::preset_config;
    use super::super::sections::ComputeDtype;
    use super::*;
    use crate::data::config::{Task, TokenizerSpec};

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kiln-config-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn set(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn empty_is_default_and_valid() {
        let c = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(c, TrainConfig::default());
        assert_eq!(
            TrainConfig::from_toml_str("").unwrap(),
            TrainConfig::default()
        );
        assert_eq!(c.accumulation_steps().unwrap(), 1);
        assert_eq!(c.zero.stage, Stage::Three);
        assert_eq!(c.precision.compute, ComputeDtype::Bf16);
        assert_eq!(c.optim.max_grad_norm, Some(1.0));
    }

    #[test]
    fn overrides_apply_at_dotted_paths() {
        let c = TrainConfig::load(
            None,
            &set(&[
                "optim.lr=3e-4",
                "data.task=text",
                "data.paths=[\"a.txt\", \"b.txt\"]",
                "dist.world_size=4",
                "train.global_batch=128",
                "lora.enabled=true",
                "lora.target_modules=[\"q_proj\"]",
                "data.tokenizer=/tmp/tok.json",
                "optim.max_grad_norm=0",
                "model.pretrained=/models/x y",
            ]),
        )
        .unwrap();
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(c.data.task, Task::Text);
        assert_eq!(c.data.paths, vec![PathBuf::from("a.txt"), "b.txt".into()]);
        assert_eq!(c.dist.world_size, 4);
        assert_eq!(c.accumulation_steps().unwrap(), 1);
        assert!(c.lora.enabled);
        assert_eq!(
            c.data.tokenizer,
            TokenizerSpec::File("/tmp/tok.json".into())
        );
        assert_eq!(c.optim.max_grad_norm, None);
        assert_eq!(c.model.pretrained, Some("/models/x y".into()));
    }

    #[test]
    fn file_then_overrides() {
        let path = temp_file("ok", "[optim]\nlr = 0.01\n[train]\nsteps = 7\n");
        let c = TrainConfig::load(Some(&path), &set(&["train.steps=9"])).unwrap();
        assert_eq!(c.optim.lr, 0.01);
        assert_eq!(c.train.steps, 9);
    }

    #[test]
    fn unknown_fields_name_the_dotted_path() {
        let e = TrainConfig::load(None, &set(&["optim.lrr=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field optim.lrr"), "{e}");
        let e = TrainConfig::load(None, &set(&["nope.x=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field nope"), "{e}");

        let path = temp_file("unknown", "[optim]\nlr = 0.01\n\n[train]\nstepz = 3\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml"), "{e}");
        assert!(e.contains("unknown field train.stepz"), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn type_and_syntax_errors_keep_file_line_and_field() {
        let path = temp_file("syntax", "[optim]\nlr = = 1\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("job.toml") && e.contains("line 2"), "{e}");

        let path = temp_file("type", "[data]\nseq_len = \"long\"\n");
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("data.seq_len") && e.contains("line 2"), "{e}");

        let e = TrainConfig::load(None, &set(&["data.task=images"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.task"), "{e}");

        let e = TrainConfig::load(Some(Path::new("/nonexistent/kiln.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kiln.toml"), "{e}");
    }

    #[test]
    fn bad_overrides() {
        let e = TrainConfig::load(None, &set(&["optim.lr"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--set optim.lr") && e.contains("key=value"),
            "{e}"
        );
        let e = TrainConfig::load(None, &set(&["optim.lr=1", "optim.lr.x=2"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`optim.lr` is a integer, not a table"), "{e}");
        let e = TrainConfig::load(None, &set(&["optim..lr=1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty key segment"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("optim.lr=0", "optim.lr"),
            ("optim.lr=-1e-3", "optim.lr"),
            ("optim.betas=[0.9, 1.0]", "optim.betas[1]"),
            ("data.seq_len=4", "data.seq_len"),
            ("data.seq_len=10", "data.seq_len"),
            ("data.digits=0", "data.digits"),
            ("dist.world_size=0", "dist.world_size"),
            ("dist.world_size=3", "train.global_batch"),
            ("train.micro_batch=0", "train.micro_batch"),
            ("data.task=jsonl", "data.paths"),
            ("model.preset=huge", "model.preset"),
            ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
            ("data.packing=true", "data.packing"),
        ];
        for (arg, field) in cases {
            let e = TrainConfig::load(None, &set(&[arg]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("config field {field}")), "{arg}: {e}");
        }
        let e = TrainConfig::load(None, &set(&["zero.stage=4"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero.stage: 4 must be 0, 1, 2 or 3"), "{e}");
        let e = TrainConfig::load(None, &set(&["lora.enabled=true", "lora.r=0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora.r"), "{e}");
        let e = TrainConfig::load(None, &set(&["dist.world_size=3"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dist.world_size") && e.contains("train.micro_batch"),
            "{e}"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let c = TrainConfig::load(
            None,
            &set(&[
                "optim.max_grad_norm=0",
                "data.tokenizer=tok.json",
                "data.chat_template=chat.jinja",
                "data.packing=true",
                "data.task=jsonl",
                "data.paths=[\"a.jsonl\"]",
                "lora.adapter=ad",
                "precision.compute=f16",
                "dist.backend=threads",
            ]),
        )
        .unwrap();
        let text = c.to_toml().unwrap();
        assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), c, "{text}");
        let d = TrainConfig::default();
        assert_eq!(
            TrainConfig::from_toml_str(&d.to_toml().unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn preset_builds() {
        let c = preset_config("tiny-addition").unwrap();
        assert_eq!(c.vocab_size, crate::data::BYTE_VOCAB_SIZE);
        assert_eq!(c.hidden_size, 64);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.max_position_embeddings, 64);
        assert!(
            preset_config("nope")
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        let job = TrainConfig::default().model_config().unwrap();
        assert_eq!(job, c);
        let e = TrainConfig::load(None, &set(&["data.seq_len=65"]))
            .unwrap()
            .model_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.seq_len"), "{e}");
    }
}
