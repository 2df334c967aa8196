//! Medians with confidence intervals over the bench's rounds, and paired comparisons.
//!
//! The bench runs the cells it compares in interleaved rounds (A B C, then B C A, ...): each
//! round gives one time per cell, and drift of the machine (other jobs, clocks, heat) hits every
//! cell of a round alike. A cell's time is the median over rounds; a comparison of two cells is
//! the median of the per-round ratios. Both come with the distribution-free confidence interval
//! of a median: the order statistics `x_(k) ≤ median ≤ x_(n+1−k)` with the largest `k` whose
//! coverage `1 − 2·P(Binomial(n, ½) < k)` is still at least 95% (the interval of the sign test).
//! It assumes nothing about the shape of the noise, which on a shared machine is anything but
//! normal. Six rounds are the fewest that reach 95% (the interval is then `[min, max]`); with
//! fewer, the interval is `[min, max]` at its lower confidence, which the tables say.

use serde::Serialize;

/// The confidence the intervals aim for.
pub const CONFIDENCE: f64 = 0.95;

/// Median, confidence interval and range of a set of values (times in ms).
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    /// The confidence interval of the median: `[low, high]` at `confidence`.
    pub low: f64,
    pub high: f64,
    /// The interval's coverage (≥ 0.95 from 6 values; 0 for a single value).
    pub confidence: f64,
    pub min: f64,
    pub max: f64,
    /// The values in order (one per round).
    pub samples: Vec<f64>,
}

/// `P(X ≤ j)` for every `j` in `0..=n`, `X ~ Binomial(n, ½)`, by the recurrence
/// `C(n, j+1) = C(n, j)·(n − j)/(j + 1)`; exact enough in f64 for n ≤ [`MAX_ROUNDS`].
fn binomial_half_cdf(n: usize) -> Vec<f64> {
    let mut pmf = 0.5f64.powi(n as i32);
    let mut cdf = Vec::with_capacity(n + 1);
    let mut acc = 0.0;
    for j in 0..=n {
        acc += pmf;
        cdf.push(acc.min(1.0));
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    cdf
}

/// The most values a median's interval is computed from (`--rounds`' limit): `½ⁿ` stays a
/// normal f64.
pub const MAX_ROUNDS: usize = 1000;

/// `(k, coverage)`: the 1-based rank of the interval's lower end and its coverage, for n values.
fn interval_rank(n: usize) -> (usize, f64) {
    if n == 0 {
        return (0, 0.0);
    }
    let cdf = binomial_half_cdf(n);
    let coverage = |k: usize| 1.0 - 2.0 * cdf[k - 1];
    let mut k = 1;
    while k < n.div_ceil(2) && coverage(k + 1) >= CONFIDENCE {
        k += 1;
    }
    (k, coverage(k).max(0.0))
}

impl Stats {
    /// The statistics of `samples` (kept in their order); NaN everywhere when empty.
    pub fn of(samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Stats {
                median: f64::NAN,
                low: f64::NAN,
                high: f64::NAN,
                confidence: 0.0,
                min: f64::NAN,
                max: f64::NAN,
                samples,
            };
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let (k, confidence) = interval_rank(n);
        Stats {
            median,
            low: sorted[k - 1],
            high: sorted[n - k],
            confidence,
            min: sorted[0],
            max: sorted[n - 1],
            samples,
        }
    }

    /// `12.34 (12.10–12.80)`: the median and its interval.
    pub fn label(&self) -> String {
        format!("{:.2} ({:.2}–{:.2})", self.median, self.low, self.high)
    }
}

/// A relative change between two cells measured in the same rounds, in percent.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Median over rounds of the per-round change, and its interval (see [`Stats`]).
    pub percent: Stats,
    /// The interval includes 0%: no difference can be told from noise.
    pub within_noise: bool,
}

impl Change {
    /// The change of `cand` against `base` from per-round pairs: `cand_i / base_i − 1` for a
    /// cost (time; negative: the candidate is faster), or `base_i / cand_i − 1` for a speed
    /// (`speed`: positive, the candidate is faster). Rounds missing on either side are skipped.
    pub fn paired(base: &[f64], cand: &[f64], speed: bool) -> Self {
        let changes = base
            .iter()
            .zip(cand)
            .filter(|(b, c)| b.is_finite() && c.is_finite() && **b > 0.0 && **c > 0.0)
            .map(|(b, c)| if speed { b / c - 1.0 } else { c / b - 1.0 } * 100.0)
            .collect();
        let percent = Stats::of(changes);
        let within_noise = percent.low <= 0.0 && percent.high >= 0.0;
        Change {
            percent,
            within_noise,
        }
    }

