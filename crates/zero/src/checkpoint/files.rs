//! The rank files of a checkpoint on the read side: their headers indexed, whole buffers or
//! ranges assembled from the pieces every rank wrote.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;
use serde::Deserialize;

use super::manifest::{Manifest, err, io};
use crate::error::Result;

/// A checkpoint's rank files, verified against the manifest's sizes and CRCs, with each file's
/// header read once: where each buffer's piece sits in the file and in the whole buffer.
/// Values are read from the files on demand (positioned reads, never a mapping of the whole
/// file), so a reader holds only the headers and what it is asked for.
pub(super) struct Files {
    files: Vec<(PathBuf, fs::File)>,
    /// Per file: buffer name -> its piece.
    pieces: Vec<HashMap<String, Piece>>,
}

/// One rank's piece of a buffer: `bytes` of the file hold elements `[offset, offset + n)`.
pub(super) struct Piece {
    offset: usize,
    dtype: Dtype,
    bytes: std::ops::Range<usize>,
}

impl Piece {
    pub(super) fn elem_bytes(&self) -> usize {
        elem_bytes(self.dtype)
    }

    pub(super) fn len(&self) -> usize {
        self.bytes.len() / self.elem_bytes()
    }
}

/// Bytes per element of the dtypes a checkpoint stores (f32, bf16, f16).
pub(super) fn elem_bytes(dtype: Dtype) -> usize {
    if dtype == Dtype::F32 { 4 } else { 2 }
}

