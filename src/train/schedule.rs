//! Learning-rate schedules, step for step as transformers' (`transformers.optimization`):
//! `linear` (`get_linear_schedule_with_warmup`), `cosine` (`get_cosine_schedule_with_warmup`,
//! half a cosine wave), `constant_with_warmup` and `constant` (no warmup at all).
//!
//! transformers' `LambdaLR` evaluates its lambda at the number of scheduler steps taken so far,
//! and a Trainer calls `scheduler.step()` after each `optimizer.step()`: its s-th optimizer step
//! (1-based) uses lambda(s − 1). So the first step of a warmup has learning rate 0 and the last
//! step of the linear decay 1/(total − warmup), not 0. fastpt's step s uses the same value
//! (tests/config_hf.rs checks every step against tests/fixtures/schedules.json, written by
//! tools/make_schedule_goldens.py).

use crate::config::Schedule;

/// The number of half waves of the cosine schedule (transformers' `num_cycles` default 0.5:
/// from the full rate down to 0 once).
pub const COSINE_CYCLES: f64 = 0.5;

/// The multiplier of the base learning rate at optimiser step `step` (1-based) of `total`, with
/// `warmup` warmup steps: transformers' lambda at `step − 1` (see the module docs), computed
/// with the same f64 operations.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    // The scheduler steps taken before this optimizer step.
    let c = step.saturating_sub(1);
    let warming = |c: usize| c as f64 / warmup.max(1) as f64;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::ConstantWithWarmup => {
            if c < warmup {
                warming(c)
            } else {
                1.0
            }
        }
        Schedule::Linear => {
            if c < warmup {
                return warming(c);
            }
            // total − c may be negative past the end (a resumed run that was shortened is
            // refused, but the formula stays transformers': clamped at 0).
            let left = total as f64 - c as f64;
            (left / total.saturating_sub(warmup).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => {
            if c < warmup {
                return warming(c);
            }
            let progress = (c - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
            let wave = 0.5 * (1.0 + (std::f64::consts::PI * COSINE_CYCLES * 2.0 * progress).cos());
            wave.max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed values of the shapes (the goldens from transformers are in
    /// tests/config_hf.rs).
    #[test]
    fn warmup_starts_at_zero_and_the_last_step_keeps_one_decay_step() {
        let f = |s| lr_factor(Schedule::Linear, s, 4, 10);
        assert_eq!([f(1), f(2), f(5)], [0.0, 0.25, 1.0]);
        // after warmup: (10 − (s − 1))/6
        assert_eq!(f(6), 5.0 / 6.0);
        assert_eq!(f(10), 1.0 / 6.0);
        let c = |s| lr_factor(Schedule::ConstantWithWarmup, s, 4, 10);
        assert_eq!([c(1), c(3), c(5), c(10)], [0.0, 0.5, 1.0, 1.0]);
        assert_eq!(lr_factor(Schedule::Constant, 1, 4, 10), 1.0);
        // no warmup: the full rate first
        assert_eq!(lr_factor(Schedule::Linear, 1, 0, 4), 1.0);
        assert_eq!(lr_factor(Schedule::Cosine, 1, 0, 4), 1.0);
        // cosine at half way: 0.5
        assert!((lr_factor(Schedule::Cosine, 3, 0, 4) - 0.5).abs() < 1e-15);
    }
}
