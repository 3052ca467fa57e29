//! Chat templates: a model's Hugging Face `chat_template` (Jinja) rendered with minijinja in the
//! environment transformers gives it, and the assistant turns of a rendered conversation.
//!
//! # The environment
//! As transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`, loop controls
//! (`{% break %}`, `{% continue %}`), Python's string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`, through minijinja-contrib's pycompat), and the helpers HF
//! defines: `raise_exception(msg)` (an error naming the data line), `strftime_now(fmt)` (the
//! time the template was loaded, UTC, so every render of a run agrees) and `tojson` as Python's
//! `json.dumps` writes it (`", "` and `": "` separators, `indent=`, no HTML escaping). The
//! variables are `messages`, `add_generation_prompt`, `tools` (a record's `tools`, else none),
//! `documents` (none), `bos_token`, `eos_token` and `pad_token`. transformers' `{% generation %}`
//! markers are dropped (kiln finds assistant turns itself, below).
//!
//! # Assistant turns (where the loss is)
//! Found by rendering prefixes of the conversation, as TRL did before templates carried
//! generation markers: for the assistant message `i`, its turn starts where
//! `render(messages[..i], add_generation_prompt = true)` ends (after the assistant header the
//! template writes for a reply) and ends where `render(messages[..=i])` ends, less trailing
//! whitespace (so ChatML's `<|im_end|>\n` teaches `<|im_end|>`, Llama 3's turn ends with
//! `<|eot_id|>`). Both renders must be prefixes of the whole conversation's render; a template
//! that renders a turn differently once later turns follow (Qwen3 dropping earlier reasoning) is
//! an error naming the record, not a silent mislabel. The end-of-turn token is in the span, so
//! the model learns to stop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::error::{Result, TrainerError};

const NAME: &str = "chat_template";

/// A compiled chat template and where it came from.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// The file the template was read from (for a `tokenizer_config.json` field, that file).
    path: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The special tokens a template sees as variables.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

impl ChatTemplate {
    /// A template file (`chat_template.jinja`, or any `.jinja` named by `data.chat_template`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        Self::new(source, path.to_path_buf())
    }

    /// The `chat_template` field of a `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which `default` is used); `None` when there is none.
    pub fn from_tokenizer_config(json: &serde_json::Value, path: &Path) -> Result<Option<Self>> {
        let bad = |reason: &str| TrainerError::Tokenizer {
            path: path.into(),
            reason: reason.into(),
        };
        let source = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| bad("chat_template is a list without a `default` template"))?
                .to_string(),
            Some(_) => return Err(bad("chat_template must be a string or a list")),
        };
        Self::new(source, path.to_path_buf()).map(Some)
    }

    /// Compiles `source` in transformers' environment; a syntax error names `path:line`.
    pub fn new(source: String, path: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&path, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        env.add_function("strftime_now", move |format: &str| strftime(now, format));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, strip_generation_tags(&source))
            .map_err(|e| template_error(&path, &e))?;
        Ok(Self {
            env: Arc::new(env),
            path,
        })
    }

    /// This template with `strftime_now` telling the time `unix` (seconds, UTC) instead of the
    /// time it was loaded: renders that name the date (Llama 3's "Today Date") reproducible.
    pub fn at_time(&self, unix: i64) -> Self {
        let mut env = (*self.env).clone();
        env.add_function("strftime_now", move |format: &str| strftime(unix, format));
        Self {
            env: Arc::new(env),
            path: self.path.clone(),
        }
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text of `messages` (a JSON array of message objects) as the model sees it.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        specials: &SpecialTokens,
    ) -> std::result::Result<String, Error> {
        let json = |v: &serde_json::Value| -> std::result::Result<Value, Error> {
            serde_json::from_value(v.clone())
                .map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))
        };
        let messages = messages
            .iter()
            .map(json)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert(
            "tools",
            tools.map(json).transpose()?.unwrap_or(Value::from(())),
        );
        ctx.insert("documents", Value::from(()));
        for (name, token) in [
            ("bos_token", &specials.bos_token),
            ("eos_token", &specials.eos_token),
            ("pad_token", &specials.pad_token),
        ] {
            if let Some(t) = token {
                ctx.insert(name, Value::from(t.as_str()));
            }
        }
        self.env.get_template(NAME)?.render(ctx)
    }

    /// The rendered conversation and the byte ranges of its assistant turns (see the module
    /// docs for the method). Errors are messages for the caller to place at `file:line`.
    pub fn assistant_spans(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        specials: &SpecialTokens,
    ) -> std::result::Result<(String, Vec<Range<usize>>), String> {
        let describe = |e: Error| self.describe(&e);
        let full = self
            .render(messages, tools, false, specials)
            .map_err(describe)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                continue;
            }
            let before = self
                .render(&messages[..i], tools, true, specials)
                .map_err(describe)?;
            let through = self
                .render(&messages[..=i], tools, false, specials)
                .map_err(describe)?;
            let through = through.trim_end();
            if !full.starts_with(&before)
                || !full.starts_with(through)
                || through.len() < before.len()
            {
                return Err(format!(
                    "the chat template ({}) does not render this conversation prefix by prefix at \
                     message {i}: kiln finds assistant turns by rendering the messages before each \
                     (with add_generation_prompt) and through it, which must begin the whole render",
                    self.path.display()
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }

    /// A render error as a message: `raise_exception`'s own text, or the template line.
    fn describe(&self, e: &Error) -> String {
        let place = match e.line() {
            Some(line) => format!("{}:{line}", self.path.display()),
            None => self.path.display().to_string(),
        };
        match e.detail() {
            Some(d) if d.starts_with(RAISED) => {
                format!("the chat template raised: {} ({place})", &d[RAISED.len()..])
            }
            Some(d) => format!("chat template {place}: {}: {d}", e.kind()),
            None => format!("chat template {place}: {}", e.kind()),
        }
    }
}

/// How `raise_exception`'s errors are told apart from the template's own.
const RAISED: &str = "raise_exception: ";

/// A compile error as `path:line: reason`.
fn template_error(path: &Path, e: &Error) -> TrainerError {
    let reason = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_string);
    match e.line() {
        Some(line) => TrainerError::DataLine {
            path: path.into(),
            line,
            reason: format!("chat template: {}: {reason}", e.kind()),
        },
        None => TrainerError::Tokenizer {
            path: path.into(),
            reason: format!("chat template: {reason}"),
        },
    }
}

