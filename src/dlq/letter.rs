//! What a dead letter says about itself: its failure headers, read the same way whether the
//! msgpipe consumer wrote them or RabbitMQ dead-lettered the message on its own.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use msgpipe_client::headers;
use serde::Serialize;

use super::value::{header_text, header_u64, timestamp_text};

/// Broker-set array of deaths, most recent first (one entry per queue and reason, with a count).
pub const BROKER_DEATHS: &str = "x-death";
/// Broker-set (RabbitMQ 3.13+): the reason of the most recent death.
pub const BROKER_LAST_DEATH_REASON: &str = "x-last-death-reason";
/// Broker-set (RabbitMQ 3.13+): the queue of the most recent death.
pub const BROKER_LAST_DEATH_QUEUE: &str = "x-last-death-queue";
/// Broker-set: deliveries of the message so far (quorum queues).
pub const BROKER_DELIVERY_COUNT: &str = "x-delivery-count";

/// One message read from a DLQ, exactly as the broker delivered it.
#[derive(Clone, Debug, PartialEq)]
pub struct RawDeadLetter {
    /// 1-based position from the head of the DLQ when it was read.
    pub index: usize,
    /// Exchange and routing key the message reached the DLQ with.
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl RawDeadLetter {
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|id| id.as_str())
    }

    /// The replay that made this message, when it is a replayed copy that failed again
    /// (`x-msgpipe-replay-id`).
    pub fn replay_id(&self) -> Option<String> {
        self.headers()
            .and_then(|h| h.inner().get(super::replay::REPLAY_ID))
            .and_then(super::value::header_text)
    }
}

/// Who decided the message was dead: the msgpipe consumer (`x-msgpipe-reason`) or the broker
/// (`rejected`, `expired`, `maxlen`, `delivery_limit` from `x-death`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasonSource {
    Consumer,
    Broker,
}

/// The failure story of one dead letter, as `msgpipe dlq list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// 1-based position from the head of the DLQ when it was read (`show '#N'`).
    pub index: usize,
    pub message_id: Option<String>,
    /// `permanent` / `max-attempts` (consumer) or `rejected` / `expired` / `maxlen` /
    /// `delivery_limit` (broker).
    pub reason: Option<String>,
    pub reason_source: Option<ReasonSource>,
    /// Handler calls made, when known.
    pub attempts: Option<u64>,
    /// The last handler error.
    pub error: Option<String>,
    pub first_failure: Option<String>,
    pub last_failure: Option<String>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    /// The queue the broker dead-lettered the message from (broker dead letters only).
    pub dead_lettered_from: Option<String>,
    /// Times `msgpipe dlq replay` sent this message back already.
    pub replay_count: u64,
    /// Deliveries counted by a quorum DLQ: browsing counts too (see the module docs).
    pub delivery_count: Option<u64>,
    /// Body size in bytes.
    pub size: usize,
}

impl DeadLetter {
    /// Reads the failure headers. The consumer's own headers win; the broker's `x-death`
    /// fills in for messages RabbitMQ dead-lettered itself.
    pub fn interpret(raw: &RawDeadLetter) -> Self {
        let empty = FieldTable::default();
        let headers = raw.headers().unwrap_or(&empty);
        let text = |name: &str| headers.inner().get(name).and_then(header_text);
        let number = |name: &str| headers.inner().get(name).and_then(header_u64);
        let last_death = last_death(headers);

        let consumer_reason = text(headers::REASON);
        let broker_reason = text(BROKER_LAST_DEATH_REASON)
            .or_else(|| last_death.and_then(|d| field_text(d, "reason")))
            .or_else(|| text(headers::BROKER_FIRST_DEATH_REASON));
        let reason_source = match (&consumer_reason, &broker_reason) {
            (Some(_), _) => Some(ReasonSource::Consumer),
            (None, Some(_)) => Some(ReasonSource::Broker),
            (None, None) => None,
        };
        let attempts = number(headers::ATTEMPTS)
            .or_else(|| number(headers::RETRY_COUNT).map(|retries| retries.saturating_add(1)));
        let broker_time = last_death
            .and_then(|d| d.inner().get("time"))
            .and_then(timestamp_text);
        DeadLetter {
            index: raw.index,
            message_id: raw.message_id().map(str::to_string),
            reason: consumer_reason.or(broker_reason),
            reason_source,
            attempts,
            error: text(headers::ERROR),
            first_failure: text(headers::FIRST_FAILURE),
            last_failure: text(headers::LAST_FAILURE).or(broker_time),
            original_exchange: text(headers::ORIGINAL_EXCHANGE),
            original_routing_key: text(headers::ORIGINAL_ROUTING_KEY),
            dead_lettered_from: text(BROKER_LAST_DEATH_QUEUE)
                .or_else(|| last_death.and_then(|d| field_text(d, "queue")))
                .or_else(|| text(headers::BROKER_FIRST_DEATH_QUEUE)),
            replay_count: number(headers::REPLAY_COUNT).unwrap_or(0),
            delivery_count: number(BROKER_DELIVERY_COUNT),
            size: raw.body.len(),
        }
    }
}

