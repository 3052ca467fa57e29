//! Tokenizers: kiln's byte tokenizer (for the presets) and Hugging Face `tokenizer.json`
//! (the `tokenizers` crate), with the special tokens and the chat template of the folder.
//!
//! Ids are `i64`, as burn's `Int` tensors and the labels. Special tokens are never added by
//! [`Tokenizer::encode`]; examples add BOS/EOS/PAD themselves, and a chat template writes its
//! own (`<|begin_of_text|>`, `<|im_start|>`) as text, which `encode` maps to their ids, as
//! transformers' `apply_chat_template(tokenize=True)` does.

use std::path::{Path, PathBuf};

use super::chat::ChatTemplate;
use super::config::TokenizerSpec;
use crate::error::{Result, TrainerError};

/// Vocabulary of [`Tokenizer::Byte`]: 256 bytes and BOS, EOS, PAD.
pub const BYTE_VOCAB_SIZE: usize = 259;
/// Byte tokenizer: beginning of sequence.
pub const BYTE_BOS: i64 = 256;
/// Byte tokenizer: end of sequence.
pub const BYTE_EOS: i64 = 257;
/// Byte tokenizer: padding.
pub const BYTE_PAD: i64 = 258;

/// Token ids and each token's byte range in the text.
pub type Encoding = (Vec<i64>, Vec<(usize, usize)>);

/// A tokenizer: the built-in byte tokenizer or a Hugging Face `tokenizer.json`.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// UTF-8 bytes 0..=255, BOS 256, EOS 257, PAD 258.
    Byte,
    /// UTF-8 bytes 0..=255 with a model's own special ids inside that range (a byte-level HF
    /// model with a 256-token vocabulary, like the fixture Llama: BOS 1, EOS 2, PAD = EOS).
    ByteSpecial {
        bos: Option<i64>,
        eos: i64,
        pad: i64,
    },
    /// A Hugging Face tokenizer.
    Hf(Box<HfTokenizer>),
}

/// A Hugging Face tokenizer with its special tokens resolved and the folder's chat template.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// The tokenizer that `data.tokenizer` names (`auto` without a model folder is `byte`; see
    /// [`crate::train::tokenizer_for`] for `auto` with one).
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self> {
        match spec {
            TokenizerSpec::Auto | TokenizerSpec::Byte => Ok(Tokenizer::Byte),
            TokenizerSpec::File(path) => Self::from_file(path),
        }
    }

    /// Loads a Hugging Face `tokenizer.json` (or a folder holding one).
    ///
    /// Special tokens come from `tokenizer_config.json` next to it when present
    /// (`bos_token`, `eos_token`, `pad_token`), else from well-known names (`<s>`, `</s>`,
    /// `<|begin_of_text|>`, `<|end_of_text|>`, `<|endoftext|>`, `<pad>`, ...). PAD defaults to
    /// EOS. A missing EOS is an error. The chat template is `chat_template.jinja` next to it
    /// (as transformers 5 saves it) or the `chat_template` field of `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        HfTokenizer::load(path).map(|t| Tokenizer::Hf(Box::new(t)))
    }

    /// Token ids of `text`, without added BOS/EOS (special tokens written in the text are
    /// recognised by an HF tokenizer).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// [`encode`](Self::encode) with each token's byte range in `text` (the byte tokenizer:
    /// one byte per token).
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoding> {
        match self {
            Tokenizer::Byte | Tokenizer::ByteSpecial { .. } => Ok((
                text.bytes().map(i64::from).collect(),
                (0..text.len()).map(|i| (i, i + 1)).collect(),
            )),
            Tokenizer::Hf(t) => t.encode(text),
        }
    }

    /// Text of `ids`; special tokens and ids outside the vocabulary are skipped (invalid UTF-8
    /// from the byte tokenizer is replaced by U+FFFD).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::ByteSpecial { bos, eos, pad } => {
                let special = |id: i64| Some(id) == *bos || id == *eos || id == *pad;
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter(|&&id| !special(id))
                    .filter_map(|&id| u8::try_from(id).ok())
                    .collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => t.decode(ids),
        }
    }

    /// Number of ids (the model's `vocab_size` must be at least this).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => BYTE_VOCAB_SIZE,
            Tokenizer::ByteSpecial { .. } => 256,
            Tokenizer::Hf(t) => t.inner.get_vocab_size(true),
        }
    }

    /// Beginning-of-sequence id, if the tokenizer has one.
    pub fn bos(&self) -> Option<i64> {
        match self {
            Tokenizer::Byte => Some(BYTE_BOS),
            Tokenizer::ByteSpecial { bos, .. } => *bos,
            Tokenizer::Hf(t) => t.bos.map(i64::from),
        }
    }

    /// End-of-sequence id.
    pub fn eos(&self) -> i64 {
        match self {
            Tokenizer::Byte => BYTE_EOS,
            Tokenizer::ByteSpecial { eos, .. } => *eos,
            Tokenizer::Hf(t) => i64::from(t.eos),
        }
    }

    /// Padding id (its labels are always [`crate::data::IGNORE_INDEX`]).
    pub fn pad(&self) -> i64 {
        match self {
            Tokenizer::Byte => BYTE_PAD,
            Tokenizer::ByteSpecial { pad, .. } => *pad,
            Tokenizer::Hf(t) => i64::from(t.pad),
        }
    }

    /// The chat template of the tokenizer's folder, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            Tokenizer::Hf(t) => t.chat_template.as_ref(),
            _ => None,
        }
    }

    /// The text of a special id as a chat template sees it (`bos_token`, `eos_token`).
    pub fn token_text(&self, id: i64) -> Option<String> {
        match self {
            Tokenizer::Hf(t) => t.inner.id_to_token(u32::try_from(id).ok()?),
            _ => None,
        }
    }

    /// This tokenizer with `template` as its chat template (`data.chat_template`).
    pub fn with_chat_template(self, template: ChatTemplate) -> Self {
        match self {
            Tokenizer::Hf(mut t) => {
                t.chat_template = Some(template);
                Tokenizer::Hf(t)
            }
            // The byte tokenizers keep no template: data loading is handed one explicitly.
            other => other,
        }
    }
}

