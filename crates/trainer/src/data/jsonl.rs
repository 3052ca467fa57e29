//! Supervised data from JSON Lines, one record a line, its shape recognised per line:
//!
//! | line | row | loss on |
//! | --- | --- | --- |
//! | `{"prompt": "...", "response": "..."}` | `[BOS] prompt response EOS` | `response EOS` |
//! | `{"prompt": "...", "completion": "..."}` (TRL prompt-completion) | the same | `completion EOS` |
//! | `{"messages": [{"role": ..., "content": ...}, ...]}` (TRL conversational) | the chat template's render | the assistant turns |
//! | `{"prompt": [messages], "completion": [messages]}` (TRL conversational prompt-completion) | the render of both | the completion's assistant turns |
//!
//! Conversations are rendered with the model's chat template ([`super::chat`]; a record's
//! `tools` are passed to it) and tokenized as one text; a token is learned when it starts inside
//! an assistant turn. The template writes its own special tokens (BOS, end of turn), so kiln
//! adds none. Other fields are ignored and blank lines skipped. Errors name `file:line`:
//! invalid JSON, an unknown shape, a missing or mistyped field, a conversation without an
//! assistant turn or without a chat template to render it, and what the template raised.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat::{ChatTemplate, SpecialTokens};
use super::example::{Example, IGNORE_INDEX};
use super::text::read_data;
use super::tokenizer::Tokenizer;
use crate::error::{Result, TrainerError};

/// The records of JSON Lines files, tokenized and cut at `seq_len`, not padded (see
/// [`JsonlData::padded`] and [`super::packing::pack`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlData {
    /// One example per record, in file order.
    pub examples: Vec<Example>,
    /// Records cut at `seq_len`.
    pub truncated: usize,
}

impl JsonlData {
    /// One row per record, right-padded to `seq_len`.
    pub fn padded(self, seq_len: usize, pad: i64) -> Vec<Example> {
        let mut rows = self.examples;
        for r in &mut rows {
            r.pad_to(seq_len, pad);
        }
        rows
    }
}

/// Reads JSON Lines files (see the module docs). `template` renders conversations (the
/// tokenizer's chat template, or `data.chat_template`).
pub fn load_jsonl(
    paths: &[PathBuf],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    seq_len: usize,
) -> Result<JsonlData> {
    let specials = special_tokens(tokenizer);
    let mut examples = Vec::new();
    let mut truncated = 0;
    for path in paths {
        let text = read_data(path)?;
        let before = examples.len();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| TrainerError::DataLine {
                path: path.clone(),
                line: i + 1,
                reason,
            };
            let record = parse_record(line).map_err(bad)?;
            let (mut example, cut) = match record {
                Record::Supervised { prompt, response } => {
                    let prompt = tokenizer.encode(&prompt)?;
                    let response = tokenizer.encode(&response)?;
                    Example::supervised_unpadded(&prompt, &response, tokenizer, seq_len)
                }
                Record::Chat {
                    messages,
                    tools,
                    learn_from,
                } => {
                    let template = template.ok_or_else(|| {
                        bad("a conversation, but the tokenizer has no chat template \
                             (chat_template.jinja or tokenizer_config.json's chat_template; \
                             or set data.chat_template)"
                            .into())
                    })?;
                    chat_example(
                        tokenizer,
                        template,
                        &specials,
                        &messages,
                        tools.as_ref(),
                        learn_from,
                    )
                    .map_err(bad)?
                }
            };
            let cut = cut || example.ids.len() > seq_len;
            example.ids.truncate(seq_len);
            example.labels.truncate(seq_len);
            truncated += usize::from(cut);
            examples.push(example);
        }
        if examples.len() == before {
            return Err(TrainerError::Data {
                path: path.clone(),
                reason: "no records (empty file)".into(),
            });
        }
    }
    Ok(JsonlData {
        examples,
        truncated,
    })
}

/// The special tokens of `tokenizer` as text, for a template.
fn special_tokens(tokenizer: &Tokenizer) -> SpecialTokens {
    let text = |id: Option<i64>| id.and_then(|id| tokenizer.token_text(id));
    SpecialTokens {
        bos_token: text(tokenizer.bos()),
        eos_token: text(Some(tokenizer.eos())),
        pad_token: text(Some(tokenizer.pad())),
    }
}

