//! Sharded checkpoints (DESIGN.md, Files): one safetensors file per rank plus `manifest.json`,
//! written under a temporary name and renamed when every rank is done; checksums verified on
//! load; loadable with another world size or stage.
//!
//! Each unit has two flat buffers (trainable, frozen), unpadded here. Rank r writes the part of
//! each buffer it owns: its shard under a stage that shards it, else its `shard_of` slice (so
//! N ranks of a DDP run write the model once between them, not N times). A file holds, per unit
//! `u`, the tensors `u{u}.master`, `u{u}.exp_avg`, `u{u}.exp_avg_sq` (f32) and `u{u}.frozen`
//! (compute dtype), with the global offset of each piece in the file's safetensors metadata.
//! Loading assembles whole buffers from every file and cuts this rank's shards from them, so
//! N and the stage may change between save and load.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use kiln_dist::{ReduceOp, shard_of};
use kiln_precision::{AdamWState, ScalerState};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{Result, ZeroError};
use crate::plan::Stage;
use crate::shard::split;
use crate::units::Units;

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

fn err(path: &Path, msg: impl Into<String>) -> ZeroError {
    ZeroError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ZeroError + '_ {
    move |e| err(path, e.to_string())
}

/// Writes `bytes` to `path` through a temporary file, synced and renamed: readers see either the
/// old file or the whole new one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("part");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// A writer that counts and checksums what goes through it (a rank file's length and CRC-32
/// for the manifest, computed as it is written).
struct Hashed<W: Write> {
    w: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Hashed<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        self.w.write_all(bytes)
    }
}

