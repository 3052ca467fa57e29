//! AdamW over flat f32 buffers, numerically equal to `torch.optim.AdamW` (single-tensor CPU path).
//!
//! Why not burn-optim's `AdamW`: (1) it keys its state by `ParamId`, which is random per process,
//! while ZeRO shards a flat buffer by HF path and must checkpoint/reshard it; (2) it works per
//! tensor, not on an arbitrary contiguous shard that cuts through tensors; (3) its arithmetic is
//! not torch's: it computes `m / (1-β1^t) / (sqrt(v / (1-β2^t)) + eps)` with the bias corrections
//! in f32 and `m = β1·m + (1-β1)·g`, while torch computes them in f64 and does
//! `p -= (lr/(1-β1^t)) · m / (sqrt(v)/sqrt(1-β2^t) + eps)` with `m.lerp_(g, 1-β1)`. Those are equal
//! in exact arithmetic and differ by rounding; we follow torch operation by operation.

use std::ops::Range;

use rayon::prelude::*;

use serde::{Deserialize, Serialize};

use crate::error::{PrecisionError, Result, check_len};

/// Hyperparameters shared by all groups (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// β1 (torch: 0.9).
    pub beta1: f64,
    /// β2 (torch: 0.999).
    pub beta2: f64,
    /// ε, added after the bias correction of `sqrt(v)` (torch: 1e-8).
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch asserts.
    pub fn validate(&self) -> Result<()> {
        for (field, b) in [("adamw.beta1", self.beta1), ("adamw.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(PrecisionError::Config {
                    field,
                    msg: format!("{b} must be in [0, 1)"),
                });
            }
        }
        if self.eps.is_nan() || self.eps < 0.0 {
            return Err(PrecisionError::Config {
                field: "adamw.eps",
                msg: format!("{} must be >= 0", self.eps),
            });
        }
        Ok(())
    }
}

/// A parameter group: its own learning rate and weight decay (torch `param_groups`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for ParamGroup {
    /// torch's defaults: lr 1e-3, weight decay 1e-2.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 1e-2,
        }
    }
}

/// AdamW state over a flat buffer (or a shard of one): step count and both moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Steps taken (torch's `state["step"]`); the next step uses `t = step + 1`.
    pub step: u64,
    /// First moment, one per element.
    pub exp_avg: Vec<f32>,
    /// Second moment, one per element.
    pub exp_avg_sq: Vec<f32>,
}

impl AdamWState {
    /// Zero state for `len` elements.
    pub fn zeros(len: usize) -> Self {
        Self {
            step: 0,
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
        }
    }
}

/// Flat-buffer AdamW.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    state: AdamWState,
}

impl AdamW {
    /// AdamW over `len` elements with zero moments.
    pub fn new(config: AdamWConfig, len: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: AdamWState::zeros(len),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The state (for checkpoints).
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Replaces the state, checking its length.
    pub fn load_state(&mut self, state: AdamWState) -> Result<()> {
        let len = self.state.exp_avg.len();
        check_len("adamw.exp_avg", len, state.exp_avg.len())?;
        check_len("adamw.exp_avg_sq", len, state.exp_avg_sq.len())?;
        self.state = state;
        Ok(())
    }

    /// One step: `params` and `grads` cover the same elements as the state; `segments` give each
    /// contiguous range its group's lr and weight decay (ranges not listed are not touched).
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        segments: impl IntoIterator<Item = (Range<usize>, ParamGroup)>,
    ) -> Result<()> {
        self.run(params, Grads::Read(grads), segments)
    }

    /// [`AdamW::step`] with the gradients multiplied by `grad_scale` as they are read (a
    /// clipping coefficient: the same value as scaling them first) and cleared behind the read
    /// for the next accumulation, all in the one pass over the state.
    pub fn step_and_clear(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        grad_scale: f32,
        segments: impl IntoIterator<Item = (Range<usize>, ParamGroup)>,
    ) -> Result<()> {
        self.run(params, Grads::Take(grads, grad_scale), segments)
    }

    fn run(
        &mut self,
        params: &mut [f32],
        mut grads: Grads<'_>,
        segments: impl IntoIterator<Item = (Range<usize>, ParamGroup)>,
    ) -> Result<()> {
        let len = self.state.exp_avg.len();
        check_len("adamw params", len, params.len())?;
        check_len("adamw grads", len, grads.len())?;
        self.state.step += 1;
        let t = self.state.step;
        let c = &self.config;
        for (range, group) in segments {
            if range.end > len || range.start > range.end {
                return Err(PrecisionError::LenMismatch {
                    what: "adamw segment end",
                    expected: len,
                    got: range.end,
                });
            }
            let coeffs = Coeffs::new(c, group, t);
            let r = range.clone();
            // Elementwise, so splitting over the rank's compute threads changes nothing in the
            // result.
            const CHUNK: usize = 1 << 15;
            let p = params[r.clone()].par_chunks_mut(CHUNK);
            let m = self.state.exp_avg[r.clone()].par_chunks_mut(CHUNK);
            let v = self.state.exp_avg_sq[r.clone()].par_chunks_mut(CHUNK);
            match &mut grads {
                Grads::Read(g) => p
                    .zip(g[r].par_chunks(CHUNK))
                    .zip(m)
                    .zip(v)
                    .for_each(|(((p, g), m), v)| adamw_kernel(p, g, m, v, &coeffs)),
                Grads::Take(g, scale) => {
                    let scale = *scale;
                    p.zip(g[r].par_chunks_mut(CHUNK))
                        .zip(m)
                        .zip(v)
                        .for_each(|(((p, g), m), v)| adamw_take_kernel(p, g, scale, m, v, &coeffs))
                }
            }
        }
        Ok(())
    }
}