/// One line's record.
enum Record {
    Supervised {
        prompt: String,
        response: String,
    },
    Chat {
        messages: Vec<Value>,
        tools: Option<Value>,
        /// Assistant turns from this message on are learned (0, or the prompt's length for a
        /// conversational prompt-completion).
        learn_from: usize,
    },
}

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value.as_object().ok_or_else(|| {
        "expected a JSON object with `messages`, `prompt`/`completion` or `prompt`/`response`"
            .to_string()
    })?;
    let tools = obj.get("tools").filter(|t| !t.is_null()).cloned();
    if let Some(messages) = obj.get("messages") {
        let messages = messages_of("messages", messages)?;
        return Ok(Record::Chat {
            messages,
            tools,
            learn_from: 0,
        });
    }
    let Some(prompt) = obj.get("prompt") else {
        return Err(
            "expected `messages`, `prompt`/`completion` or `prompt`/`response` (missing field `prompt`)"
                .into(),
        );
    };
    let (name, answer) = match (obj.get("completion"), obj.get("response")) {
        (Some(c), _) => ("completion", c),
        (None, Some(r)) => ("response", r),
        (None, None) => return Err("missing field `response` (or `completion`)".into()),
    };
    match (prompt, answer) {
        (Value::Array(_), Value::Array(_)) => {
            let mut messages = messages_of("prompt", prompt)?;
            let learn_from = messages.len();
            messages.extend(messages_of(name, answer)?);
            Ok(Record::Chat {
                messages,
                tools,
                learn_from,
            })
        }
        (Value::String(p), Value::String(a)) => Ok(Record::Supervised {
            prompt: p.clone(),
            response: a.clone(),
        }),
        (Value::String(_), _) => Err(format!("field `{name}` must be a string")),
        (Value::Array(_), _) => Err(format!(
            "field `{name}` must be a list of messages, as `prompt` is"
        )),
        _ => Err("field `prompt` must be a string (or a list of messages)".into()),
    }
}

/// Checks a list of messages: objects with a string `role` and a string `content` (or none, for
/// an assistant turn that only calls tools).
fn messages_of(field: &str, value: &Value) -> std::result::Result<Vec<Value>, String> {
    let list = value
        .as_array()
        .ok_or_else(|| format!("field `{field}` must be a list of messages"))?;
    if list.is_empty() {
        return Err(format!("field `{field}` is an empty list of messages"));
    }
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(format!(
                "{field}[{i}] must be an object with role and content"
            ));
        };
        match m.get("role") {
            Some(Value::String(_)) => {}
            None => return Err(format!("{field}[{i}]: missing field `role`")),
            Some(_) => return Err(format!("{field}[{i}]: field `role` must be a string")),
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) if m.contains_key("tool_calls") => {}
            None => return Err(format!("{field}[{i}]: missing field `content`")),
            Some(_) => return Err(format!("{field}[{i}]: field `content` must be a string")),
        }
    }
    Ok(list.clone())
}