impl Files {
    pub(super) fn open(dir: &Path, m: &Manifest) -> Result<Self> {
        let mut files = Vec::with_capacity(m.files.len());
        let mut pieces = Vec::with_capacity(m.files.len());
        for f in &m.files {
            let path = dir.join(&f.file);
            let mut file = fs::File::open(&path).map_err(io(&path))?;
            let meta = file.metadata().map_err(io(&path))?;
            if !meta.is_file() {
                return Err(err(&path, "not a regular file"));
            }
            let len = meta.len();
            if len != f.bytes {
                return Err(err(
                    &path,
                    format!(
                        "{len} bytes, the manifest says {} (truncated or replaced)",
                        f.bytes
                    ),
                ));
            }
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(io(&path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let crc = hasher.finalize();
            if crc != f.crc32 {
                return Err(err(
                    &path,
                    format!(
                        "CRC-32 {crc:08x}, the manifest says {:08x} (corrupted)",
                        f.crc32
                    ),
                ));
            }
            pieces.push(Self::index(&path, &file, len)?);
            files.push((path, file));
        }
        Ok(Self { files, pieces })
    }

    /// Reads one file's header: every tensor with its global offset (from the metadata) and
    /// its byte range in the file.
    pub(super) fn index(
        path: &Path,
        mut file: &fs::File,
        len: u64,
    ) -> Result<HashMap<String, Piece>> {
        #[derive(Deserialize)]
        struct Info {
            dtype: Dtype,
            data_offsets: (usize, usize),
        }
        let bad = |msg: &str| err(path, format!("not a safetensors file: {msg}"));
        let mut n = [0u8; 8];
        file.seek(SeekFrom::Start(0)).map_err(io(path))?;
        file.read_exact(&mut n).map_err(io(path))?;
        let n = u64::from_le_bytes(n);
        if n > len.saturating_sub(8) || n > 100 << 20 {
            return Err(bad("header length"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io(path))?;
        let mut json: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(&e.to_string()))?;
        let offsets: HashMap<String, String> = match json.remove("__metadata__") {
            Some(m) => serde_json::from_value(m).map_err(|e| bad(&e.to_string()))?,
            None => HashMap::new(),
        };
        let data_start = 8 + n as usize;
        let mut out = HashMap::new();
        for (name, info) in json {
            let Some(offset) = offsets.get(&name) else {
                continue;
            };
            let info: Info = serde_json::from_value(info).map_err(|e| bad(&e.to_string()))?;
            let offset: usize = offset
                .parse()
                .map_err(|_| err(path, format!("offset of {name} is {offset:?}")))?;
            if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(err(path, format!("{name}: dtype {:?}", info.dtype)));
            }
            let (lo, hi) = info.data_offsets;
            if lo > hi || (data_start + hi) as u64 > len || (hi - lo) % elem_bytes(info.dtype) != 0
            {
                return Err(bad(&format!("{name}: data offsets [{lo}, {hi})")));
            }
            out.insert(
                name,
                Piece {
                    offset,
                    dtype: info.dtype,
                    bytes: data_start + lo..data_start + hi,
                },
            );
        }
        Ok(out)
    }

    /// Assembles the whole `len`-element buffer `name` from the pieces in every file, as f32.
    pub(super) fn assemble(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.range(name, 0..len, len)
    }

    /// Elements `want` of the `len`-element buffer `name`, as f32, read from the pieces of
    /// every file that hold part of it.
    pub(super) fn range(
        &self,
        name: &str,
        want: std::ops::Range<usize>,
        len: usize,
    ) -> Result<Vec<f32>> {
        // What the files hold for `name`, counted before anything is allocated: a manifest
        // whose shapes ask for more than the files hold is an error, not an allocation.
        let held: usize = self
            .pieces
            .iter()
            .filter_map(|p| p.get(name))
            .map(Piece::len)
            .sum();
        if held != len || want.start > want.end || want.end > len {
            return Err(err(
                &self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
                format!(
                    "{name}: the files hold {held} elements, the manifest asks for [{}, {}) of {len}",
                    want.start, want.end
                ),
            ));
        }
        let mut out = vec![0.0f32; want.len()];
        let mut covered = 0usize;
        for ((path, file), pieces) in self.files.iter().zip(&self.pieces) {
            let Some(piece) = pieces.get(name) else {
                continue;
            };
            let (offset, n) = (piece.offset, piece.len());
            if offset.checked_add(n).is_none_or(|end| end > len) {
                return Err(err(
                    path,
                    format!(
                        "{name}: {n} elements at offset {offset} are outside the buffer of {len}"
                    ),
                ));
            }
            let (lo, hi) = (want.start.max(offset), want.end.min(offset + n));
            if lo >= hi {
                continue;
            }
            let size = piece.elem_bytes();
            let mut file: &fs::File = file;
            file.seek(SeekFrom::Start(
                (piece.bytes.start + (lo - offset) * size) as u64,
            ))
            .map_err(io(path))?;
            // Converted 256k elements at a time: the bytes are never held whole.
            let mut bytes = vec![0u8; (hi - lo).min(1 << 18) * size];
            for (chunk, dst) in out[lo - want.start..hi - want.start]
                .chunks_mut(1 << 18)
                .enumerate()
            {
                let bytes = &mut bytes[..dst.len() * size];
                file.read_exact(bytes).map_err(io(path))?;
                match piece.dtype {
                    Dtype::F32 => {
                        for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                    Dtype::BF16 => {
                        for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                            *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                        }
                    }
                    Dtype::F16 => {
                        for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                            *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
                        }
                    }
                    other => return Err(err(path, format!("{name}: dtype {other:?}"))),
                }
                if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
                    let at = lo + (chunk << 18) + i;
                    return Err(err(
                        path,
                        format!(
                            "{name}: element {at} is {} (kiln never writes a non-finite \
                             checkpoint: damaged or written by an older kiln)",
                            dst[i]
                        ),
                    ));
                }
            }
            covered += hi - lo;
        }
        if covered != want.len() {
            return Err(err(
                &self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
                format!(
                    "{name}: the files hold {covered} of the {} elements [{}, {})",
                    want.len(),
                    want.start,
                    want.end
                ),
            ));
        }
        Ok(out)
    }
}
