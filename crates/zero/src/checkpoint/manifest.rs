//! `manifest.json` and the small file operations of a checkpoint folder: atomic writes,
//! checksums, the `latest` pointer.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use kiln_precision::ScalerState;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ZeroError};
use crate::plan::Stage;

/// The manifest's `format` field.
pub const FORMAT: &str = "kiln-checkpoint/1";
/// Name of the manifest in a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";
/// Name of the file in the checkpoint root that names the newest complete checkpoint.
pub const LATEST: &str = "latest";

/// What `manifest.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// `crc32:xxxxxxxx` of the manifest's own text without this line (see
    /// [`manifest_text`]): an edited or damaged manifest is refused like a damaged rank file.
    /// Set when written; `None` in a manifest being built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    pub format: String,
    /// Ranks that wrote the checkpoint.
    pub world_size: usize,
    pub stage: Stage,
    /// Compute dtype of the run (the dtype the frozen parameters are stored in).
    pub compute_dtype: String,
    /// AdamW steps taken.
    pub optimizer_step: u64,
    /// Loss scaler state (f16 runs).
    pub scaler: Option<ScalerState>,
    /// Parameters of every unit, in flat order.
    pub units: Vec<UnitManifest>,
    /// One file per rank, with its size and CRC-32.
    pub files: Vec<FileManifest>,
    /// The caller's state (trainer: step, data position, rng, config).
    pub extra: serde_json::Value,
}

/// The parameters of one unit, in flat order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnitManifest {
    pub trainable: Vec<(String, Vec<usize>)>,
    pub frozen: Vec<(String, Vec<usize>)>,
}

/// One rank's file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileManifest {
    pub rank: usize,
    pub file: String,
    pub bytes: u64,
    pub crc32: u32,
}

pub(super) fn err(path: &Path, msg: impl Into<String>) -> ZeroError {
    ZeroError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> ZeroError + '_ {
    move |e| err(path, e.to_string())
}

/// Writes `bytes` to `path` through a temporary file, synced and renamed: readers see either the
/// old file or the whole new one.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("part");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Reads a regular text file of at most `cap` bytes (a manifest).
pub(super) fn read_small(path: &Path, cap: u64) -> Result<String> {
    let file = fs::File::open(path).map_err(io(path))?;
    if !file.metadata().map_err(io(path))?.is_file() {
        return Err(err(path, "not a regular file"));
    }
    let mut text = String::new();
    file.take(cap + 1)
        .read_to_string(&mut text)
        .map_err(io(path))?;
    if text.len() as u64 > cap {
        return Err(err(path, format!("more than {} MB", cap >> 20)));
    }
    Ok(text)
}

/// fsyncs a folder, so the names created or renamed in it survive a crash (the files' own
/// contents were synced before their rename by [`write_atomic`]). On platforms where a folder
/// cannot be opened (Windows) this does nothing.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    match fs::File::open(dir) {
        Ok(d) => d.sync_all().or_else(|e| match e.kind() {
            // Some filesystems do not sync folders; the renames are as durable as they get.
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported => Ok(()),
            _ => Err(err(dir, format!("fsync of the folder: {e}"))),
        }),
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(err(dir, e.to_string())),
    }
}

/// The line that carries the manifest's checksum, as `serde_json::to_vec_pretty` writes the
/// first field of [`Manifest`].
pub(super) const CHECKSUM_LINE: &str = "\n  \"checksum\": \"crc32:";

/// The text of `manifest.json`: the pretty JSON of `m`, with `checksum` set to the CRC-32 of
/// that same text without its checksum line.
pub fn manifest_text(m: &Manifest) -> Result<Vec<u8>> {
    let mut m = m.clone();
    m.checksum = None;
    let body = serde_json::to_vec_pretty(&m).map_err(|e| ZeroError::Model(e.to_string()))?;
    m.checksum = Some(format!("crc32:{:08x}", crc32fast::hash(&body)));
    serde_json::to_vec_pretty(&m).map_err(|e| ZeroError::Model(e.to_string()))
}

/// Checks the checksum of a manifest's text (`path` names it in errors).
pub(super) fn verify_manifest(path: &Path, text: &str) -> Result<()> {
    let Some(at) = text
        .find(CHECKSUM_LINE)
        .filter(|&at| text[..at].trim() == "{")
    else {
        return Err(err(
            path,
            "no checksum line (written by a kiln without manifest checksums, or edited)",
        ));
    };
    let end = text[at + 1..].find('\n').map_or(text.len(), |n| at + 1 + n);
    let line = &text[at + 1..end];
    let stored = line
        .trim()
        .trim_end_matches(',')
        .trim_start_matches("\"checksum\": \"crc32:")
        .trim_end_matches('"');
    let body = format!("{}{}", &text[..at], &text[end..]);
    let actual = format!("{:08x}", crc32fast::hash(body.as_bytes()));
    if stored != actual {
        return Err(err(
            path,
            format!(
                "checksum crc32:{actual}, the manifest says crc32:{stored} (edited or corrupted; \
                 a manifest cannot be changed by hand)"
            ),
        ));
    }
    Ok(())
}

pub(super) fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

pub(super) fn st_dtype(d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        other => {
            return Err(ZeroError::Config {
                field: "policy.compute",
                msg: format!("{other:?} cannot be checkpointed"),
            });
        }
    })
}

/// The newest complete checkpoint under `root` (named by `root/latest`), if any.
pub fn latest_checkpoint(root: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    let root = root.as_ref();
    let latest = root.join(LATEST);
    match fs::read_to_string(&latest) {
        Ok(name) => {
            let name = name.trim();
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(err(
                    &latest,
                    format!("names {name:?}, which is not a checkpoint folder name"),
                ));
            }
            let dir = root.join(name);
            if !dir.join(MANIFEST).is_file() {
                return Err(err(
                    &latest,
                    format!("names {}, which has no {MANIFEST}", dir.display()),
                ));
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(&latest, e.to_string())),
    }
}

/// Reads and checks `dir/manifest.json`.
pub fn read_manifest(dir: impl AsRef<Path>) -> Result<Manifest> {
    let path = dir.as_ref().join(MANIFEST);
    let text = read_small(&path, 256 << 20)?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| err(&path, e.to_string()))?;
    verify_manifest(&path, &text)?;
    if m.format != FORMAT {
        return Err(err(
            &path,
            format!("format {:?}, expected {FORMAT:?}", m.format),
        ));
    }
    if m.files.len() != m.world_size {
        return Err(err(
            &path,
            format!("{} files for {} ranks", m.files.len(), m.world_size),
        ));
    }
    for f in &m.files {
        // A file name is a plain name inside the folder, never a path out of it.
        if f.file.is_empty() || f.file.contains(['/', '\\']) || f.file.starts_with('.') {
            return Err(err(
                &path,
                format!(
                    "rank {} file {:?} is not a file name in the folder",
                    f.rank, f.file
                ),
            ));
        }
    }
    Ok(m)
}