/// A conversation as one example: the template's text tokenized once, labels on the tokens
/// that start inside a learned assistant turn. Not cut at any length.
fn chat_example(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    specials: &SpecialTokens,
    messages: &[Value],
    tools: Option<&Value>,
    learn_from: usize,
) -> std::result::Result<(Example, bool), String> {
    let (text, spans) = template.assistant_spans(messages, tools, specials)?;
    let assistant: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .map(|(i, _)| i)
        .collect();
    let learned: Vec<Range<usize>> = assistant
        .iter()
        .zip(spans)
        .filter(|(i, _)| **i >= learn_from)
        .map(|(_, s)| s)
        .collect();
    if learned.is_empty() {
        return Err(if learn_from == 0 {
            "a conversation without an assistant turn (nothing to learn)".into()
        } else {
            "the completion has no assistant turn (nothing to learn)".into()
        });
    }
    let (ids, offsets) = tokenizer
        .encode_with_offsets(&text)
        .map_err(|e| e.to_string())?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, _))| {
            if learned.iter().any(|s| s.contains(&start)) {
                id
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok((Example::new(ids, labels), false))
}

/// The chat template a run renders conversations with: `data.chat_template` when set, else the
/// tokenizer's own.
pub fn chat_template_for(
    configured: Option<&Path>,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>> {
    match configured {
        Some(path) => ChatTemplate::from_file(path).map(Some),
        None => Ok(tokenizer.chat_template().cloned()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_files::{temp_dir, write};
    use super::super::tokenizer::{BYTE_BOS, BYTE_EOS, BYTE_PAD};
    use super::*;

    #[test]
    fn prompt_response_and_completion_mask_the_prompt() {
        let dir = temp_dir("jsonl");
        let p = write(
            &dir,
            "ok.jsonl",
            "{\"prompt\": \"ab\", \"response\": \"cd\", \"id\": 1}\n\n{\"prompt\": \"0123456789\", \"response\": \"xyz\"}\n{\"prompt\": \"ab\", \"completion\": \"cd\"}\n",
        );
        let data = load_jsonl(std::slice::from_ref(&p), &Tokenizer::Byte, None, 8).unwrap();
        assert_eq!(data.examples.len(), 3);
        assert_eq!(data.truncated, 1);
        let c = |ch: u8| i64::from(ch);
        assert_eq!(
            data.examples[0].ids,
            vec![BYTE_BOS, c(b'a'), c(b'b'), c(b'c'), c(b'd'), BYTE_EOS]
        );
        assert_eq!(
            data.examples[2], data.examples[0],
            "TRL's completion = response"
        );
        let rows = data.padded(8, BYTE_PAD);
        let ex = &rows[0];
        assert_eq!(&ex.ids[6..], &[BYTE_PAD, BYTE_PAD]);
        assert_eq!(
            ex.labels,
            vec![-100, -100, -100, c(b'c'), c(b'd'), BYTE_EOS, -100, -100]
        );
        let cut = &rows[1];
        assert_eq!(cut.ids.len(), 8);
        assert!(cut.labels.iter().all(|&l| l == IGNORE_INDEX));
    }

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = temp_dir("badjsonl");
        let cases = [
            (
                "syntax.jsonl",
                "{\"prompt\": \"a\", \"response\": \"b\"}\n{oops\n",
                ":2: invalid JSON",
            ),
            (
                "missing.jsonl",
                "\n{\"prompt\": \"a\"}\n",
                ":2: missing field `response`",
            ),
            (
                "type.jsonl",
                "{\"prompt\": 3, \"response\": \"b\"}\n",
                ":1: field `prompt` must be a string",
            ),
            (
                "completion.jsonl",
                "{\"prompt\": \"a\", \"completion\": [1]}\n",
                ":1: field `completion` must be a string",
            ),
            ("array.jsonl", "[1, 2]\n", ":1: expected a JSON object"),
            (
                "shape.jsonl",
                "{\"text\": \"a\"}\n",
                ":1: expected `messages`",
            ),
            (
                "role.jsonl",
                "{\"messages\": [{\"content\": \"a\"}]}\n",
                ":1: messages[0]: missing field `role`",
            ),
            (
                "content.jsonl",
                "{\"messages\": [{\"role\": \"user\", \"content\": 1}]}\n",
                ":1: messages[0]: field `content` must be a string",
            ),
            (
                "notemplate.jsonl",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
                ":1: a conversation, but the tokenizer has no chat template",
            ),
            ("empty.jsonl", "\n  \n", "no records"),
        ];
        for (name, text, expect) in cases {
            let p = write(&dir, name, text);
            let e = load_jsonl(&[p], &Tokenizer::Byte, None, 16)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name) && e.contains(expect), "{name}: {e}");
        }
    }

    #[test]
    fn conversations_learn_assistant_turns_only() {
        let dir = temp_dir("chat");
        // A tiny ChatML-like template over bytes: "<u>q</u><a>r</a>".
        let template = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role[0] }}>{{ m.content }}</{{ m.role[0] }}>{% endfor %}\
             {% if add_generation_prompt %}<a>{% endif %}"
                .into(),
            dir.join("t.jinja"),
        )
        .unwrap();
        let p = write(
            &dir,
            "chat.jsonl",
            concat!(
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}, {"role": "user", "content": "s"}, {"role": "assistant", "content": "tt"}]}"#,
                "\n",
                r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "completion": [{"role": "assistant", "content": "tt"}]}"#,
                "\n",
                r#"{"messages": [{"role": "user", "content": "q"}]}"#,
                "\n",
            ),
        );
        let e = load_jsonl(
            std::slice::from_ref(&p),
            &Tokenizer::Byte,
            Some(&template),
            64,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("chat.jsonl:3: a conversation without an assistant turn"),
            "{e}"
        );
        let text: String = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .take(2)
            .map(|l| format!("{l}\n"))
            .collect();
        let p = write(&dir, "chat2.jsonl", &text);
        let data = load_jsonl(&[p], &Tokenizer::Byte, Some(&template), 64).unwrap();
        let learned = |e: &Example| -> String {
            e.labels
                .iter()
                .map(|&l| {
                    if l == IGNORE_INDEX {
                        '.'
                    } else {
                        l as u8 as char
                    }
                })
                .collect()
        };
        let rendered: String = data.examples[0]
            .ids
            .iter()
            .map(|&i| i as u8 as char)
            .collect();
        assert_eq!(rendered, "<u>q</u><a>r</a><u>s</u><a>tt</a>");
        let dots = |n: usize| ".".repeat(n);
        let want = format!("{}r</a>{}tt</a>", dots(11), dots(11));
        assert_eq!(learned(&data.examples[0]), want);
        // Conversational prompt-completion: only the completion's turn is learned.
        assert_eq!(learned(&data.examples[1]), format!("{}tt</a>", dots(19)));
    }
}
