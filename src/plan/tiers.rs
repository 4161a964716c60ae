//! Retry tiers: which delay each failed attempt waits, and which queue holds it.

use serde::Serialize;

use crate::api::{BackoffSpec, Duration, RetrySpec};

/// One retry queue: every attempt in `first_attempt..=last_attempt` waits `delay` in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryTier {
    /// 1-based index; the queue is `<queue>.retry.<index>.<delay>`, bound with routing key
    /// `<index>`.
    pub index: u32,
    pub delay: Duration,
    pub first_attempt: u32,
    pub last_attempt: u32,
}

impl RetryTier {
    /// Routing key on the retry exchange that reaches this tier.
    pub fn routing_key(&self) -> String {
        self.index.to_string()
    }
}

/// Delay after failed attempt `attempt` (1-based): `min(initial * multiplier^(attempt-1), max)`,
/// rounded to whole milliseconds.
pub fn attempt_delay(backoff: &BackoffSpec, attempt: u32) -> Duration {
    let initial = backoff.initial_delay.as_millis() as f64;
    let max = backoff.max_delay.as_millis();
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let uncapped = initial * backoff.multiplier.powi(exponent);
    // `as` saturates for huge or infinite values, and min() caps them.
    Duration::from_millis((uncapped.round() as u64).min(max))
}

/// The retry tiers of a pipeline: one per distinct delay over attempts 1..maxAttempts-1.
/// Empty when maxAttempts is 1 (no retry).
pub fn retry_tiers(retry: &RetrySpec) -> Vec<RetryTier> {
    let mut tiers: Vec<RetryTier> = Vec::new();
    for attempt in 1..retry.max_attempts {
        let delay = attempt_delay(&retry.backoff, attempt);
        match tiers.last_mut() {
            Some(last) if last.delay == delay => last.last_attempt = attempt,
            _ => tiers.push(RetryTier {
                index: u32::try_from(tiers.len() + 1).unwrap_or(u32::MAX),
                delay,
                first_attempt: attempt,
                last_attempt: attempt,
            }),
        }
    }
    tiers
}

/// The tier a failure at `attempt` goes to, or None when the message must be dead-lettered.
pub fn tier_for_attempt(tiers: &[RetryTier], attempt: u32) -> Option<&RetryTier> {
    tiers
        .iter()
        .find(|tier| (tier.first_attempt..=tier.last_attempt).contains(&attempt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn retry(max_attempts: u32, initial_ms: u64, multiplier: f64, max_ms: u64) -> RetrySpec {
        RetrySpec {
            max_attempts,
            backoff: BackoffSpec {
                initial_delay: Duration::from_millis(initial_ms),
                multiplier,
                max_delay: Duration::from_millis(max_ms),
            },
        }
    }

    #[test]
    fn notes_defaults_give_four_doubling_tiers() {
        let tiers = retry_tiers(&retry(5, 1_000, 2.0, 60_000));
        let delays: Vec<_> = tiers.iter().map(|t| t.delay.to_string()).collect();
        assert_eq!(delays, ["1s", "2s", "4s", "8s"]);
        assert_eq!(tier_for_attempt(&tiers, 3).map(|t| t.index), Some(3));
        assert_eq!(tier_for_attempt(&tiers, 5), None);
    }

    #[test]
    fn capped_attempts_share_the_last_tier() {
        let tiers = retry_tiers(&retry(8, 1_000, 2.0, 5_000));
        let shape: Vec<_> = tiers
            .iter()
            .map(|t| (t.delay.as_millis(), t.first_attempt, t.last_attempt))
            .collect();
        assert_eq!(
            shape,
            [(1_000, 1, 1), (2_000, 2, 2), (4_000, 3, 3), (5_000, 4, 7)]
        );
    }

    #[test]
    fn one_attempt_means_no_retry_tiers() {
        assert!(retry_tiers(&retry(1, 1_000, 2.0, 5_000)).is_empty());
    }

    #[test]
    fn constant_backoff_is_one_tier() {
        let tiers = retry_tiers(&retry(10, 30_000, 1.0, 30_000));
        assert_eq!(tiers.len(), 1);
        assert_eq!((tiers[0].first_attempt, tiers[0].last_attempt), (1, 9));
    }

    fn any_retry() -> impl Strategy<Value = RetrySpec> {
        (
            1u32..=100,
            1u64..=100_000,
            1.0f64..=10.0,
            0u64..=u32::MAX as u64,
        )
            .prop_map(|(attempts, initial, multiplier, extra)| {
                let max = (initial + extra).min(u32::MAX as u64);
                retry(attempts, initial, multiplier, max)
            })
    }

    proptest! {
        #[test]
        fn tier_delays_strictly_increase_and_never_exceed_max(spec in any_retry()) {
            let tiers = retry_tiers(&spec);
            for pair in tiers.windows(2) {
                prop_assert!(pair[0].delay < pair[1].delay);
            }
            for tier in &tiers {
                prop_assert!(tier.delay <= spec.backoff.max_delay);
                prop_assert!(tier.delay >= Duration::from_millis(1));
            }
        }

        #[test]
        fn every_retryable_attempt_maps_to_exactly_one_tier_with_its_delay(spec in any_retry()) {
            let tiers = retry_tiers(&spec);
            for attempt in 1..spec.max_attempts {
                let matching: Vec<_> = tiers
                    .iter()
                    .filter(|t| (t.first_attempt..=t.last_attempt).contains(&attempt))
                    .collect();
                prop_assert_eq!(matching.len(), 1);
                prop_assert_eq!(matching[0].delay, attempt_delay(&spec.backoff, attempt));
            }
            prop_assert!(tier_for_attempt(&tiers, spec.max_attempts).is_none());
        }

        #[test]
        fn tier_indexes_are_dense_from_one(spec in any_retry()) {
            let tiers = retry_tiers(&spec);
            for (i, tier) in tiers.iter().enumerate() {
                prop_assert_eq!(tier.index as usize, i + 1);
            }
        }
    }
}
