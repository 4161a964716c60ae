//! The retry protocol, as pure functions: where a failed message goes next and the headers
//! its copy carries there. The [`crate::Consumer`] does the IO; everything it decides is here.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::PipelineConfig;
use crate::headers;

/// Error texts longer than this are cut (at a character boundary) before they go into a header:
/// headers travel in one AMQP frame, and a stack trace must not make a dead letter unpublishable.
pub const MAX_ERROR_BYTES: usize = 4096;

/// How a handler failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth another attempt after a delay (a timeout, a dependency down).
    Retryable,
    /// Retrying cannot help (a malformed message): straight to the DLQ.
    Permanent,
}

/// Where a failed message is republished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Retry tier `tier` on the retry exchange; the message returns after `delay`.
    Retry {
        /// The retry exchange.
        exchange: String,
        /// The tier's routing key.
        routing_key: String,
        /// Tier number (1-based).
        tier: u32,
        /// How long the message waits in the tier before the next attempt.
        delay: Duration,
    },
    /// The dead-letter exchange.
    DeadLetter {
        /// The dead-letter exchange.
        exchange: String,
        /// [`crate::headers::REASON_PERMANENT`] or [`crate::headers::REASON_EXHAUSTED`].
        reason: &'static str,
    },
}

impl Destination {
    /// The exchange the copy is published to.
    pub fn exchange(&self) -> &str {
        match self {
            Self::Retry { exchange, .. } | Self::DeadLetter { exchange, .. } => exchange,
        }
    }

    /// Routing key of the copy: the tier key, or the original routing key for the DLX (which
    /// routes everything to the DLQ whatever the key).
    pub fn routing_key<'a>(&'a self, original: &'a str) -> &'a str {
        match self {
            Self::Retry { routing_key, .. } => routing_key,
            Self::DeadLetter { .. } => original,
        }
    }
}

/// Retries already done, from [`headers::RETRY_COUNT`]: 0 when absent or unreadable. Any
/// integer type is accepted (other clients write 8, 16 or 32 bits), and digits in a string.
pub fn retry_count(headers: Option<&FieldTable>) -> u32 {
    let Some(value) = headers.and_then(|h| h.inner().get(headers::RETRY_COUNT)) else {
        return 0;
    };
    let count: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        // A timestamp is not a count (protocol H-2): like any other type, it reads as 0.
        AMQPValue::LongString(s) => parse_digits(&s.to_string()),
        AMQPValue::ShortString(s) => parse_digits(s.as_str()),
        _ => 0,
    };
    u32::try_from(count.max(0)).unwrap_or(u32::MAX)
}

fn parse_digits(text: &str) -> i128 {
    text.trim().parse().unwrap_or(0)
}

/// Where a failure at `attempt` (1-based) goes. A retryable failure before the last attempt goes
/// to the tier [`PipelineConfig::tier_for_attempt`] names; when the file names none although
/// attempts remain (a hand-written file), the last tier is used, as capped attempts do.
pub fn destination(config: &PipelineConfig, attempt: u32, kind: FailureKind) -> Destination {
    let dead_letter = |reason| Destination::DeadLetter {
        exchange: config.dead_letter.exchange.clone(),
        reason,
    };
    if kind == FailureKind::Permanent {
        return dead_letter(headers::REASON_PERMANENT);
    }
    if attempt >= config.max_attempts {
        return dead_letter(headers::REASON_EXHAUSTED);
    }
    let tier = config
        .tier_for_attempt(attempt)
        .or_else(|| config.retry.tiers.last());
    match tier {
        Some(tier) => Destination::Retry {
            exchange: config.retry.exchange.clone(),
            routing_key: tier.routing_key.clone(),
            tier: tier.index,
            delay: Duration::from_millis(tier.delay_ms),
        },
        None => dead_letter(headers::REASON_EXHAUSTED),
    }
}

/// One failed attempt, as the consumer saw it.
#[derive(Clone, Debug)]
pub struct Failure<'a> {
    /// 1-based attempt that failed.
    pub attempt: u32,
    pub error: &'a str,
    /// RFC 3339 time of this failure.
    pub at: &'a str,
    /// Exchange and routing key of the delivery that failed (for a retried message: the default
    /// exchange and the queue name, which is why the first values are kept in headers).
    pub delivery_exchange: &'a str,
    pub delivery_routing_key: &'a str,
}

