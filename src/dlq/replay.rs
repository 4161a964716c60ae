//! What a replay sends, decided without IO: which dead letters, to which exchange and routing
//! key, with which headers.

use std::collections::BTreeSet;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use msgpipe_client::headers;
use serde::Serialize;

use super::letter::{BROKER_DEATHS, BROKER_DELIVERY_COUNT, DeadLetter, RawDeadLetter};
use super::value::header_u64;
use crate::plan::PipelineNames;

/// Which dead letters a replay takes. The scan never goes past the messages that were in the
/// DLQ when it started, so a replayed message that fails again and returns is not replayed
/// twice by one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplaySelection {
    /// Every dead letter present at the start.
    All,
    /// Every dead letter whose message id is one of these.
    Ids(BTreeSet<String>),
    /// The first N from the head of the DLQ.
    First(usize),
}

impl ReplaySelection {
    pub fn selects(&self, letter: &RawDeadLetter) -> bool {
        match self {
            ReplaySelection::All | ReplaySelection::First(_) => true,
            ReplaySelection::Ids(ids) => letter.message_id().is_some_and(|id| ids.contains(id)),
        }
    }

    /// How many dead letters to read from the head, given the depth at the start.
    pub fn scan_limit(&self, depth: u64) -> usize {
        let depth = usize::try_from(depth).unwrap_or(usize::MAX);
        match self {
            ReplaySelection::First(n) => depth.min(*n),
            ReplaySelection::All | ReplaySelection::Ids(_) => depth,
        }
    }

    /// Requested ids that none of `seen` carries.
    pub fn missing_ids<'a>(&self, seen: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let ReplaySelection::Ids(ids) = self else {
            return Vec::new();
        };
        let seen: BTreeSet<&str> = seen.into_iter().collect();
        ids.iter()
            .filter(|id| !seen.contains(id.as_str()))
            .cloned()
            .collect()
    }
}

/// Where a replayed copy is published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayTarget {
    pub exchange: String,
    pub routing_key: String,
}

/// The pipeline's work exchange, with the routing key the message was first published with
/// (`x-msgpipe-original-routing-key`), else the pipeline's routing key. Never the key it
/// reached the DLQ with: a retry tier or the broker may have changed that.
pub fn replay_target(letter: &DeadLetter, names: &PipelineNames) -> ReplayTarget {
    ReplayTarget {
        exchange: names.work_exchange.clone(),
        routing_key: letter
            .original_routing_key
            .clone()
            .filter(|key| !key.is_empty())
            .unwrap_or_else(|| names.routing_key.clone()),
    }
}

/// Headers a replayed copy drops so that it starts over as a first delivery: the retry count,
/// the consumer's failure record and the broker's death record.
const FAILURE_HEADERS: [&str; 7] = [
    headers::RETRY_COUNT,
    headers::ERROR,
    headers::REASON,
    headers::ATTEMPTS,
    headers::FIRST_FAILURE,
    headers::LAST_FAILURE,
    BROKER_DELIVERY_COUNT,
];