/// transformers' `{% generation %}` / `{% endgeneration %}` markers (its AssistantTracker
/// extension) have no output: removed before compiling.
fn strip_generation_tags(source: &str) -> String {
    let mut out = source.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), "");
        }
    }
    out
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // transformers accepts these too; kiln writes keys in the order it holds them.
    for unused in ["ensure_ascii", "sort_keys", "separators"] {
        let _: Option<Value> = kwargs.get(unused)?;
    }
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let _ = write!(out, "{value}");
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &key.to_string());
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {} as JSON", value.kind()),
            ));
        }
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `time.strftime(format)` at `unix` seconds, UTC: `%Y %y %m %d %e %j %H %M %S %p %I %b %B %a %A
/// %%`; other directives are written as they are.
pub fn strftime(unix: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[(month - 1) as usize];
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), "t.jinja".into()).unwrap()
    }

    fn msgs(v: serde_json::Value) -> Vec<serde_json::Value> {
        v.as_array().unwrap().clone()
    }

    #[test]
    fn strftime_matches_python() {
        // python: time.strftime("%d %b %Y %H:%M:%S %A %j", time.gmtime(1721952000 + 3723))
        assert_eq!(
            strftime(1_721_952_000 + 3723, "%d %b %Y %H:%M:%S %A %j"),
            "26 Jul 2024 01:02:03 Friday 208"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a %%"), "1970-01-01 Thu %");
        assert_eq!(strftime(951_782_400, "%d %B %Y"), "29 February 2000");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = template("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ s | tojson }}");
        let x = serde_json::json!({"a": [1, 2.5, true, null], "b": {}});
        let specials = SpecialTokens::default();
        let rendered = t
            .env
            .get_template(NAME)
            .unwrap()
            .render(minijinja::context! {
                x => serde_json::from_value::<Value>(x).unwrap(),
                s => "<\"é\">\n",
            })
            .unwrap();
        assert_eq!(
            rendered,
            "{\"a\": [1, 2.5, true, null], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"b\": {}\n}|\"<\\\"é\\\">\\n\""
        );
        let _ = specials;
    }

    #[test]
    fn helpers_and_python_methods() {
        let t = template(
            "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
             {{ m.content.strip().upper() }}{% if m.content.startswith(' x') %}!{% endif %}\
             {% endfor %}{{ strftime_now('%Y')|length }}",
        );
        let s = t
            .render(
                &msgs(serde_json::json!([
                    {"role": "user", "content": " xa "},
                    {"role": "skip", "content": "no"},
                    {"role": "user", "content": "b"}
                ])),
                None,
                false,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(s, "XA!B4");
        let t = template("{{ raise_exception('only user and assistant roles') }}");
        let e = t
            .assistant_spans(&[], None, &SpecialTokens::default())
            .unwrap_err();
        assert!(e.contains("raised: only user and assistant roles"), "{e}");
    }

    #[test]
    fn syntax_and_render_errors_name_the_template_line() {
        let e = ChatTemplate::new(
            "line one\n{% for m in messages %}\n{{ m }".into(),
            "c.jinja".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.jinja:3"), "{e}");
        let t = template("ok\n{{ messages[0].content.nope() }}");
        let e = t
            .assistant_spans(
                &msgs(serde_json::json!([{"role": "user", "content": "a"}])),
                None,
                &SpecialTokens::default(),
            )
            .unwrap_err();
        assert!(e.contains("t.jinja:2"), "{e}");
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        // Renders the last assistant message differently from earlier ones.
        let t = template(
            "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}",
        );
        let e = t
            .assistant_spans(
                &msgs(serde_json::json!([
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"}
                ])),
                None,
                &SpecialTokens::default(),
            )
            .unwrap_err();
        assert!(e.contains("prefix by prefix at message 1"), "{e}");
    }

    #[test]
    fn generation_tags_are_dropped() {
        let t = template(
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
        );
        let (text, spans) = t
            .assistant_spans(
                &msgs(serde_json::json!([
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}
                ])),
                None,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(text, "qa");
        assert_eq!(spans, vec![std::ops::Range { start: 1, end: 2 }]);
    }
}
