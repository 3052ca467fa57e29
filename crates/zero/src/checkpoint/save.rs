//! Saving: each rank writes its file tensor by tensor, rank 0 the manifest.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use kiln_dist::{ReduceOp, shard_of};

use super::manifest::{
    FORMAT, FileManifest, LATEST, MANIFEST, Manifest, UnitManifest, dtype_name, err, io,
    manifest_text, st_dtype, sync_dir, write_atomic,
};
use super::reader::unit_manifest;
use crate::engine::Engine;
use crate::error::{Result, ZeroError};
use crate::units::Units;

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
