//! Reading a checkpoint without ranks, one tensor at a time ([`CheckpointReader`]).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::TensorData;

use super::files::Files;
use super::manifest::{MANIFEST, Manifest, err, read_manifest};
use crate::error::{Result, ZeroError};

/// One parameter of a checkpoint: where it is in its unit's flat buffer.
pub(super) struct Entry {
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

pub(super) fn unit_manifest(entries: &kiln_precision::FlatLayout) -> Vec<(String, Vec<usize>)> {
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
pub(super) fn params_numel(params: &[(String, Vec<usize>)]) -> Option<usize> {
    params.iter().try_fold(0usize, |total, (_, shape)| {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        total.checked_add(n)
    })
}
