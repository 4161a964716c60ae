//! Message headers of the msgpipe retry and dead-letter protocol.
//!
//! The consumer, the `msgpipe dlq` commands and users' own tools share these names; they are
//! part of the contract and never change meaning.
//!
//! Value types on the wire: counts are signed 64-bit integers (AMQP `l`, as RabbitMQ writes
//! `x-death` counts), times and texts are long strings (`S`). Readers accept any integer type,
//! and digits in a string, for the counts; times parse with [`parse_time`].

/// Retries already done for this message (0 on the first delivery). Attempt = this + 1.
/// RabbitMQ 4 ignores an `x-death` header a client sets, so the count travels in our own header.
pub const RETRY_COUNT: &str = "x-retry-count";
/// The last handler error, as text (on dead letters, and on retried messages).
pub const ERROR: &str = "x-msgpipe-error";
/// Why the consumer dead-lettered the message: [`REASON_PERMANENT`] or [`REASON_EXHAUSTED`].
pub const REASON: &str = "x-msgpipe-reason";
/// The handler said the failure is permanent: retrying cannot help.
pub const REASON_PERMANENT: &str = "permanent";
/// The last allowed attempt failed (`maxAttempts` reached).
pub const REASON_EXHAUSTED: &str = "max-attempts";
/// Attempts made (handler calls) when the message was dead-lettered.
pub const ATTEMPTS: &str = "x-msgpipe-attempts";
/// RFC 3339 time of the first failed attempt; kept across retries.
pub const FIRST_FAILURE: &str = "x-msgpipe-first-failure";
/// RFC 3339 time of the latest failed attempt.
pub const LAST_FAILURE: &str = "x-msgpipe-last-failure";
/// Exchange the message was first published to; kept across retries.
pub const ORIGINAL_EXCHANGE: &str = "x-msgpipe-original-exchange";
/// Routing key the message was first published with; kept across retries.
pub const ORIGINAL_ROUTING_KEY: &str = "x-msgpipe-original-routing-key";
/// The `expiration` property (per-message TTL, milliseconds as text) the message carried before
/// the consumer moved it to a retry tier or the DLQ. The copy has no `expiration`: it would cut
/// a retry delay short, or silently drop a dead letter (RabbitMQ's own dead-lettering does the same).
pub const ORIGINAL_EXPIRATION: &str = "x-msgpipe-original-expiration";
/// Set by `msgpipe dlq replay` on the republished copy: RFC 3339 time of the replay.
pub const REPLAYED_AT: &str = "x-msgpipe-replayed-at";
/// Set by `msgpipe dlq replay`: how many times this message was replayed from the DLQ.
pub const REPLAY_COUNT: &str = "x-msgpipe-replay-count";

/// Broker-set header on messages RabbitMQ itself dead-lettered (`rejected`, `expired`,
/// `maxlen`, `delivery_limit`): the first reason.
pub const BROKER_FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// Broker-set header: the queue the message was first dead-lettered from.
pub const BROKER_FIRST_DEATH_QUEUE: &str = "x-first-death-queue";

/// Reads a time header such as [`FIRST_FAILURE`] or [`LAST_FAILURE`] (RFC 3339); None when the
/// text is not one.
pub fn parse_time(text: &str) -> Option<std::time::SystemTime> {
    crate::retry::parse_rfc3339(text)
}
