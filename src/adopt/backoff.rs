//! The `retry.backoff` closest to a set of legacy retry delays.

use crate::api::{BackoffSpec, Duration, MULTIPLIER_MAX, MULTIPLIER_MIN, RetrySpec};
use crate::plan::tiers::retry_tiers;

/// A backoff chosen for some delays, and whether msgpipe's schedule gives exactly them.
#[derive(Clone, Debug, PartialEq)]
pub struct FittedBackoff {
    pub backoff: BackoffSpec,
    /// The tiers `retry_tiers` makes with this backoff (and the pipeline's maxAttempts) have
    /// exactly the given delays, in order.
    pub exact: bool,
    /// The delays msgpipe's schedule gives, in milliseconds.
    pub fitted: Vec<u64>,
}

/// The backoff whose tiers come closest to `delays` (milliseconds, strictly increasing, at
/// least one) under `max_attempts`: initialDelay is the first delay, maxDelay the last, and
/// the multiplier is the first that reproduces every delay exactly (the ratio of the first
/// two, with the last delay free to be a cap) or else the least-squares fit of the delays'
/// logarithms, kept within msgpipe's 1 to 10.
pub fn fit(delays: &[u64], max_attempts: u32) -> FittedBackoff {
    let first = delays.first().copied().unwrap_or(1).max(1);
    let last = delays.last().copied().unwrap_or(first).max(first);
    let candidates = multiplier_candidates(delays);
    let mut best: Option<(f64, FittedBackoff)> = None;
    for multiplier in candidates {
        let backoff = BackoffSpec {
            initial_delay: Duration::from_millis(first),
            multiplier,
            max_delay: Duration::from_millis(last),
        };
        let fitted: Vec<u64> = retry_tiers(&RetrySpec {
            max_attempts,
            backoff: backoff.clone(),
        })
        .iter()
        .map(|t| t.delay.as_millis())
        .collect();
        let error = distance(&fitted, delays);
        let exact = fitted == delays;
        // An approximation is written with at most two decimals: nobody should have to
        // review a multiplier of 3.1622776601683795.
        if !exact && (multiplier * 100.0).round() / 100.0 != multiplier {
            continue;
        }
        let candidate = FittedBackoff {
            exact,
            backoff,
            fitted,
        };
        if best.as_ref().is_none_or(|(e, b)| {
            (candidate.exact && !b.exact) || (error < *e && b.exact == candidate.exact)
        }) {
            best = Some((error, candidate));
        }
    }
    best.map(|(_, b)| b).unwrap_or_else(|| FittedBackoff {
        backoff: BackoffSpec::default(),
        exact: false,
        fitted: Vec::new(),
    })
}

