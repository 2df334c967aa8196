//! Learning-rate schedules: linear warmup, then linear decay to zero at the last step, or constant.

use crate::config::Schedule;

/// The multiplier of the base learning rate at optimiser step `step` (1-based) of `total`, with
/// `warmup` warmup steps: `step/warmup` during warmup (so the first update already moves the
/// parameters), then `(total − step)/(total − warmup)` for `Linear`, reaching 0 at the last
/// step, or 1 for `Constant`. The shape of transformers' `get_linear_schedule_with_warmup`.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step <= warmup && warmup > 0 {
        return step as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            if total <= warmup {
                return 0.0;
            }
            (total.saturating_sub(step)) as f64 / (total - warmup) as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_linear_decay_to_zero() {
        let f = |s| lr_factor(Schedule::Linear, s, 4, 10);
        assert_eq!([f(1), f(2), f(4)], [0.25, 0.5, 1.0]);
        // after warmup: (10 − s)/6
        assert_eq!(f(5), 5.0 / 6.0);
        assert_eq!(f(7), 0.5);
        assert_eq!(f(10), 0.0);
        let c = |s| lr_factor(Schedule::Constant, s, 4, 10);
        assert_eq!([c(2), c(5), c(10)], [0.5, 1.0, 1.0]);
        // no warmup: decay from the first step
        assert_eq!(lr_factor(Schedule::Linear, 1, 0, 4), 0.75);
    }
}