fn is_failure_header(name: &str) -> bool {
    FAILURE_HEADERS.contains(&name)
        || name == BROKER_DEATHS
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// Properties of the replayed copy: the original's (message id, content type, correlation id,
/// ...) made persistent, failure headers removed, the original exchange and routing key kept,
/// and the audit trail `x-msgpipe-replayed-at` (this run's time) and `x-msgpipe-replay-count`
/// (previous count + 1) set.
pub fn replay_properties(original: &BasicProperties, replayed_at: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    let mut previous_replays = 0;
    if let Some(headers) = original.headers() {
        for (name, value) in headers {
            if name.as_str() == headers::REPLAY_COUNT {
                previous_replays = header_u64(value).unwrap_or(0);
            } else if !is_failure_header(name.as_str()) {
                table.insert(name.clone(), value.clone());
            }
        }
    }
    table.insert(
        ShortString::from(headers::REPLAYED_AT),
        AMQPValue::LongString(replayed_at.into()),
    );
    let count = i64::try_from(previous_replays.saturating_add(1)).unwrap_or(i64::MAX);
    table.insert(
        ShortString::from(headers::REPLAY_COUNT),
        AMQPValue::LongLongInt(count),
    );
    original
        .clone()
        .with_headers(table)
        .with_delivery_mode(PERSISTENT)
}

/// AMQP delivery mode of messages written to disk.
const PERSISTENT: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::value::tests::{long, table};

    fn names() -> PipelineNames {
        PipelineNames {
            queue: "notes_queue".into(),
            work_exchange: "notes".into(),
            routing_key: "notes".into(),
            retry_exchange: "notes_queue.retry".into(),
            dead_letter_exchange: "notes_dlq_exchange".into(),
            dead_letter_queue: "notes_queue_dlq".into(),
        }
    }

    fn raw(id: Option<&str>, headers: FieldTable) -> RawDeadLetter {
        let mut properties = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into());
        if let Some(id) = id {
            properties = properties.with_message_id(id.into());
        }
        RawDeadLetter {
            index: 1,
            exchange: "notes_dlq_exchange".into(),
            routing_key: "notes_queue".into(),
            properties,
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn replayed_copy_starts_fresh_keeps_its_identity_and_counts_the_replay() {
        let deaths = AMQPValue::FieldArray(vec![AMQPValue::FieldTable(table(&[]))].into());
        let original = raw(
            Some("m-7"),
            table(&[
                (headers::RETRY_COUNT, AMQPValue::LongInt(4)),
                (headers::ERROR, long("boom")),
                (headers::REASON, long("max-attempts")),
                (headers::ATTEMPTS, AMQPValue::LongInt(5)),
                (headers::FIRST_FAILURE, long("2024-05-01T10:00:00Z")),
                (headers::LAST_FAILURE, long("2024-05-01T10:00:15Z")),
                (headers::ORIGINAL_ROUTING_KEY, long("notes.eu")),
                (headers::ORIGINAL_EXCHANGE, long("notes")),
                (headers::REPLAY_COUNT, AMQPValue::LongLongInt(2)),
                (BROKER_DEATHS, deaths),
                ("x-first-death-reason", long("rejected")),
                ("x-first-death-queue", long("notes_queue")),
                ("x-delivery-count", AMQPValue::LongLongInt(3)),
                ("tenant", long("acme")),
            ]),
        );
        let copy = replay_properties(&original.properties, "2024-06-01T00:00:00.000Z");
        let headers: Vec<&str> = copy
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            headers,
            [
                "tenant",
                headers::ORIGINAL_EXCHANGE,
                headers::ORIGINAL_ROUTING_KEY,
                headers::REPLAY_COUNT,
                headers::REPLAYED_AT,
            ]
        );
        let get = |name: &str| {
            copy.headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
        };
        assert_eq!(get(headers::REPLAY_COUNT), Some(AMQPValue::LongLongInt(3)));
        assert_eq!(
            get(headers::REPLAYED_AT),
            Some(long("2024-06-01T00:00:00.000Z"))
        );
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-7"));
        assert_eq!(
            copy.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*copy.delivery_mode(), Some(2));

        let letter = DeadLetter::interpret(&original);
        assert_eq!(
            replay_target(&letter, &names()),
            ReplayTarget {
                exchange: "notes".into(),
                routing_key: "notes.eu".into()
            }
        );
    }

    #[test]
    fn a_message_without_headers_goes_to_the_pipeline_routing_key() {
        let original = raw(None, FieldTable::default());
        let letter = DeadLetter::interpret(&RawDeadLetter {
            properties: BasicProperties::default(),
            ..original
        });
        assert_eq!(replay_target(&letter, &names()).routing_key, "notes");
        let copy = replay_properties(&BasicProperties::default(), "now");
        assert_eq!(
            copy.headers()
                .as_ref()
                .and_then(|h| h.inner().get(headers::REPLAY_COUNT).cloned()),
            Some(AMQPValue::LongLongInt(1))
        );
    }

    #[test]
    fn selection_by_id_scans_everything_present_and_reports_missing_ids() {
        let ids = ReplaySelection::Ids(["a".to_string(), "b".to_string()].into());
        assert!(ids.selects(&raw(Some("a"), FieldTable::default())));
        assert!(!ids.selects(&raw(Some("c"), FieldTable::default())));
        assert!(!ids.selects(&raw(None, FieldTable::default())));
        assert_eq!(ids.scan_limit(40), 40);
        assert_eq!(ids.missing_ids(["a", "c"]), ["b"]);
        assert_eq!(ReplaySelection::First(10).scan_limit(3), 3);
        assert_eq!(ReplaySelection::First(10).scan_limit(300), 10);
        assert!(ReplaySelection::All.missing_ids([]).is_empty());
    }
}