/// Multipliers worth trying, most natural first (an exact one wins ties by coming first).
fn multiplier_candidates(delays: &[u64]) -> Vec<f64> {
    let clamp = |m: f64| {
        if m.is_finite() {
            m.clamp(MULTIPLIER_MIN, MULTIPLIER_MAX)
        } else {
            MULTIPLIER_MIN
        }
    };
    let [first, ..] = delays else {
        return vec![MULTIPLIER_MIN];
    };
    let first = *first as f64;
    // Least squares of ln(d_k / d_1) = (k-1) ln m, through the first delay.
    let (mut num, mut den) = (0.0, 0.0);
    // The k-th root of each delay's ratio to the first: delays are rounded to whole
    // milliseconds, so a later (larger) delay pins the multiplier down more precisely.
    let mut roots = Vec::new();
    for (k, delay) in delays.iter().enumerate().skip(1) {
        let step = k as f64;
        let ratio = *delay as f64 / first;
        num += step * ratio.ln();
        den += step * step;
        roots.push(ratio.powf(1.0 / step));
    }
    if den == 0.0 {
        return vec![MULTIPLIER_MIN];
    }
    let mut raw = roots;
    raw.push((num / den).exp());
    let mut out = Vec::new();
    for m in raw {
        for m in [m, (m * 100.0).round() / 100.0, (m * 10.0).round() / 10.0] {
            let m = clamp(m);
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    // Most natural first: rounder multipliers win ties (an exact one found later still wins).
    out.sort_by_key(|m| if (m * 10.0).fract() == 0.0 { 0 } else { 1 });
    out
}

/// How far msgpipe's delays are from the legacy ones: the sum of log ratios of the tiers
/// both have, and a large cost for each tier one has and the other not.
fn distance(fitted: &[u64], delays: &[u64]) -> f64 {
    let paired: f64 = fitted
        .iter()
        .zip(delays)
        .map(|(a, b)| (*a.max(&1) as f64 / *b.max(&1) as f64).ln().abs())
        .sum();
    paired + 10.0 * fitted.len().abs_diff(delays.len()) as f64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn secs(list: &[u64]) -> Vec<u64> {
        list.iter().map(|s| s * 1_000).collect()
    }

    #[test]
    fn two_legacy_delays_fit_exactly_with_the_last_as_cap() {
        let fitted = fit(&secs(&[5, 30]), 3);
        assert!(fitted.exact, "{fitted:?}");
        assert_eq!(fitted.backoff.initial_delay, Duration::from_secs(5));
        assert_eq!(fitted.backoff.multiplier, 6.0);
        assert_eq!(fitted.backoff.max_delay, Duration::from_secs(30));
    }

    #[test]
    fn a_capped_geometric_series_is_exact_with_more_attempts_than_tiers() {
        let fitted = fit(&secs(&[1, 2, 4, 5]), 8);
        assert!(fitted.exact, "{fitted:?}");
        assert_eq!(fitted.backoff.multiplier, 2.0);
    }

    #[test]
    fn delays_off_any_series_get_the_closest_one_and_are_not_exact() {
        let legacy = secs(&[1, 3, 10, 30]);
        let fitted = fit(&legacy, 5);
        assert!(!fitted.exact, "{fitted:?}");
        assert_eq!(fitted.fitted.len(), 4);
        // Every fitted delay within 15 % of the legacy one, with a readable multiplier.
        for (a, b) in fitted.fitted.iter().zip(&legacy) {
            assert!((*a as f64 / *b as f64 - 1.0).abs() < 0.15, "{fitted:?}");
        }
        let m = fitted.backoff.multiplier;
        assert_eq!((m * 100.0).round() / 100.0, m, "{fitted:?}");
    }

    #[test]
    fn one_delay_is_a_constant_backoff() {
        let fitted = fit(&[250], 4);
        assert!(fitted.exact);
        assert_eq!(fitted.backoff.multiplier, 1.0);
        assert_eq!(fitted.fitted, [250]);
    }

    #[test]
    fn a_ratio_beyond_msgpipes_multiplier_limit_is_not_exact() {
        let fitted = fit(&secs(&[1, 60]), 3);
        assert_eq!(fitted.backoff.multiplier, 10.0);
        assert!(!fitted.exact);
    }

    proptest! {
        /// Whatever msgpipe itself provisioned imports back to the same tiers.
        #[test]
        fn msgpipes_own_schedules_fit_exactly(
            attempts in 2u32..=12,
            initial in 1u64..=60_000,
            multiplier in prop::sample::select(vec![1.0, 1.5, 2.0, 3.0, 10.0]),
            extra in 0u64..=600_000,
        ) {
            let spec = RetrySpec {
                max_attempts: attempts,
                backoff: BackoffSpec {
                    initial_delay: Duration::from_millis(initial),
                    multiplier,
                    max_delay: Duration::from_millis(initial + extra),
                },
            };
            let delays: Vec<u64> = retry_tiers(&spec).iter().map(|t| t.delay.as_millis()).collect();
            let fitted = fit(&delays, attempts);
            prop_assert!(fitted.exact, "{:?} -> {:?}", delays, fitted);
        }
    }
}