/// The gradients a step reads: as they are, or scaled and cleared behind the read.
enum Grads<'a> {
    Read(&'a [f32]),
    Take(&'a mut [f32], f32),
}

impl Grads<'_> {
    fn len(&self) -> usize {
        match self {
            Grads::Read(g) => g.len(),
            Grads::Take(g, _) => g.len(),
        }
    }
}

/// Per-step scalars, computed in f64 like torch's Python floats and rounded once to f32, which is
/// what torch's CPU kernels do with a Python scalar operand of a float32 tensor.
struct Coeffs {
    decay: f32,
    one_minus_beta1: f32,
    /// torch's lerp switches formula at weight 0.5.
    lerp_small_weight: bool,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Coeffs {
    fn new(c: &AdamWConfig, g: ParamGroup, t: u64) -> Self {
        // torch evaluates `beta ** step` on Python floats.
        let t = t as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        Self {
            decay: (1.0 - g.lr * g.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            lerp_small_weight: (1.0 - c.beta1).abs() < 0.5,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(g.lr / bias_correction1)) as f32,
        }
    }
}

#[inline]
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &Coeffs) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_one(p, g, m, v, k);
    }
}

#[inline]
fn adamw_take_kernel(
    p: &mut [f32],
    g: &mut [f32],
    scale: f32,
    m: &mut [f32],
    v: &mut [f32],
    k: &Coeffs,
) {
    for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // `scale` is 1 (exact) or the clipping coefficient torch multiplies the gradient by.
        let gv = *g * scale;
        *g = 0.0;
        adamw_one(p, gv, m, v, k);
    }
}

/// One element of torch's single-tensor AdamW (`_single_tensor_adamw`, decoupled decay).
#[inline(always)]
fn adamw_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, k: &Coeffs) {
    // param.mul_(1 - lr * weight_decay)
    let mut pv = *p * k.decay;
    // exp_avg.lerp_(grad, w = 1 - beta1), with torch's two formulas
    let mv = if k.lerp_small_weight {
        *m + k.one_minus_beta1 * (g - *m)
    } else {
        g - (g - *m) * (1.0 - k.one_minus_beta1)
    };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let vv = *v * k.beta2 + k.one_minus_beta2 * g * g;
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    let denom = vv.sqrt() / k.bias_correction2_sqrt + k.eps;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    pv += k.neg_step_size * mv / denom;
    *p = pv;
    *m = mv;
    *v = vv;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused pass (scale as read, clear behind) is the plain step on pre-scaled gradients,
    /// bit for bit, over several steps and two groups, and leaves the gradients at zero.
    #[test]
    fn step_and_clear_equals_scaling_first_then_stepping() {
        let n = 70_000; // more than one parallel chunk
        let grads: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let groups = [
            ParamGroup {
                lr: 1e-2,
                weight_decay: 0.1,
            },
            ParamGroup {
                lr: 1e-2,
                weight_decay: 0.0,
            },
        ];
        let segments = || [(0..40_000, groups[0]), (40_000..n, groups[1])];
        let (mut fused, mut plain) = (
            AdamW::new(AdamWConfig::default(), n).unwrap(),
            AdamW::new(AdamWConfig::default(), n).unwrap(),
        );
        let (mut p_fused, mut p_plain) = (vec![0.3f32; n], vec![0.3f32; n]);
        for (step, scale) in [1.0f32, 0.37, 1.0, 0.8].into_iter().enumerate() {
            let mut g = grads
                .iter()
                .map(|x| x * (step + 1) as f32)
                .collect::<Vec<_>>();
            let scaled: Vec<f32> = g.iter().map(|x| x * scale).collect();
            fused
                .step_and_clear(&mut p_fused, &mut g, scale, segments())
                .unwrap();
            plain.step(&mut p_plain, &scaled, segments()).unwrap();
            assert!(
                g.iter().all(|&x| x == 0.0),
                "step {step}: gradients cleared"
            );
            assert_eq!(p_fused, p_plain, "step {step}: parameters");
            assert_eq!(fused.state().exp_avg_sq, plain.state().exp_avg_sq);
        }
    }
}