    /// `−28.9% (−30.1% … −27.5%)`, or `≈ (within noise: −1.2% … +2.0%)` when the interval
    /// includes 0%; with fewer than 6 rounds the interval's confidence is named, with one round
    /// there is none.
    pub fn label(&self) -> String {
        let p = &self.percent;
        let rounds = p.samples.len();
        if rounds == 0 {
            return "—".into();
        }
        if rounds == 1 {
            return format!("{:+.1}% (1 round: no interval)", p.median);
        }
        let mut s = if self.within_noise {
            format!("≈ (within noise: {:+.1}% … {:+.1}%)", p.low, p.high)
        } else {
            format!("{:+.1}% ({:+.1}% … {:+.1}%)", p.median, p.low, p.high)
        };
        if p.confidence < CONFIDENCE {
            s.push_str(&format!(
                " [interval at {:.0}%: {rounds} rounds]",
                p.confidence * 100.0
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_interval_and_range_keep_the_order_of_samples() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(s.samples, [3.0, 1.0, 2.0, 10.0]);
        // Four values: [min, max] covers the median with 1 − 2/16 = 87.5%.
        assert_eq!((s.low, s.high), (1.0, 10.0));
        assert!((s.confidence - 0.875).abs() < 1e-12);
        assert_eq!(Stats::of(vec![4.0, 1.0, 9.0]).median, 4.0);
        assert!(Stats::of(Vec::new()).median.is_nan());
        let one = Stats::of(vec![5.0]);
        assert_eq!((one.low, one.high, one.confidence), (5.0, 5.0, 0.0));
    }

    #[test]
    fn interval_ranks_match_the_sign_test_table() {
        // The classic table of the median's distribution-free 95% interval: n → k.
        for (n, k) in [
            (6, 1),
            (8, 1),
            (9, 2),
            (10, 2),
            (11, 2),
            (12, 3),
            (17, 5),
            (20, 6),
            (30, 10),
        ] {
            let (got, coverage) = interval_rank(n);
            assert_eq!(got, k, "n = {n}");
            assert!(coverage >= CONFIDENCE, "n = {n}: {coverage}");
        }
        // n = 10, k = 2: 1 − 2·(1 + 10)/1024.
        assert!((interval_rank(10).1 - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // Five values cannot reach 95%: [min, max] at 1 − 2/32.
        assert_eq!(interval_rank(5), (1, 0.9375));
        let (k, c) = interval_rank(MAX_ROUNDS);
        assert!(k > 400 && k < 500 && c >= CONFIDENCE, "{k} {c}");
    }

    #[test]
    fn a_paired_change_separates_a_shift_from_noise() {
        // The same cell twice: per-round ratios scatter on both sides of 1.
        let base = [10.0, 11.0, 9.5, 10.2, 10.8, 9.9, 10.1, 10.4, 9.7, 10.0];
        let noisy = [10.3, 10.6, 9.9, 10.0, 11.1, 9.6, 10.3, 10.1, 9.9, 9.8];
        let same = Change::paired(&base, &noisy, false);
        assert!(same.within_noise, "{}", same.label());
        assert!(
            same.label().starts_with("≈ (within noise"),
            "{}",
            same.label()
        );
        // 20% slower in every round, on top of the same drift: a measured difference.
        let slow: Vec<f64> = noisy.iter().map(|t| t * 1.2).collect();
        let change = Change::paired(&base, &slow, false);
        assert!(!change.within_noise);
        assert!(
            (change.percent.median - 20.0).abs() < 5.0,
            "{}",
            change.label()
        );
        assert!(change.label().starts_with('+'), "{}", change.label());
        // As a speed, the same shift is a slowdown: base / cand − 1 < 0.
        let speed = Change::paired(&base, &slow, true);
        assert!(speed.percent.high < 0.0, "{}", speed.label());
        // A drift that doubles every time in one round cancels in the pair.
        let drift_b = [10.0, 20.0, 10.0, 20.0, 10.0, 20.0];
        let drift_c = [8.0, 16.0, 8.0, 16.0, 8.0, 16.0];
        let c = Change::paired(&drift_b, &drift_c, false);
        assert!((c.percent.median + 20.0).abs() < 1e-9 && !c.within_noise);
        // Rounds with a missing side are skipped; one round has no interval.
        let one = Change::paired(&[10.0, f64::NAN], &[12.0, 5.0], false);
        assert_eq!(one.label(), "+20.0% (1 round: no interval)");
        let few = Change::paired(&[10.0, 10.0, 10.0], &[12.0, 13.0, 12.5], false);
        assert!(
            few.label().contains("[interval at 75%: 3 rounds]"),
            "{}",
            few.label()
        );
    }
}
