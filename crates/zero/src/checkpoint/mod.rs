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

mod files;
mod load;
mod manifest;
mod reader;
mod save;

pub use manifest::{
    FORMAT, FileManifest, LATEST, MANIFEST, Manifest, UnitManifest, latest_checkpoint,
    manifest_text, read_manifest,
};
pub use reader::{CheckpointReader, read_full_checkpoint};