/// The headers of the republished copy: the delivery's own headers, plus the protocol headers
/// for `destination`. First-failure time and original exchange/routing key are kept when present.
pub fn failure_headers(
    existing: Option<&FieldTable>,
    failure: &Failure<'_>,
    destination: &Destination,
) -> FieldTable {
    let mut map: BTreeMap<ShortString, AMQPValue> =
        existing.map(|h| h.inner().clone()).unwrap_or_default();
    let mut keep_or_set = |name: &'static str, value: &str| {
        map.entry(ShortString::from(name))
            .or_insert_with(|| long_string(value));
    };
    keep_or_set(headers::FIRST_FAILURE, failure.at);
    keep_or_set(headers::ORIGINAL_EXCHANGE, failure.delivery_exchange);
    keep_or_set(headers::ORIGINAL_ROUTING_KEY, failure.delivery_routing_key);
    let mut set = |name: &'static str, value: AMQPValue| {
        map.insert(ShortString::from(name), value);
    };
    set(headers::LAST_FAILURE, long_string(failure.at));
    set(
        headers::ERROR,
        long_string(truncate(failure.error, MAX_ERROR_BYTES)),
    );
    match destination {
        Destination::Retry { .. } => {
            set(headers::RETRY_COUNT, count(failure.attempt));
        }
        Destination::DeadLetter { reason, .. } => {
            set(
                headers::RETRY_COUNT,
                count(failure.attempt.saturating_sub(1)),
            );
            set(headers::REASON, long_string(reason));
            set(headers::ATTEMPTS, count(failure.attempt));
        }
    }
    FieldTable::from(map)
}

/// The text of a header, when it is a string.
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The properties of the republished copy: the original ones with `headers`, persistent, and
/// without `expiration` (kept in [`headers::ORIGINAL_EXPIRATION`]). `message_id` must already be set.
pub fn copy_properties(original: &BasicProperties, mut headers: FieldTable) -> BasicProperties {
    let mut properties = original.clone();
    if let Some(expiration) = properties.expiration().clone() {
        headers.insert(
            ShortString::from(headers::ORIGINAL_EXPIRATION),
            long_string(expiration.as_str()),
        );
        properties = strip_expiration(properties);
    }
    properties.with_headers(headers).with_delivery_mode(2)
}

/// BasicProperties has setters but no clearer: rebuild it without `expiration`.
fn strip_expiration(p: BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get().clone() { out = out.$set(v); })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// Cuts `text` to at most `max` bytes at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn count(value: u32) -> AMQPValue {
    AMQPValue::LongLongInt(value.into())
}