impl HfTokenizer {
    fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let err = |reason: String| TrainerError::Tokenizer {
            path: file.clone(),
            reason,
        };
        if !file.is_file() {
            return Err(err("no such file".into()));
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| err(e.to_string()))?;
        let config_path = file.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = kiln_models::read_text_capped(&config_path, kiln_models::CONFIG_CAP)
                .map_err(|e| TrainerError::io(&config_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TrainerError::Tokenizer {
                    path: config_path.clone(),
                    reason: e.to_string(),
                })?;
            Some(json)
        } else {
            None
        };
        let token = |key: &str| -> Option<String> {
            match config.as_ref()?.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let find = |configured: Option<String>, known: &[&str]| -> Option<u32> {
            configured
                .iter()
                .map(String::as_str)
                .chain(known.iter().copied())
                .find_map(|t| inner.token_to_id(t))
        };
        let bos = find(
            token("bos_token"),
            &["<|begin_of_text|>", "<s>", "<bos>", "[CLS]"],
        );
        let eos = find(
            token("eos_token"),
            &[
                "<|end_of_text|>",
                "</s>",
                "<eos>",
                "<|endoftext|>",
                "<|im_end|>",
                "[SEP]",
            ],
        )
        .ok_or_else(|| {
            err(
                "no end-of-sequence token (eos_token in tokenizer_config.json, or </s>, \
                 <|end_of_text|>, <|endoftext|>, <eos>)"
                    .into(),
            )
        })?;
        let pad = find(token("pad_token"), &["<pad>", "<|pad|>", "[PAD]"]).unwrap_or(eos);
        let jinja = file.with_file_name("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(ChatTemplate::from_file(&jinja)?)
        } else {
            match config.as_ref() {
                Some(json) => ChatTemplate::from_tokenizer_config(json, &config_path)?,
                None => None,
            }
        };
        Ok(Self {
            inner,
            path: file,
            bos,
            eos,
            pad,
            chat_template,
        })
    }

    fn encode(&self, text: &str) -> Result<Encoding> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TrainerError::Tokenizer {
                path: self.path.clone(),
                reason: format!("encode: {e}"),
            })?;
        Ok((
            enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
            enc.get_offsets().to_vec(),
        ))
    }

    fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| TrainerError::Tokenizer {
                path: self.path.clone(),
                reason: format!("decode: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips() {
        let t = Tokenizer::Byte;
        let ids = t.encode("héllo 1+2=").unwrap();
        assert_eq!(ids.len(), "héllo 1+2=".len());
        let mut with_specials = vec![BYTE_BOS];
        with_specials.extend(&ids);
        with_specials.extend([BYTE_EOS, BYTE_PAD, -100]);
        assert_eq!(t.decode(&with_specials).unwrap(), "héllo 1+2=");
        assert_eq!(t.vocab_size(), 259);
        assert_eq!((t.bos(), t.eos(), t.pad()), (Some(256), 257, 258));
        let (_, offsets) = t.encode_with_offsets("ab").unwrap();
        assert_eq!(offsets, vec![(0, 1), (1, 2)]);
        assert!(t.chat_template().is_none());
    }

    #[test]
    fn hf_tokenizer_loads_with_specials() {
        let dir = std::env::temp_dir().join(format!("kiln-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let special = |id: u32, content: &str| {
            format!(
                r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
            )
        };
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{}],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{{"<s>":0,"</s>":1,"hello":2,"world":3,"[UNK]":4}},"unk_token":"[UNK]"}}}}"#,
            special(0, "<s>"),
            special(1, "</s>")
        );
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let t = Tokenizer::from_spec(&TokenizerSpec::File(path)).unwrap();
        assert_eq!((t.bos(), t.eos(), t.pad()), (Some(0), 1, 1));
        assert_eq!(t.vocab_size(), 5);
        assert_eq!(t.encode("hello world").unwrap(), vec![2, 3]);
        assert_eq!(
            t.encode_with_offsets("hello world").unwrap().1,
            vec![(0, 5), (6, 11)]
        );
        assert_eq!(t.decode(&[0, 2, 3, 1]).unwrap(), "hello world");
        assert_eq!(t.token_text(1).as_deref(), Some("</s>"));
        assert!(t.chat_template().is_none());
        // A folder holding tokenizer.json works too; a bad file names itself.
        assert!(Tokenizer::from_file(&dir).is_ok());
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json"), "{e}");
    }
}
