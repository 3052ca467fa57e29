//! Dynamic loss scaling with the semantics and defaults of `torch.amp.GradScaler`.
//!
//! Per step: multiply the loss by [`DynamicLossScaler::scale`] before backward, unscale the
//! gradients with [`DynamicLossScaler::inv_scale`] while checking for inf/NaN
//! ([`crate::unscale_and_check`]), MAX-reduce the `found_inf` flag over all ranks (the caller's
//! job: this crate knows nothing of communication), skip the optimizer step when it is set, and
//! call [`DynamicLossScaler::update`] with that same flag on every rank, so that the scales never
//! diverge.

use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{PrecisionError, Result};

/// Configuration of the dynamic loss scaler; the defaults are torch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScalerConfig {
    /// Initial scale (torch: 2^16).
    pub init_scale: f32,
    /// Factor applied after `growth_interval` clean steps in a row (torch: 2.0).
    pub growth_factor: f32,
    /// Factor applied on a step with inf/NaN gradients (torch: 0.5).
    pub backoff_factor: f32,
    /// Clean steps in a row before the scale grows (torch: 2000).
    pub growth_interval: u32,
    /// Skipped steps in a row after which the scale is reported as collapsing.
    pub collapse_skip_streak: u32,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            collapse_skip_streak: 10,
        }
    }
}

impl ScalerConfig {
    /// Checks the ranges torch asserts, plus a finite initial scale.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, msg: &str| {
            Err(PrecisionError::Config {
                field,
                msg: msg.to_string(),
            })
        };
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return bad("init_scale", "must be finite and > 0");
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad("growth_factor", "must be finite and > 1");
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor", "must be in (0, 1)");
        }
        if self.growth_interval == 0 {
            return bad("growth_interval", "must be >= 1");
        }
        Ok(())
    }
}

/// The scaler's mutable state: what a checkpoint stores to resume bit-exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// Current loss scale.
    pub scale: f32,
    /// Clean steps in a row since the last growth or backoff (torch's `_growth_tracker`).
    pub growth_tracker: u32,
    /// Skipped steps in a row.
    pub skip_streak: u32,
    /// Skipped steps since the start.
    pub total_skipped: u64,
    /// Steps taken by [`DynamicLossScaler::update`] since the start.
    pub total_steps: u64,
}

/// Why the user should look at the run: the loss scale is collapsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleWarning {
    /// Scale after the update that raised the warning.
    pub scale: f32,
    /// Skipped steps in a row at that point.
    pub skip_streak: u32,
    /// Human-readable message, with the hint.
    pub message: String,
}

/// What one [`DynamicLossScaler::update`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerUpdate {
    /// The optimizer step was skipped (gradients had inf/NaN on some rank).
    pub skipped: bool,
    /// Scale used for this step.
    pub scale_before: f32,
    /// Scale for the next step.
    pub scale_after: f32,
}

/// Dynamic loss scaler (torch `GradScaler` semantics). Only needed for f16 compute.
#[derive(Debug, Clone)]
pub struct DynamicLossScaler {
    config: ScalerConfig,
    state: ScalerState,
    warning: Option<ScaleWarning>,
}

impl Default for DynamicLossScaler {
    fn default() -> Self {
        let config = ScalerConfig::default();
        Self {
            state: ScalerState::initial(&config),
            config,
            warning: None,
        }
    }
}

impl ScalerState {
    fn initial(config: &ScalerConfig) -> Self {
        Self {
            scale: config.init_scale,
            growth_tracker: 0,
            skip_streak: 0,
            total_skipped: 0,
            total_steps: 0,
        }
    }
}

