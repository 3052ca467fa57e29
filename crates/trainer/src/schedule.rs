//! The learning-rate schedule: linear warmup, then cosine decay (HF's
//! `get_cosine_schedule_with_warmup` with a floor).

use crate::config::OptimConfig;

/// The learning rate for optimizer step `step` (0-based: the number of steps already taken).
///
/// - `step < warmup_steps`: `lr * step / warmup_steps` (0 at step 0, as HF's scheduler);
/// - then cosine from `lr` down to `lr * min_lr_ratio`, reached at `step == total_steps` and
///   held after it.
///
/// Returns f64 like `kiln_precision::ParamGroup::lr`. Never NaN for valid configs, including
/// `warmup_steps >= total_steps` and `total_steps == 0`.
pub fn lr_at(step: u64, optim: &OptimConfig, total_steps: u64) -> f64 {
    let peak = optim.lr;
    let floor = peak * optim.min_lr_ratio;
    let warmup = optim.warmup_steps;
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    if step >= total_steps {
        return if warmup >= total_steps { peak } else { floor };
    }
    let progress = (step - warmup) as f64 / (total_steps - warmup) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    floor + (peak - floor) * cosine
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optim(lr: f64, warmup: u64, min_ratio: f64) -> OptimConfig {
        OptimConfig {
            lr,
            warmup_steps: warmup,
            min_lr_ratio: min_ratio,
            ..OptimConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let o = optim(1e-3, 10, 0.1);
        assert_eq!(lr_at(0, &o, 100), 0.0);
        assert!(close(lr_at(5, &o, 100), 5e-4));
        assert!(close(lr_at(10, &o, 100), 1e-3));
        for s in 0..10 {
            assert!(lr_at(s, &o, 100) < lr_at(s + 1, &o, 100));
        }
    }

    #[test]
    fn cosine_decays_to_the_floor() {
        let o = optim(1e-3, 10, 0.1);
        // Half-way through the decay: the mean of peak and floor.
        assert!(close(lr_at(55, &o, 100), 0.5 * (1e-3 + 1e-4)));
        assert!(close(lr_at(100, &o, 100), 1e-4));
        assert!(close(lr_at(1000, &o, 100), 1e-4));
        for s in 10..100 {
            assert!(lr_at(s, &o, 100) >= lr_at(s + 1, &o, 100));
        }
    }

    #[test]
    fn degenerate_schedules_are_finite() {
        let o = optim(2e-3, 0, 0.0);
        assert!(close(lr_at(0, &o, 10), 2e-3));
        assert_eq!(lr_at(10, &o, 10), 0.0);
        let o = optim(1e-3, 50, 0.1);
        for s in 0..100 {
            let lr = lr_at(s, &o, 20);
            assert!(lr.is_finite() && (0.0..=1e-3).contains(&lr), "{s}: {lr}");
        }
        assert!(lr_at(0, &optim(1e-3, 0, 0.1), 0).is_finite());
    }
}