/// Now, as RFC 3339 UTC with fractional seconds (`2025-01-31T12:00:00.123456Z`).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// Reads an RFC 3339 time such as [`headers::FIRST_FAILURE`]; None when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    text.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(std::time::SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeadLetterTopology, Features, RetryTierConfig, RetryTopology};

    /// The notes pipeline: 5 attempts, tiers 1s/2s/4s/8s.
    fn notes(max_attempts: u32, delays: &[u64]) -> PipelineConfig {
        let tiers = delays
            .iter()
            .enumerate()
            .map(|(i, delay)| {
                let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
                RetryTierConfig {
                    index,
                    routing_key: index.to_string(),
                    queue: format!("notes_queue.retry.{index}"),
                    delay_ms: *delay,
                    first_attempt: index,
                    last_attempt: if index as usize == delays.len() {
                        max_attempts.saturating_sub(1)
                    } else {
                        index
                    },
                }
            })
            .collect();
        PipelineConfig {
            version: 1,
            pipeline: "notes-app/notes".into(),
            vhost: "/".into(),
            exchange: "notes".into(),
            routing_key: "notes".into(),
            queue: "notes_queue".into(),
            max_attempts,
            retry: RetryTopology {
                exchange: "notes_queue.retry".into(),
                tiers,
            },
            dead_letter: DeadLetterTopology {
                exchange: "notes_dlq_exchange".into(),
                queue: "notes_queue_dlq".into(),
            },
            features: Features {
                retry_pending: true,
                retry_interval_seconds: 120,
            },
        }
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn text(t: &FieldTable, name: &str) -> Option<String> {
        header_text(Some(t), name)
    }

    fn int(t: &FieldTable, name: &str) -> Option<i64> {
        match t.inner().get(name)? {
            AMQPValue::LongLongInt(v) => Some(*v),
            _ => None,
        }
    }

    fn failure<'a>(attempt: u32, at: &'a str, exchange: &'a str, key: &'a str) -> Failure<'a> {
        Failure {
            attempt,
            error: "db timeout",
            at,
            delivery_exchange: exchange,
            delivery_routing_key: key,
        }
    }

    #[test]
    fn retry_count_reads_every_integer_type_and_defaults_to_zero() {
        assert_eq!(retry_count(None), 0);
        assert_eq!(retry_count(Some(&FieldTable::default())), 0);
        for value in [
            AMQPValue::ShortShortInt(3),
            AMQPValue::ShortShortUInt(3),
            AMQPValue::ShortInt(3),
            AMQPValue::ShortUInt(3),
            AMQPValue::LongInt(3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(3),
            AMQPValue::LongString(" 3 ".into()),
            AMQPValue::ShortString("3".into()),
        ] {
            let headers = table(&[(headers::RETRY_COUNT, value.clone())]);
            assert_eq!(retry_count(Some(&headers)), 3, "{value:?}");
        }
        let negative = table(&[(headers::RETRY_COUNT, AMQPValue::LongInt(-4))]);
        assert_eq!(retry_count(Some(&negative)), 0);
        let garbage = table(&[(headers::RETRY_COUNT, AMQPValue::LongString("x".into()))]);
        assert_eq!(retry_count(Some(&garbage)), 0);
        let timestamp = table(&[(headers::RETRY_COUNT, AMQPValue::Timestamp(3))]);
        assert_eq!(retry_count(Some(&timestamp)), 0, "H-2: not an integer type");
        let huge = table(&[(headers::RETRY_COUNT, AMQPValue::LongLongInt(i64::MAX))]);
        assert_eq!(retry_count(Some(&huge)), u32::MAX);
    }

    #[test]
    fn failure_at_attempt_k_goes_to_tier_k_until_the_last_attempt() {
        let config = notes(5, &[1_000, 2_000, 4_000, 8_000]);
        for (attempt, key, delay) in [(1, "1", 1_000), (2, "2", 2_000), (4, "4", 8_000)] {
            let dest = destination(&config, attempt, FailureKind::Retryable);
            assert_eq!(
                dest,
                Destination::Retry {
                    exchange: "notes_queue.retry".into(),
                    routing_key: key.into(),
                    tier: attempt,
                    delay: Duration::from_millis(delay),
                }
            );
        }
        for attempt in [5, 6, u32::MAX] {
            assert_eq!(
                destination(&config, attempt, FailureKind::Retryable),
                Destination::DeadLetter {
                    exchange: "notes_dlq_exchange".into(),
                    reason: headers::REASON_EXHAUSTED
                }
            );
        }
    }

    #[test]
    fn capped_attempts_share_the_last_tier() {
        let config = notes(8, &[1_000, 2_000, 4_000, 5_000]);
        let tier = |attempt| match destination(&config, attempt, FailureKind::Retryable) {
            Destination::Retry { tier, .. } => tier,
            other => panic!("attempt {attempt}: {other:?}"),
        };
        assert_eq!((tier(4), tier(7)), (4, 4));
    }

    #[test]
    fn permanent_failures_and_one_attempt_pipelines_go_straight_to_the_dlq() {
        let config = notes(5, &[1_000]);
        assert_eq!(
            destination(&config, 1, FailureKind::Permanent),
            Destination::DeadLetter {
                exchange: "notes_dlq_exchange".into(),
                reason: headers::REASON_PERMANENT
            }
        );
        let no_retry = notes(1, &[]);
        assert!(matches!(
            destination(&no_retry, 1, FailureKind::Retryable),
            Destination::DeadLetter {
                reason: headers::REASON_EXHAUSTED,
                ..
            }
        ));
    }

    #[test]
    fn first_failure_sets_original_route_and_times() {
        let config = notes(5, &[1_000, 2_000]);
        let dest = destination(&config, 1, FailureKind::Retryable);
        let user = table(&[("tenant", AMQPValue::LongString("acme".into()))]);
        let at = "2025-01-01T00:00:00Z";
        let h = failure_headers(Some(&user), &failure(1, at, "notes", "notes"), &dest);
        assert_eq!(int(&h, headers::RETRY_COUNT), Some(1));
        assert_eq!(text(&h, headers::FIRST_FAILURE).as_deref(), Some(at));
        assert_eq!(text(&h, headers::LAST_FAILURE).as_deref(), Some(at));
        assert_eq!(text(&h, headers::ERROR).as_deref(), Some("db timeout"));
        assert_eq!(
            text(&h, headers::ORIGINAL_EXCHANGE).as_deref(),
            Some("notes")
        );
        assert_eq!(
            text(&h, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("notes")
        );
        assert_eq!(
            text(&h, "tenant").as_deref(),
            Some("acme"),
            "user headers kept"
        );
        assert!(!h.contains_key(headers::REASON));
        assert!(!h.contains_key(headers::ATTEMPTS));
    }

    #[test]
    fn later_failures_keep_first_failure_and_original_route() {
        let config = notes(5, &[1_000, 2_000, 4_000, 8_000]);
        let first = "2025-01-01T00:00:00Z";
        let dest1 = destination(&config, 1, FailureKind::Retryable);
        let after_one = failure_headers(None, &failure(1, first, "notes", "notes"), &dest1);
        // The retried delivery arrives from the default exchange with the queue as routing key.
        let later = "2025-01-01T00:00:03Z";
        let dest2 = destination(&config, 2, FailureKind::Retryable);
        let after_two = failure_headers(
            Some(&after_one),
            &failure(2, later, "", "notes_queue"),
            &dest2,
        );
        assert_eq!(int(&after_two, headers::RETRY_COUNT), Some(2));
        assert_eq!(
            text(&after_two, headers::FIRST_FAILURE).as_deref(),
            Some(first)
        );
        assert_eq!(
            text(&after_two, headers::LAST_FAILURE).as_deref(),
            Some(later)
        );
        assert_eq!(
            text(&after_two, headers::ORIGINAL_EXCHANGE).as_deref(),
            Some("notes")
        );
        assert_eq!(
            text(&after_two, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("notes")
        );
    }

    #[test]
    fn dead_letter_headers_explain_why() {
        let config = notes(5, &[1_000, 2_000, 4_000, 8_000]);
        let previous = table(&[
            (headers::RETRY_COUNT, AMQPValue::LongLongInt(4)),
            (
                headers::FIRST_FAILURE,
                AMQPValue::LongString("2025-01-01T00:00:00Z".into()),
            ),
        ]);
        let dest = destination(&config, 5, FailureKind::Retryable);
        let at = "2025-01-01T00:00:15Z";
        let h = failure_headers(Some(&previous), &failure(5, at, "", "notes_queue"), &dest);
        assert_eq!(
            text(&h, headers::REASON).as_deref(),
            Some(headers::REASON_EXHAUSTED)
        );
        assert_eq!(int(&h, headers::ATTEMPTS), Some(5));
        assert_eq!(int(&h, headers::RETRY_COUNT), Some(4), "retries done");
        assert_eq!(
            text(&h, headers::FIRST_FAILURE).as_deref(),
            Some("2025-01-01T00:00:00Z")
        );
        assert_eq!(text(&h, headers::LAST_FAILURE).as_deref(), Some(at));
        assert_eq!(text(&h, headers::ERROR).as_deref(), Some("db timeout"));
        // A message with no history (e.g. replayed without headers) still gets a route.
        assert_eq!(
            text(&h, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some("notes_queue")
        );

        let permanent = destination(&config, 1, FailureKind::Permanent);
        let h = failure_headers(None, &failure(1, at, "notes", "notes"), &permanent);
        assert_eq!(
            text(&h, headers::REASON).as_deref(),
            Some(headers::REASON_PERMANENT)
        );
        assert_eq!(int(&h, headers::ATTEMPTS), Some(1));
        assert_eq!(int(&h, headers::RETRY_COUNT), Some(0));
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let error = "é".repeat(MAX_ERROR_BYTES); // 2 bytes each
        let cut = truncate(&error, MAX_ERROR_BYTES);
        assert_eq!(cut.len(), MAX_ERROR_BYTES);
        let odd = truncate(&error, 5);
        assert_eq!(odd, "éé");
        assert_eq!(truncate("short", 100), "short");
    }

    #[test]
    fn copies_are_persistent_and_lose_their_expiration() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("text/plain".into())
            .with_expiration("60000".into())
            .with_delivery_mode(1);
        let copy = copy_properties(&original, FieldTable::default());
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(
            copy.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(
            header_text(copy.headers().as_ref(), headers::ORIGINAL_EXPIRATION).as_deref(),
            Some("60000")
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z'), "{now}");
        assert!(parse_rfc3339(&now).is_some(), "{now}");
        assert!(parse_rfc3339("2025-01-01T00:00:00+02:00").is_some());
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