impl DynamicLossScaler {
    /// A scaler with the given configuration, after checking it.
    pub fn new(config: ScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: ScalerState::initial(&config),
            config,
            warning: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ScalerConfig {
        &self.config
    }

    /// Current loss scale.
    pub fn scale(&self) -> f32 {
        self.state.scale
    }

    /// `float32(1 / float64(scale))`, exactly what torch multiplies the gradients by.
    pub fn inv_scale(&self) -> f32 {
        (1.0f64 / f64::from(self.state.scale)) as f32
    }

    /// Clean steps in a row since the last growth or backoff.
    pub fn growth_tracker(&self) -> u32 {
        self.state.growth_tracker
    }

    /// Multiplies the loss by the scale, in f32.
    ///
    /// The loss is cast to f32 first: a scaled f16 loss overflows for any loss above 1 at the
    /// default scale of 2^16. The backward pass then carries the scaled gradient through the cast
    /// back into the compute dtype, which is where the scaling is needed.
    pub fn scale_loss<const D: usize>(&self, loss: Tensor<D>) -> Tensor<D> {
        loss.cast(DType::F32).mul_scalar(self.state.scale)
    }

    /// Unscales a flat f32 gradient buffer in place and returns the local `found_inf`.
    pub fn unscale(&self, grads: &mut [f32]) -> bool {
        crate::flat::unscale_and_check(grads, self.inv_scale())
    }

    /// Updates the scale after a step, given `found_inf` already MAX-reduced over all ranks.
    ///
    /// On inf/NaN: `scale *= backoff_factor`, tracker reset, the step is to be skipped. Otherwise
    /// the tracker counts up; at `growth_interval` the scale grows by `growth_factor` unless that
    /// would make it infinite, and the tracker resets either way (torch's `_amp_update_scale_`).
    pub fn update(&mut self, found_inf: bool) -> ScalerUpdate {
        let scale_before = self.state.scale;
        self.state.total_steps += 1;
        if found_inf {
            self.state.scale = scale_before * self.config.backoff_factor;
            self.state.growth_tracker = 0;
            self.state.skip_streak += 1;
            self.state.total_skipped += 1;
        } else {
            let successful = self.state.growth_tracker + 1;
            if successful == self.config.growth_interval {
                let grown = scale_before * self.config.growth_factor;
                if grown.is_finite() {
                    self.state.scale = grown;
                }
                self.state.growth_tracker = 0;
            } else {
                self.state.growth_tracker = successful;
            }
            self.state.skip_streak = 0;
        }
        self.check_collapse();
        ScalerUpdate {
            skipped: found_inf,
            scale_before,
            scale_after: self.state.scale,
        }
    }

    /// The collapse warning, while the condition holds (cleared by a clean step that brings the
    /// scale back to at least 1).
    pub fn warning(&self) -> Option<&ScaleWarning> {
        self.warning.as_ref()
    }

    fn check_collapse(&mut self) {
        let s = &self.state;
        let collapsing = s.scale < 1.0 || s.skip_streak >= self.config.collapse_skip_streak;
        if !collapsing {
            self.warning = None;
            return;
        }
        let first = self.warning.is_none();
        let message = format!(
            "fp16 loss scale is collapsing: scale {:e} after {} skipped steps in a row \
             ({} skipped of {}); the gradients overflow f16 even unscaled. \
             Use bf16 compute (Policy::bf16()), which has f32's range and needs no loss scaling, \
             or lower the learning rate",
            s.scale, s.skip_streak, s.total_skipped, s.total_steps
        );
        if first {
            tracing::warn!(scale = s.scale, skip_streak = s.skip_streak, "{message}");
        }
        self.warning = Some(ScaleWarning {
            scale: s.scale,
            skip_streak: s.skip_streak,
            message,
        });
    }

    /// The state to put in a checkpoint.
    pub fn state(&self) -> &ScalerState {
        &self.state
    }

    /// Restores a checkpointed state.
    pub fn load_state(&mut self, state: ScalerState) -> Result<()> {
        if !(state.scale.is_finite() && state.scale > 0.0) {
            return Err(PrecisionError::Config {
                field: "scaler.scale",
                msg: format!("checkpointed scale {} must be finite and > 0", state.scale),
            });
        }
        self.state = state;
        self.warning = None;
        self.check_collapse();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_torch() {
        let s = DynamicLossScaler::default();
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.config().growth_interval, 2000);
        assert_eq!(s.config().growth_factor, 2.0);
        assert_eq!(s.config().backoff_factor, 0.5);
    }

    #[test]
    fn collapse_is_reported_with_a_bf16_hint() {
        let mut s = DynamicLossScaler::default();
        for _ in 0..9 {
            s.update(true);
        }
        assert!(s.warning().is_none());
        s.update(true);
        let w = s.warning().expect("ten skips in a row must warn");
        assert!(w.message.contains("bf16"));
        s.update(false);
        assert!(s.warning().is_none());
        for _ in 0..17 {
            s.update(true);
        }
        assert!(s.scale() < 1.0);
        assert!(s.warning().is_some());
    }

    #[test]
    fn state_round_trips() {
        let mut s = DynamicLossScaler::default();
        s.update(true);
        s.update(false);
        let saved = s.state().clone();
        let mut t = DynamicLossScaler::default();
        t.load_state(saved.clone()).unwrap();
        assert_eq!(t.state(), &saved);
    }

    #[test]
    fn bad_config_names_the_field() {
        let err = DynamicLossScaler::new(ScalerConfig {
            backoff_factor: 1.5,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("backoff_factor"));
    }
}