/// Reads a regular text file of at most `cap` bytes (a manifest).
fn read_small(path: &Path, cap: u64) -> Result<String> {
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
fn sync_dir(dir: &Path) -> Result<()> {
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
const CHECKSUM_LINE: &str = "\n  \"checksum\": \"crc32:";

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
fn verify_manifest(path: &Path, text: &str) -> Result<()> {
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

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

fn st_dtype(d: DType) -> Result<Dtype> {
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

/// A checkpoint's rank files, verified against the manifest's sizes and CRCs, with each file's
/// header read once: where each buffer's piece sits in the file and in the whole buffer.
/// Values are read from the files on demand (positioned reads, never a mapping of the whole
/// file), so a reader holds only the headers and what it is asked for.
struct Files {
    files: Vec<(PathBuf, fs::File)>,
    /// Per file: buffer name -> its piece.
    pieces: Vec<HashMap<String, Piece>>,
}

/// One rank's piece of a buffer: `bytes` of the file hold elements `[offset, offset + n)`.
struct Piece {
    offset: usize,
    dtype: Dtype,
    bytes: std::ops::Range<usize>,
}

impl Piece {
    fn elem_bytes(&self) -> usize {
        elem_bytes(self.dtype)
    }

    fn len(&self) -> usize {
        self.bytes.len() / self.elem_bytes()
    }
}

/// Bytes per element of the dtypes a checkpoint stores (f32, bf16, f16).
fn elem_bytes(dtype: Dtype) -> usize {
    if dtype == Dtype::F32 { 4 } else { 2 }
}

impl Files {
    fn open(dir: &Path, m: &Manifest) -> Result<Self> {
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
    fn index(path: &Path, mut file: &fs::File, len: u64) -> Result<HashMap<String, Piece>> {
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
    fn assemble(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.range(name, 0..len, len)
    }

    /// Elements `want` of the `len`-element buffer `name`, as f32, read from the pieces of
    /// every file that hold part of it.
    fn range(&self, name: &str, want: std::ops::Range<usize>, len: usize) -> Result<Vec<f32>> {
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

/// One parameter of a checkpoint: where it is in its unit's flat buffer.
struct Entry {
    path: String,
    shape: Vec<usize>,
    buffer: String,
    at: usize,
    buffer_len: usize,
}

/// Every parameter of a checkpoint, one at a time, with no ranks: trainable ones from the f32
/// master, frozen ones as stored (the run's compute dtype, returned as f32, exactly). Opening
/// verifies every file's size and CRC-32 and reads only the headers; [`read`](Self::read)
/// then reads one tensor's bytes, so `kiln export` holds one tensor at a time, never the
/// whole model.
pub struct CheckpointReader {
    manifest: Manifest,
    files: Files,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl CheckpointReader {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let manifest = read_manifest(dir)?;
        let files = Files::open(dir, &manifest)?;
        let mut entries = Vec::new();
        for (u, unit) in manifest.units.iter().enumerate() {
            for (kind, params) in [("master", &unit.trainable), ("frozen", &unit.frozen)] {
                let buffer_len = params_numel(params).ok_or_else(|| {
                    err(
                        &dir.join(MANIFEST),
                        format!("unit {u}: the {kind} parameter shapes overflow"),
                    )
                })?;
                let mut at = 0;
                for (path, shape) in params {
                    entries.push(Entry {
                        path: path.clone(),
                        shape: shape.clone(),
                        buffer: format!("u{u}.{kind}"),
                        at,
                        buffer_len,
                    });
                    at += shape.iter().product::<usize>();
                }
            }
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        Ok(Self {
            manifest,
            files,
            entries,
            index,
        })
    }

    /// The checkpoint's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every parameter's path and shape, in checkpoint order (unit by unit, trainable first).
    pub fn params(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries.iter().map(|e| (e.path.as_str(), &e.shape[..]))
    }

    /// Whether the checkpoint holds parameter `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.index.contains_key(path)
    }

    /// The values of parameter `path`, f32, in its shape.
    pub fn read(&self, path: &str) -> Result<TensorData> {
        let e = self
            .index
            .get(path)
            .map(|&i| &self.entries[i])
            .ok_or_else(|| ZeroError::Model(format!("the checkpoint has no parameter `{path}`")))?;
        let n: usize = e.shape.iter().product();
        let values = self.files.range(&e.buffer, e.at..e.at + n, e.buffer_len)?;
        Ok(TensorData::new(values, e.shape.clone()))
    }
}

fn unit_manifest(entries: &kiln_precision::FlatLayout) -> Vec<(String, Vec<usize>)> {
    entries
        .entries()
        .iter()
        .map(|e| (e.path.clone(), e.shape.clone()))
        .collect()
}

/// Every parameter of a checkpoint, whole, by path (all of them at once: see
/// [`CheckpointReader`] to read one at a time): trainable ones from the f32 master, frozen
/// ones as stored (the run's compute dtype, returned as f32, exactly). No ranks needed.
pub fn read_full_checkpoint(
    dir: impl AsRef<Path>,
) -> Result<(Manifest, Vec<(String, TensorData)>)> {
    let reader = CheckpointReader::open(dir)?;
    let params = reader
        .params()
        .map(|(path, _)| Ok((path.to_string(), reader.read(path)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((reader.manifest, params))
}

/// Elements of all `params` (`None` on overflow).
fn params_numel(params: &[(String, Vec<usize>)]) -> Option<usize> {
    params.iter().try_fold(0usize, |total, (_, shape)| {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        total.checked_add(n)
    })
}

impl<U: Units> Engine<U> {
    /// Where this rank's master weights or AdamW moments are NaN or infinite: `(unit, buffer,
    /// parameter path, value)` of the first such element, `None` when all are finite. A
    /// diverged update (a learning rate of 1e300) shows here before it can be checkpointed.
    pub fn first_non_finite(&self) -> Option<(usize, &'static str, String, f32)> {
        for (u, s) in self.state.iter().enumerate() {
            let opt = s.master.optimizer_state();
            for (kind, values) in [
                ("master weights", s.master.params()),
                ("exp_avg", &opt.exp_avg[..]),
                ("exp_avg_sq", &opt.exp_avg_sq[..]),
            ] {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    let at = s.layout.shard.offset + i;
                    let path = s
                        .layout
                        .flat
                        .entries()
                        .iter()
                        .find(|e| e.offset <= at && at < e.offset + e.numel)
                        .map_or_else(|| "(padding)".to_string(), |e| e.path.clone());
                    return Some((u, kind, path, values[i]));
                }
            }
        }
        None
    }

    /// Errors on every rank when any rank's master weights or optimizer state are not finite,
    /// naming the ranks, the unit and the parameter (a collective).
    pub fn check_finite(&mut self, what: &str) -> Result<()> {
        let local = self.first_non_finite();
        let mine = [i64::from(local.is_some())];
        let flags = self.comm.all_gather(&mine, self.comm.world_size())?;
        let bad: Vec<usize> = (0..flags.len()).filter(|&r| flags[r] != 0).collect();
        if bad.is_empty() {
            return Ok(());
        }
        let detail = match local {
            Some((u, kind, path, v)) => format!(
                "; on this rank ({}) the {kind} of unit {u} hold {v} at `{path}`",
                self.comm.rank()
            ),
            None => String::new(),
        };
        Err(ZeroError::NonFinite(format!(
            "{what}: the parameters are not finite on rank(s) {}{detail} (the training diverged: \
             a learning rate too high for this model, or bad data)",
            kiln_dist::rank_list(&bad)
        )))
    }

    /// The global range of a flat buffer of `numel` elements this rank writes: its shard when
    /// the stage shards that buffer, its `shard_of` slice otherwise.
    fn owned_range(
        &self,
        numel: usize,
        shard: kiln_precision::Shard,
        sharded: bool,
    ) -> (usize, usize) {
        if sharded {
            (
                shard.offset.min(numel),
                (shard.offset + shard.len).min(numel),
            )
        } else {
            let s = shard_of(numel, self.comm.rank(), self.comm.world_size());
            (s.offset, s.offset + s.len)
        }
    }

    /// Writes this rank's file (its pieces of every unit's buffers, with their offsets as
    /// metadata) to `path` atomically, tensor by tensor: the master and AdamW slices go to the
    /// file straight from the engine's buffers and a frozen piece is made one unit at a time,
    /// so saving holds no copy of the rank's state. Returns the file's length and CRC-32.
    fn write_rank_file(&self, path: &Path) -> Result<(i64, i64)> {
        /// Where a piece's values come from.
        enum Source<'a> {
            F32(&'a [f32]),
            Frozen(usize, std::ops::Range<usize>),
        }
        let compute = self.config.policy.compute;
        let mut pieces: Vec<(String, DType, usize, usize, Source)> = Vec::new();
        for u in 0..self.state.len() {
            let s = &self.state[u];
            let numel = s.layout.flat.numel();
            let (lo, hi) = self.owned_range(numel, s.layout.shard, self.plan.shard_optimizer);
            if hi > lo {
                let local = lo - s.layout.shard.offset..hi - s.layout.shard.offset;
                let opt = s.master.optimizer_state();
                for (kind, values) in [
                    ("master", s.master.params()),
                    ("exp_avg", &opt.exp_avg[..]),
                    ("exp_avg_sq", &opt.exp_avg_sq[..]),
                ] {
                    let v = &values[local.clone()];
                    pieces.push((
                        format!("u{u}.{kind}"),
                        DType::F32,
                        v.len(),
                        lo,
                        Source::F32(v),
                    ));
                }
            }
            let numel = s.frozen.flat.numel();
            let (lo, hi) = self.owned_range(numel, s.frozen.shard, self.plan.shard_params);
            if hi > lo {
                let dtype = match &s.frozen_shard {
                    Some(buf) => buf.dtype(),
                    None => compute,
                };
                pieces.push((
                    format!("u{u}.frozen"),
                    dtype,
                    hi - lo,
                    lo,
                    Source::Frozen(u, lo..hi),
                ));
            }
        }
        // The safetensors header: every piece's dtype, shape and byte range, the offsets as
        // metadata, padded with spaces to 8 bytes as the safetensors library writes it.
        let mut header = serde_json::Map::new();
        let meta: serde_json::Map<String, serde_json::Value> = pieces
            .iter()
            .map(|(name, _, _, lo, _)| (name.clone(), lo.to_string().into()))
            .collect();
        header.insert("__metadata__".into(), meta.into());
        let mut at = 0usize;
        for (name, dtype, n, _, _) in &pieces {
            let bytes = n * dtype.size();
            let st = format!("{:?}", st_dtype(*dtype)?);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st, "shape": [n], "data_offsets": [at, at + bytes]}),
            );
            at += bytes;
        }
        let mut header = serde_json::Value::Object(header).to_string().into_bytes();
        header.resize(header.len().next_multiple_of(8), b' ');

        let part = path.with_extension("part");
        let file = fs::File::create(&part).map_err(io(&part))?;
        let mut out = Hashed {
            w: std::io::BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        out.put(&(header.len() as u64).to_le_bytes())
            .map_err(io(&part))?;
        out.put(&header).map_err(io(&part))?;
        let mut staged = Vec::with_capacity(1 << 18);
        for (_, _, _, _, source) in &pieces {
            match source {
                Source::F32(values) => {
                    for chunk in values.chunks(1 << 16) {
                        staged.clear();
                        staged.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                        out.put(&staged).map_err(io(&part))?;
                    }
                }
                Source::Frozen(u, range) => {
                    let s = &self.state[*u];
                    let data = match &s.frozen_shard {
                        Some(buf) => {
                            let off = s.frozen.shard.offset;
                            buf.slice(range.start - off..range.end - off)
                        }
                        None => {
                            let numel = s.frozen.flat.numel();
                            let params = self.units.unit_params(*u)?;
                            let mut buf = crate::shard::ShardBuf::zeros(compute, numel)?;
                            let whole = kiln_precision::Shard {
                                offset: 0,
                                len: numel,
                            };
                            buf.fill(&s.frozen.flat, whole, &params)?;
                            buf.slice(range.clone())
                        }
                    };
                    out.put(data.as_bytes()).map_err(io(&part))?;
                }
            }
        }
        let Hashed { w, crc, len } = out;
        let file = w
            .into_inner()
            .map_err(|e| err(&part, format!("flushing: {}", e.error())))?;
        file.sync_all().map_err(io(&part))?;
        fs::rename(&part, path).map_err(io(path))?;
        Ok((len as i64, i64::from(crc.finalize())))
    }

    /// Saves a checkpoint as `root/name` (a collective: every rank must call it). Each rank
    /// writes its file into `root/name.tmp`; when all have succeeded rank 0 writes the
    /// manifest, renames the folder to `root/name` and points `root/latest` at it. A save that
    /// fails or is interrupted leaves the previous checkpoints and `latest` untouched.
    pub fn save_checkpoint(
        &mut self,
        root: impl AsRef<Path>,
        name: &str,
        extra: serde_json::Value,
    ) -> Result<PathBuf> {
        let root = root.as_ref();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let tmp = root.join(format!("{name}.tmp"));
        let done = root.join(name);
        // A checkpoint of diverged weights would replace the last good one as `latest`.
        self.check_finite(&format!("refusing to write checkpoint {}", done.display()))?;

        // Rank 0 clears a stale temporary folder of an interrupted save.
        let mut failed = [0i64];
        let mut reason = String::from("rank 0 could not create the folder");
        if rank == 0 {
            let prepared = (|| {
                if root.exists() && !root.is_dir() {
                    return Err(std::io::Error::other(format!(
                        "{} exists and is not a folder",
                        root.display()
                    )));
                }
                if tmp.exists() {
                    fs::remove_dir_all(&tmp)?;
                }
                fs::create_dir_all(&tmp)
            })();
            if let Err(e) = prepared {
                reason = format!("{reason}: {e}");
                failed[0] = 1;
            }
        }
        self.comm.all_reduce(&mut failed, ReduceOp::Max)?;
        if failed[0] != 0 {
            return Err(err(&tmp, reason));
        }

        let file = format!("rank-{rank:05}-of-{world:05}.safetensors");
        let written = self
            .write_rank_file(&tmp.join(&file))
            .map_err(|e| e.to_string());
        let mine = match &written {
            Ok((bytes, crc)) => [0, *bytes, *crc],
            Err(_) => [1, 0, 0],
        };
        let all = self.comm.all_gather(&mine, 3 * world)?;
        let bad: Vec<usize> = (0..world).filter(|r| all[3 * r] != 0).collect();
        if !bad.is_empty() {
            let own = match written {
                Err(e) => format!(" (rank {rank}: {e})"),
                Ok(_) => String::new(),
            };
            return Err(err(
                &tmp,
                format!(
                    "rank(s) {} failed to write their files{own}",
                    kiln_dist::rank_list(&bad)
                ),
            ));
        }

        let mut failed = [0i64];
        if rank == 0 {
            let manifest = Manifest {
                checksum: None,
                format: FORMAT.into(),
                world_size: world,
                stage: self.config.stage,
                compute_dtype: dtype_name(self.config.policy.compute),
                optimizer_step: self
                    .state
                    .first()
                    .map_or(0, |s| s.master.optimizer_state().step),
                scaler: self.scaler.as_ref().map(|s| s.state().clone()),
                units: self
                    .state
                    .iter()
                    .map(|s| UnitManifest {
                        trainable: unit_manifest(&s.layout.flat),
                        frozen: unit_manifest(&s.frozen.flat),
                    })
                    .collect(),
                files: (0..world)
                    .map(|r| FileManifest {
                        rank: r,
                        file: format!("rank-{r:05}-of-{world:05}.safetensors"),
                        bytes: all[3 * r + 1] as u64,
                        crc32: all[3 * r + 2] as u32,
                    })
                    .collect(),
                extra,
            };
            let finish = || -> Result<()> {
                write_atomic(&tmp.join(MANIFEST), &manifest_text(&manifest)?)?;
                sync_dir(&tmp)?;
                if done.exists() {
                    let old = root.join(format!("{name}.old"));
                    if old.exists() {
                        fs::remove_dir_all(&old).map_err(io(&old))?;
                    }
                    fs::rename(&done, &old).map_err(io(&done))?;
                    fs::rename(&tmp, &done).map_err(io(&done))?;
                    fs::remove_dir_all(&old).map_err(io(&old))?;
                } else {
                    fs::rename(&tmp, &done).map_err(io(&done))?;
                }
                sync_dir(root)?;
                write_atomic(&root.join(LATEST), name.as_bytes())?;
                sync_dir(root)?;
                Ok(())
            };
            if let Err(e) = finish() {
                reason = format!("rank 0 could not finish the checkpoint: {e}");
                failed[0] = 1;
            }
        }
        self.comm.all_reduce(&mut failed, ReduceOp::Max)?;
        if failed[0] != 0 {
            if rank != 0 {
                reason = "rank 0 could not finish the checkpoint".into();
            }
            return Err(err(&done, reason));
        }
        Ok(done)
    }

    /// Loads a checkpoint written by any number of ranks under any stage into this engine
    /// (every rank reads what it needs; no collective). The model's units must have the same
    /// parameters (paths, shapes, trainable or frozen). Returns the caller's `extra` state.
    pub fn load_checkpoint(&mut self, dir: impl AsRef<Path>) -> Result<serde_json::Value> {
        let dir = dir.as_ref();
        let m = read_manifest(dir)?;
        let manifest_path = dir.join(MANIFEST);
        if m.units.len() != self.state.len() {
            return Err(err(
                &manifest_path,
                format!(
                    "{} units, the model has {}",
                    m.units.len(),
                    self.state.len()
                ),
            ));
        }
        for (u, (saved, s)) in m.units.iter().zip(&self.state).enumerate() {
            for (kind, saved, now) in [
                ("trainable", &saved.trainable, unit_manifest(&s.layout.flat)),
                ("frozen", &saved.frozen, unit_manifest(&s.frozen.flat)),
            ] {
                if *saved != now {
                    let missing = saved.iter().find(|p| !now.contains(p));
                    let extra = now.iter().find(|p| !saved.contains(p));
                    let detail = match (missing, extra) {
                        (Some(a), Some(b)) => format!("saved {a:?}, the model has {b:?}"),
                        (Some(a), None) => format!("saved {a:?}, not {kind} in the model"),
                        (None, Some(b)) => format!("the model's {b:?} was not saved as {kind}"),
                        (None, None) => "the order differs".into(),
                    };
                    return Err(err(
                        &manifest_path,
                        format!("unit {u}: {kind} parameters differ: {detail}"),
                    ));
                }
            }
        }
        let files = Files::open(dir, &m)?;
        let compute = self.config.policy.compute;
        for u in 0..self.state.len() {
            let s = &mut self.state[u];
            let numel = s.layout.flat.numel();
            let mut values = Vec::new();
            if numel > 0 {
                let shard = s.layout.shard;
                let cut = |full: &[f32]| -> Vec<f32> {
                    (shard.offset..shard.offset + shard.len)
                        .map(|i| full.get(i).copied().unwrap_or(0.0))
                        .collect()
                };
                let master = files.assemble(&format!("u{u}.master"), numel)?;
                s.master.params_mut().copy_from_slice(&cut(&master));
                s.master.load_optimizer_state(AdamWState {
                    step: m.optimizer_step,
                    exp_avg: cut(&files.assemble(&format!("u{u}.exp_avg"), numel)?),
                    exp_avg_sq: cut(&files.assemble(&format!("u{u}.exp_avg_sq"), numel)?),
                })?;
                if !self.plan.shard_params {
                    values.extend(
                        split(&master, &s.layout.flat)
                            .into_iter()
                            .map(|(p, d)| (p, d.convert_dtype(compute))),
                    );
                }
            }
            let numel = s.frozen.flat.numel();
            if numel > 0 {
                let frozen = files.assemble(&format!("u{u}.frozen"), numel)?;
                let params = split(&frozen, &s.frozen.flat);
                match &mut s.frozen_shard {
                    Some(buf) => buf.fill(&s.frozen.flat, s.frozen.shard, &params)?,
                    None => values.extend(
                        params
                            .into_iter()
                            .map(|(p, d)| (p, d.convert_dtype(compute))),
                    ),
                }
            }
            if self.plan.shard_params {
                // Stage 3 keeps the unit released; the shards are all it needs.
                continue;
            }
            if !values.is_empty() {
                self.units.set_unit_params(u, values)?;
            }
        }
        match (&mut self.scaler, m.scaler) {
            (Some(s), Some(state)) => s.load_state(state)?,
            (Some(_), None) => tracing::warn!(
                "{}: no loss scaler state (saved without f16); starting from the initial scale",
                manifest_path.display()
            ),
            _ => {}
        }
        Ok(m.extra)
    }
}
