//! Plain text files: read (capped by the machine's memory), tokenized and packed into rows.

use std::path::{Path, PathBuf};

use super::example::{Example, IGNORE_INDEX};
use super::tokenizer::Tokenizer;
use crate::error::{Result, TrainerError};

/// Reads a data file: at most an eighth of the machine's memory (its rows take about 16 bytes
/// per token), so an endless device or a huge file is an error naming it, not an abort.
pub(crate) fn read_data(path: &Path) -> Result<String> {
    let cap = (crate::fits::machine_memory() / 8.0) as u64;
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

#[cfg(test)]
mod tests {
    use super::super::test_files::{temp_dir, write};
    use super::super::tokenizer::{BYTE_EOS, BYTE_PAD};
    use super::*;

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
}
