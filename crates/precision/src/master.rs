//! fp32 master weights over a flat buffer keyed by HF path, with the AdamW state on it.
//!
//! The trainable parameters are laid out one after the other in a [`FlatLayout`] (the order in
//! which they were given: module visit order, i.e. field declaration order, so every rank and
//! every run gets the same one). A [`MasterWeights`] owns one contiguous [`Shard`]
//! `[offset, offset + len)` of that flat buffer: the whole of it for a single rank, `1/N` of it
//! under ZeRO. Frozen parameters are simply not in the layout: no master copy, no gradient buffer,
//! no optimizer state.

use std::ops::Range;

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};

use crate::adamw::{AdamW, AdamWConfig, AdamWState, ParamGroup};
use crate::error::{PrecisionError, Result, check_len};
use crate::flat;
use crate::layout::{FlatEntry, FlatLayout, Shard};
use crate::scaler::{DynamicLossScaler, ScaleWarning, ScalerUpdate};
/// What a step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// Some gradient was inf or NaN (after the cross-rank MAX when the caller did one).
    pub found_inf: bool,
    /// The optimizer step ran (`!found_inf`).
    pub stepped: bool,
    /// The scaler's update, when a scaler was used.
    pub scaler: Option<ScalerUpdate>,
    /// The scaler's collapse warning, if it is collapsing.
    pub warning: Option<ScaleWarning>,
}

/// fp32 master weights of the trainable parameters (or of one shard of them) plus their f32
/// gradient buffer and AdamW state.
///
/// A step: put the compute-dtype gradients in with [`set_grad`](Self::set_grad) (by path) or
/// write the f32 gradient shard directly into [`grads_mut`](Self::grads_mut) (ZeRO's
/// reduce-scatter output); then either [`step`](Self::step) (single process), or
/// [`unscale_grads`](Self::unscale_grads) → MAX-reduce the flag over ranks →
/// [`apply`](Self::apply) → `scaler.update(flag)`. Then copy the new values back in the compute
/// dtype: [`write_back`](crate::write_back), [`param_data`](Self::param_data) or
/// [`cast_shard_f16`](Self::cast_shard_f16)/[`cast_shard_bf16`](Self::cast_shard_bf16).
#[derive(Debug, Clone)]
pub struct MasterWeights {
    layout: FlatLayout,
    shard: Shard,
    groups: Vec<ParamGroup>,
    params: Vec<f32>,
    grads: Vec<f32>,
    optimizer: AdamW,
    /// Local ranges of the shard with the group of each (padding excluded).
    segments: Vec<(Range<usize>, usize)>,
}

impl MasterWeights {
    /// Zero master weights for `shard` of `layout`; fill them with [`load_param`](Self::load_param).
    pub fn new(
        layout: FlatLayout,
        shard: Shard,
        groups: Vec<ParamGroup>,
        config: AdamWConfig,
    ) -> Result<Self> {
        for e in layout.entries() {
            if e.group >= groups.len() {
                return Err(PrecisionError::NoSuchGroup {
                    path: e.path.clone(),
                    group: e.group,
                    groups: groups.len(),
                });
            }
        }
        let mut segments: Vec<(Range<usize>, usize)> = Vec::new();
        for e in layout.entries() {
            let Some(local) = intersect(e.range(), shard) else {
                continue;
            };
            match segments.last_mut() {
                Some((r, g)) if *g == e.group && r.end == local.start => r.end = local.end,
                _ => segments.push((local, e.group)),
            }
        }
        Ok(Self {
            optimizer: AdamW::new(config, shard.len)?,
            params: vec![0.0; shard.len],
            grads: vec![0.0; shard.len],
            layout,
            shard,
            groups,
            segments,
        })
    }