/// The most recent `x-death` entry. RabbitMQ keeps the array most-recent-first, so a message
/// that went through a retry tier (`expired`) and was then rejected shows `rejected` here,
/// while `x-first-death-reason` would still say `expired`.
fn last_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get(BROKER_DEATHS)? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(table) => Some(table),
            _ => None,
        }),
        _ => None,
    }
}

fn field_text(table: &FieldTable, key: &str) -> Option<String> {
    table.inner().get(key).and_then(header_text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::value::tests::{long, table};

    fn raw(headers: FieldTable) -> RawDeadLetter {
        RawDeadLetter {
            index: 1,
            exchange: "notes_dlq_exchange".into(),
            routing_key: "notes".into(),
            properties: BasicProperties::default()
                .with_message_id("m-1".into())
                .with_headers(headers),
            body: b"hello".to_vec(),
        }
    }

    fn death(reason: &str, queue: &str, time: u64) -> AMQPValue {
        AMQPValue::FieldTable(table(&[
            ("reason", long(reason)),
            ("queue", long(queue)),
            ("time", AMQPValue::Timestamp(time)),
            ("count", AMQPValue::LongLongInt(1)),
        ]))
    }

    #[test]
    fn consumer_dead_letters_are_read_from_the_msgpipe_headers() {
        let letter = DeadLetter::interpret(&raw(table(&[
            (headers::REASON, long("max-attempts")),
            (headers::ERROR, long("db timeout")),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(5)),
            (headers::FIRST_FAILURE, long("2024-05-01T10:00:00Z")),
            (headers::LAST_FAILURE, long("2024-05-01T10:00:15Z")),
            (headers::ORIGINAL_ROUTING_KEY, long("notes")),
            (headers::RETRY_COUNT, AMQPValue::LongInt(4)),
        ])));
        assert_eq!(letter.message_id.as_deref(), Some("m-1"));
        assert_eq!(letter.reason.as_deref(), Some("max-attempts"));
        assert_eq!(letter.reason_source, Some(ReasonSource::Consumer));
        assert_eq!(letter.attempts, Some(5));
        assert_eq!(letter.error.as_deref(), Some("db timeout"));
        assert_eq!(letter.last_failure.as_deref(), Some("2024-05-01T10:00:15Z"));
        assert_eq!(letter.original_routing_key.as_deref(), Some("notes"));
        assert_eq!(letter.size, 5);
    }

    #[test]
    fn broker_dead_letters_take_the_most_recent_death_not_the_first() {
        let deaths = AMQPValue::FieldArray(
            vec![
                death("rejected", "notes_queue", 1_714_557_600),
                death("expired", "notes_queue.retry.1", 1_714_557_590),
            ]
            .into(),
        );
        let letter = DeadLetter::interpret(&raw(table(&[
            (BROKER_DEATHS, deaths),
            (headers::BROKER_FIRST_DEATH_REASON, long("expired")),
            (headers::RETRY_COUNT, AMQPValue::LongLongInt(1)),
            (headers::ERROR, long("first try failed")),
        ])));
        assert_eq!(letter.reason.as_deref(), Some("rejected"));
        assert_eq!(letter.reason_source, Some(ReasonSource::Broker));
        assert_eq!(letter.dead_lettered_from.as_deref(), Some("notes_queue"));
        assert_eq!(letter.last_failure.as_deref(), Some("2024-05-01T10:00:00Z"));
        assert_eq!(letter.attempts, Some(2), "retry count 1 = second attempt");
        assert_eq!(letter.error.as_deref(), Some("first try failed"));
    }

    #[test]
    fn first_death_reason_is_the_fallback_and_no_headers_mean_unknown() {
        let letter = DeadLetter::interpret(&raw(table(&[(
            headers::BROKER_FIRST_DEATH_REASON,
            long("delivery_limit"),
        )])));
        assert_eq!(letter.reason.as_deref(), Some("delivery_limit"));
        let bare = DeadLetter::interpret(&RawDeadLetter {
            properties: BasicProperties::default(),
            ..raw(FieldTable::default())
        });
        assert_eq!(
            (
                bare.reason,
                bare.reason_source,
                bare.attempts,
                bare.message_id
            ),
            (None, None, None, None)
        );
        assert_eq!(bare.replay_count, 0);
    }
}