    /// Master weights of the whole flat buffer (one rank), from named parameters of any dtype.
    ///
    /// `group_of(path)` gives each parameter's group index into `groups`.
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a TensorData)>,
        group_of: impl Fn(&str) -> usize,
        groups: Vec<ParamGroup>,
        config: AdamWConfig,
    ) -> Result<Self> {
        let params: Vec<_> = params.into_iter().collect();
        let layout = FlatLayout::new(
            params
                .iter()
                .map(|(p, d)| (p.to_string(), d.shape().to_vec(), group_of(p))),
        )?;
        let shard = Shard::full(&layout);
        let mut mw = Self::new(layout, shard, groups, config)?;
        for (path, data) in params {
            mw.load_param_data(path, data)?;
        }
        Ok(mw)
    }

    /// The layout of the whole flat buffer.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The owned shard.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// fp32 master values of the shard.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Mutable fp32 master values of the shard.
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// f32 gradient buffer of the shard.
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// Mutable f32 gradient buffer of the shard (write reduce-scattered gradients here).
    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Sets a group's learning rate (schedules).
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let n = self.groups.len();
        let g = self.groups.get_mut(group).ok_or(PrecisionError::Config {
            field: "group",
            msg: format!("group {group} does not exist ({n} groups)"),
        })?;
        g.lr = lr;
        Ok(())
    }

    /// The optimizer state of the shard.
    pub fn optimizer_state(&self) -> &AdamWState {
        self.optimizer.state()
    }

    /// Restores the optimizer state of the shard.
    pub fn load_optimizer_state(&mut self, state: AdamWState) -> Result<()> {
        self.optimizer.load_state(state)
    }

    fn entry(&self, path: &str) -> Result<&FlatEntry> {
        self.layout
            .get(path)
            .ok_or_else(|| PrecisionError::UnknownParam(path.to_string()))
    }

    /// Loads a parameter's full f32 values; only the part inside the shard is kept.
    pub fn load_param(&mut self, path: &str, values: &[f32]) -> Result<()> {
        let e = self.entry(path)?;
        check_numel(e, values.len())?;
        if let Some(local) = intersect(e.range(), self.shard) {
            let src = local.start + self.shard.offset - e.offset;
            self.params[local.clone()].copy_from_slice(&values[src..src + local.len()]);
        }
        Ok(())
    }

    /// Loads a parameter's full values from burn data of any float dtype.
    pub fn load_param_data(&mut self, path: &str, data: &TensorData) -> Result<()> {
        self.put(path, data, Buffer::Params, false)
    }

    /// Sets a parameter's gradient from burn data in the compute dtype (f16, bf16 or f32),
    /// converted to f32; only the part inside the shard is kept.
    pub fn set_grad(&mut self, path: &str, grad: &TensorData) -> Result<()> {
        self.put(path, grad, Buffer::Grads, false)
    }

    /// Adds to a parameter's gradient (gradient accumulation over micro-batches).
    pub fn add_grad(&mut self, path: &str, grad: &TensorData) -> Result<()> {
        self.put(path, grad, Buffer::Grads, true)
    }

    /// Sets the gradients of many parameters; every path must be in the layout.
    pub fn set_grads<'a>(
        &mut self,
        grads: impl IntoIterator<Item = (&'a str, &'a TensorData)>,
    ) -> Result<()> {
        for (path, g) in grads {
            self.set_grad(path, g)?;
        }
        Ok(())
    }

    /// Converts `data` (a whole parameter, any float dtype) to f32 and writes or adds the part
    /// inside this shard into the parameter or gradient buffer.
    fn put(&mut self, path: &str, data: &TensorData, buffer: Buffer, add: bool) -> Result<()> {
        let e = self.entry(path)?.clone();
        check_numel(&e, data.num_elements())?;
        if let Some(local) = intersect(e.range(), self.shard) {
            let src = local.start + self.shard.offset - e.offset;
            let target = match buffer {
                Buffer::Params => &mut self.params,
                Buffer::Grads => &mut self.grads,
            };
            convert_into(path, data, src..src + local.len(), &mut target[local], add)?;
        }
        Ok(())
    }

    /// Zeroes the gradient buffer.
    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    /// Unscales the gradients in place (`grad *= inv_scale`) and returns whether any was inf/NaN
    /// on this rank. MAX-reduce the result over ranks before [`apply`](Self::apply).
    pub fn unscale_grads(&mut self, inv_scale: f32) -> bool {
        if inv_scale == 1.0 {
            flat::has_non_finite(&self.grads)
        } else {
            flat::unscale_and_check(&mut self.grads, inv_scale)
        }
    }

    /// Runs the AdamW step in f32 unless `found_inf` (the flag agreed by all ranks), then zeroes
    /// the gradients either way. Returns whether the step ran.
    pub fn apply(&mut self, found_inf: bool) -> Result<bool> {
        self.apply_scaled(found_inf, 1.0)
    }

    /// [`apply`](Self::apply) with the gradients multiplied by `grad_scale` (gradient clipping's
    /// coefficient) inside the step's one pass, which also clears them.
    pub fn apply_scaled(&mut self, found_inf: bool, grad_scale: f32) -> Result<bool> {
        let stepped = !found_inf;
        if stepped {
            let groups = &self.groups;
            let segments = self.segments.iter().map(|(r, g)| (r.clone(), groups[*g]));
            self.optimizer.step_and_clear(
                &mut self.params,
                &mut self.grads,
                grad_scale,
                segments,
            )?;
            // Elements outside every segment (shard padding) were not read: clear them too.
            let mut at = 0;
            for (r, _) in &self.segments {
                self.grads[at..r.start.max(at)].fill(0.0);
                at = at.max(r.end);
            }
            self.grads[at..].fill(0.0);
        } else {
            self.zero_grads();
        }
        Ok(stepped)
    }

    /// Single-process step: unscale with `scaler` (if any) and check for inf/NaN, step unless
    /// found, update the scaler.
    ///
    /// Without a scaler (f32 / bf16 compute) the gradients are still checked, and a step with
    /// inf/NaN gradients is skipped rather than written into the weights.
    pub fn step(&mut self, scaler: Option<&mut DynamicLossScaler>) -> Result<StepOutcome> {
        let inv = scaler.as_ref().map_or(1.0, |s| s.inv_scale());
        let found_inf = self.unscale_grads(inv);
        let stepped = self.apply(found_inf)?;
        let (update, warning) = match scaler {
            Some(s) => {
                let u = s.update(found_inf);
                (Some(u), s.warning().cloned())
            }
            None => (None, None),
        };
        Ok(StepOutcome {
            found_inf,
            stepped,
            scaler: update,
            warning,
        })
    }

    /// The f32 master values of a whole parameter (it must lie inside the shard).
    pub fn param_values(&self, path: &str) -> Result<&[f32]> {
        let e = self.entry(path)?;
        let r = e.range();
        let s = self.shard.range();
        if r.start < s.start || r.end > s.end {
            return Err(PrecisionError::NotInShard {
                path: path.to_string(),
                start: r.start,
                end: r.end,
                shard_start: s.start,
                shard_end: s.end,
            });
        }
        Ok(&self.params[r.start - s.start..r.end - s.start])
    }

    /// A whole parameter as burn data in `dtype` (the compute copy), shaped as in the layout.
    pub fn param_data(&self, path: &str, dtype: DType) -> Result<TensorData> {
        let values = self.param_values(path)?;
        let shape = self.entry(path)?.shape.clone();
        cast_to_data(path, values, shape, dtype)
    }

    /// Writes the shard's master values as f16 into `dst` (length `shard.len`).
    pub fn cast_shard_f16(&self, dst: &mut [f16]) -> Result<()> {
        flat::f32_to_f16(&self.params, dst)
    }

    /// Writes the shard's master values as bf16 into `dst` (length `shard.len`).
    pub fn cast_shard_bf16(&self, dst: &mut [bf16]) -> Result<()> {
        flat::f32_to_bf16(&self.params, dst)
    }
}

fn check_numel(e: &FlatEntry, got: usize) -> Result<()> {
    if e.numel == got {
        Ok(())
    } else {
        Err(PrecisionError::NumelMismatch {
            path: e.path.clone(),
            expected: e.numel,
            got,
        })
    }
}

/// Local range (inside the shard) of a global range, if they overlap.
fn intersect(global: Range<usize>, shard: Shard) -> Option<Range<usize>> {
    let lo = global.start.max(shard.offset);
    let hi = global.end.min(shard.offset + shard.len);
    (lo < hi).then(|| lo - shard.offset..hi - shard.offset)
}

/// f32 values as burn data of `dtype`.
pub(crate) fn cast_to_data(
    path: &str,
    values: &[f32],
    shape: Vec<usize>,
    dtype: DType,
) -> Result<TensorData> {
    Ok(match dtype {
        DType::F32 => TensorData::new(
            flat::par_new(values, |s, d: &mut [f32]| {
                d.copy_from_slice(s);
                Ok(())
            })?,
            shape,
        ),
        DType::F16 => TensorData::new(flat::par_new(values, flat::f32_to_f16)?, shape),
        DType::BF16 => TensorData::new(flat::par_new(values, flat::f32_to_bf16)?, shape),
        other => {
            return Err(PrecisionError::UnsupportedDType {
                what: format!("compute copy of `{path}`"),
                dtype: other,
            });
        }
    })
}

const STAGE: usize = 1024;

/// Converts `data[src]` (f32, f16 or bf16) into `dst`, overwriting or adding (chunks of a
/// large parameter on the rank's threads).
fn convert_into(
    path: &str,
    data: &TensorData,
    src: Range<usize>,
    dst: &mut [f32],
    add: bool,
) -> Result<()> {
    let err = |e: burn::tensor::DataError| PrecisionError::Data {
        path: path.to_string(),
        msg: format!("{e:?}"),
    };
    check_len("gradient slice", src.len(), dst.len())?;
    match data.dtype() {
        DType::F32 => {
            let s = &data.as_slice::<f32>().map_err(err)?[src];
            flat::par_zip(dst, s, |d, s| {
                if add {
                    d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                } else {
                    d.copy_from_slice(s);
                }
                Ok(())
            })?;
        }
        DType::F16 => {
            let s = &data.as_slice::<f16>().map_err(err)?[src];
            flat::par_zip(dst, s, |d, s| widen_into(d, s, add, flat::f16_to_f32))?;
        }
        DType::BF16 => {
            let s = &data.as_slice::<bf16>().map_err(err)?[src];
            flat::par_zip(dst, s, |d, s| widen_into(d, s, add, flat::bf16_to_f32))?;
        }
        other => {
            return Err(PrecisionError::UnsupportedDType {
                what: format!("values of `{path}`"),
                dtype: other,
            });
        }
    }
    Ok(())
}

/// `dst (+)= widen(src)` through a small f32 stage when adding.
fn widen_into<S>(
    dst: &mut [f32],
    src: &[S],
    add: bool,
    widen: fn(&[S], &mut [f32]) -> Result<()>,
) -> Result<()> {
    if !add {
        return widen(src, dst);
    }
    let mut stage = [0f32; STAGE];
    for (d, s) in dst.chunks_mut(STAGE).zip(src.chunks(STAGE)) {
        let st = &mut stage[..s.len()];
        widen(s, st)?;
        d.iter_mut().zip(st.iter()).for_each(|(d, s)| *d += s);
    }
    Ok(())
}

/// Which of a shard's f32 buffers a write goes to.
#[derive(Clone, Copy)]
enum Buffer {
    Params,
    Grads,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> FlatLayout {
        FlatLayout::new([
            ("a.weight".to_string(), vec![2, 3], 0),
            ("a.bias".to_string(), vec![3], 1),
            ("b.weight".to_string(), vec![4], 0),
        ])
        .unwrap()
    }

    #[test]
    fn shards_tile_the_padded_buffer_and_step_like_the_whole() {
        let l = layout();
        assert_eq!(l.numel(), 13);
        assert_eq!(l.padded_numel(4), 16);
        let groups = vec![
            ParamGroup {
                lr: 0.1,
                weight_decay: 0.1,
            },
            ParamGroup {
                lr: 0.05,
                weight_decay: 0.0,
            },
        ];
        let init: Vec<f32> = (0..13).map(|i| i as f32 * 0.1 - 0.5).collect();
        let grad: Vec<f32> = (0..13).map(|i| (i as f32 * 0.37).sin()).collect();
        let load = |mw: &mut MasterWeights| {
            for e in l.entries() {
                mw.load_param(&e.path, &init[e.range()]).unwrap();
                let g = TensorData::new(grad[e.range()].to_vec(), e.shape.clone());
                mw.set_grad(&e.path, &g).unwrap();
            }
        };
        let mut whole = MasterWeights::new(
            l.clone(),
            Shard::full(&l),
            groups.clone(),
            Default::default(),
        )
        .unwrap();
        load(&mut whole);
        assert!(whole.step(None).unwrap().stepped);
        let mut gathered = Vec::new();
        for r in 0..4 {
            let shard = l.shard(r, 4).unwrap();
            let mut mw =
                MasterWeights::new(l.clone(), shard, groups.clone(), Default::default()).unwrap();
            load(&mut mw);
            assert!(mw.step(None).unwrap().stepped);
            gathered.extend_from_slice(mw.params());
        }
        assert_eq!(&gathered[..13], whole.params());
        assert!(gathered[13..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn errors_name_the_path() {
        let l = layout();
        let mut mw = MasterWeights::new(
            l.clone(),
            Shard::full(&l),
            vec![ParamGroup::default(); 2],
            Default::default(),
        )
        .unwrap();
        let e = mw.load_param("a.bias", &[1.0]).unwrap_err();
        assert!(e.to_string().contains("a.bias"), "{e}");
        let e = mw
            .set_grad("frozen.weight", &TensorData::new(vec![1.0f32], [1]))
            .unwrap_err();
        assert!(e.to_string().contains("frozen.weight"), "{e}");
        let shard = l.shard(1, 4).unwrap();
        let mw = MasterWeights::new(l, shard, vec![ParamGroup::default(); 2], Default::default())
            .unwrap();
        assert!(mw.param_data("a.weight", DType::F16).is_err());
    }

    #[test]
    fn nan_gradient_skips_the_step() {
        let l = layout();
        let mut mw = MasterWeights::new(
            l.clone(),
            Shard::full(&l),
            vec![ParamGroup::default(); 2],
            Default::default(),
        )
        .unwrap();
        mw.load_param("b.weight", &[1.0; 4]).unwrap();
        mw.grads_mut()[0] = f32::NAN;
        let out = mw.step(None).unwrap();
        assert!(out.found_inf && !out.stepped);
        assert_eq!(mw.param_values("b.weight").unwrap(), &[1.0; 4]);
        assert_eq!(mw.optimizer_state().step, 0);
    }
}
