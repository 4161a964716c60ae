//! What a replay sends, decided without IO: which dead letters, to which exchange and routing
//! key, with which headers.

use std::collections::BTreeSet;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use msgpipe_client::headers;
use serde::Serialize;

use k8s_openapi::jiff::Timestamp;
use regex::Regex;

use super::letter::{BROKER_DEATHS, BROKER_DELIVERY_COUNT, DeadLetter, RawDeadLetter};
use super::value::header_u64;
use crate::plan::PipelineNames;

/// Header naming the replay that made a copy (`x-msgpipe-replay-id`): a copy that fails
/// again and comes back to the DLQ carries it, so the same replay (resumed with
/// `--resume ID`) skips it instead of replaying it twice; consumers can drop a duplicate by
/// (message id, replay id).
pub const REPLAY_ID: &str = "x-msgpipe-replay-id";

/// Which dead letters a replay takes, and when it stops. The scan never goes past the
/// messages that were in the DLQ when it started, so a replayed message that fails again
/// and returns is not replayed twice by one run.
#[derive(Clone, Debug, Default)]
pub struct ReplaySelection {
    /// Only these message ids (None: any).
    pub ids: Option<BTreeSet<String>>,
    /// Only this reason (`permanent`, `max-attempts`, `rejected`, `expired`, ...).
    pub reason: Option<String>,
    /// Only dead letters whose last error matches.
    pub error_matches: Option<Regex>,
    /// Only dead letters that last failed before this instant.
    pub failed_before: Option<Timestamp>,
    /// Only dead letters that last failed after this instant.
    pub failed_after: Option<Timestamp>,
    /// Replay at most this many.
    pub limit: Option<usize>,
    /// Skip dead letters a copy of this replay made (they came back after a resumed run).
    pub replay_id: Option<String>,
}

/// Why a dead letter the scan read is not replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// It does not match the selection.
    NotSelected,
    /// A copy made by this same replay that failed again.
    AlreadyReplayed,
}

impl ReplaySelection {
    /// Every dead letter.
    pub fn all() -> Self {
        Self::default()
    }

    /// The dead letters with these message ids.
    pub fn ids(ids: impl IntoIterator<Item = String>) -> Self {
        Self {
            ids: Some(ids.into_iter().collect()),
            ..Self::default()
        }
    }

    /// Whether the replay takes `letter` (`raw` is the same message, for its headers).
    pub fn check(&self, raw: &RawDeadLetter, letter: &DeadLetter) -> Result<(), Skipped> {
        if let Some(id) = &self.replay_id
            && raw.replay_id().is_some_and(|seen| &seen == id)
        {
            return Err(Skipped::AlreadyReplayed);
        }
        let failed_at = letter
            .last_failure
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok());
        let selected = self.ids.as_ref().is_none_or(|ids| {
            letter
                .message_id
                .as_ref()
                .is_some_and(|id| ids.contains(id))
        }) && self
            .reason
            .as_ref()
            .is_none_or(|r| letter.reason.as_ref() == Some(r))
            && self
                .error_matches
                .as_ref()
                .is_none_or(|re| letter.error.as_deref().is_some_and(|e| re.is_match(e)))
            && self
                .failed_before
                .is_none_or(|t| failed_at.is_some_and(|at| at < t))
            && self
                .failed_after
                .is_none_or(|t| failed_at.is_some_and(|at| at > t));
        if selected {
            Ok(())
        } else {
            Err(Skipped::NotSelected)
        }
    }

    /// Whether the scan can stop: the limit is reached, or every requested id was found.
    pub fn done(&self, replayed: usize, found_ids: usize) -> bool {
        self.limit.is_some_and(|limit| replayed >= limit)
            || self.ids.as_ref().is_some_and(|ids| found_ids >= ids.len())
    }

    /// Requested ids that none of `seen` carries.
    pub fn missing_ids<'a>(&self, seen: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let Some(ids) = &self.ids else {
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
    /// Always the default exchange (`""`): the copy goes to the work queue by name, the way
    /// retry tiers return messages, and reaches no other queue whatever is bound where.
    pub exchange: String,
    /// The pipeline's work queue.
    pub queue: String,
    /// The key the message was first published with, kept in
    /// `x-msgpipe-original-routing-key` (else the pipeline's routing key).
    pub original_routing_key: String,
}

/// The pipeline's work queue, by name through the default exchange. The routing key the
/// message was first published with (`x-msgpipe-original-routing-key`, else the pipeline's
/// routing key) travels in that header. Never the work exchange: every other queue bound
/// there with the same key would get a copy, and a drifted binding would send the copy
/// elsewhere while the dead letter is acked.
pub fn replay_target(letter: &DeadLetter, names: &PipelineNames) -> ReplayTarget {
    ReplayTarget {
        exchange: String::new(),
        queue: names.queue.clone(),
        original_routing_key: letter
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
/// ...) made persistent, failure headers removed, the original exchange and routing key kept
/// (`to.original_routing_key` when the message had none), and the audit trail
/// `x-msgpipe-replayed-at` (this run's time), `x-msgpipe-replay-count` (previous count + 1)
/// and `x-msgpipe-replay-id` (this replay) set.
pub fn replay_properties(
    original: &BasicProperties,
    to: &ReplayTarget,
    replayed_at: &str,
    replay_id: &str,
) -> BasicProperties {
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
    table.insert(
        ShortString::from(REPLAY_ID),
        AMQPValue::LongString(replay_id.into()),
    );
    if !table.contains_key(headers::ORIGINAL_ROUTING_KEY) {
        table.insert(
            ShortString::from(headers::ORIGINAL_ROUTING_KEY),
            AMQPValue::LongString(to.original_routing_key.as_str().into()),
        );
    }
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
        let letter = DeadLetter::interpret(&original);
        let to = replay_target(&letter, &names());
        let copy = replay_properties(&original.properties, &to, "2024-06-01T00:00:00.000Z", "r-1");
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
                REPLAY_ID,
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
        assert_eq!(get(REPLAY_ID), Some(long("r-1")));
        // To the work queue by name through the default exchange; the key travels along.
        assert_eq!(
            to,
            ReplayTarget {
                exchange: String::new(),
                queue: "notes_queue".into(),
                original_routing_key: "notes.eu".into()
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
        let to = replay_target(&letter, &names());
        assert_eq!(to.original_routing_key, "notes");
        let copy = replay_properties(&BasicProperties::default(), &to, "now", "r-2");
        let get = |name: &str| {
            copy.headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
        };
        assert_eq!(get(headers::REPLAY_COUNT), Some(AMQPValue::LongLongInt(1)));
        // The original routing key is recorded even when the message did not carry it.
        assert_eq!(get(headers::ORIGINAL_ROUTING_KEY), Some(long("notes")));
    }

    #[test]
    fn selection_by_id_stops_once_every_id_is_found_and_reports_missing_ids() {
        let ids = ReplaySelection::ids(["a".to_string(), "b".to_string()]);
        let check = |s: &ReplaySelection, r: &RawDeadLetter| s.check(r, &DeadLetter::interpret(r));
        assert_eq!(check(&ids, &raw(Some("a"), FieldTable::default())), Ok(()));
        let c = raw(Some("c"), FieldTable::default());
        assert_eq!(check(&ids, &c), Err(Skipped::NotSelected));
        assert_eq!(
            check(&ids, &raw(None, FieldTable::default())),
            Err(Skipped::NotSelected)
        );
        assert!(!ids.done(1, 1));
        assert!(ids.done(2, 2), "both found: stop reading");
        assert_eq!(ids.missing_ids(["a", "c"]), ["b"]);
        assert!(ReplaySelection::all().missing_ids([]).is_empty());
        let limited = ReplaySelection {
            limit: Some(10),
            ..ReplaySelection::all()
        };
        assert!(!limited.done(9, 0) && limited.done(10, 0));
    }

    #[test]
    fn selection_by_reason_error_and_failure_time() {
        let letter = |reason: &str, error: &str, at: &str| {
            raw(
                Some("m"),
                table(&[
                    (headers::REASON, long(reason)),
                    (headers::ERROR, long(error)),
                    (headers::LAST_FAILURE, long(at)),
                ]),
            )
        };
        let timeout = letter(
            "max-attempts",
            "db timeout after 5s",
            "2024-05-01T10:00:00Z",
        );
        let parse = letter("permanent", "invalid JSON", "2024-06-01T10:00:00Z");
        let check =
            |s: &ReplaySelection, r: &RawDeadLetter| s.check(r, &DeadLetter::interpret(r)).is_ok();
        let by_reason = ReplaySelection {
            reason: Some("permanent".into()),
            ..ReplaySelection::all()
        };
        assert!(!check(&by_reason, &timeout) && check(&by_reason, &parse));
        let by_error = ReplaySelection {
            error_matches: Some(Regex::new("timeout").expect("regex")),
            ..ReplaySelection::all()
        };
        assert!(check(&by_error, &timeout) && !check(&by_error, &parse));
        let may: Timestamp = "2024-05-15T00:00:00Z".parse().expect("time");
        let older = ReplaySelection {
            failed_before: Some(may),
            ..ReplaySelection::all()
        };
        assert!(check(&older, &timeout) && !check(&older, &parse));
        let newer = ReplaySelection {
            failed_after: Some(may),
            ..ReplaySelection::all()
        };
        assert!(!check(&newer, &timeout) && check(&newer, &parse));
    }

    #[test]
    fn a_resumed_replay_skips_its_own_copies_that_came_back() {
        let came_back = raw(Some("m"), table(&[(REPLAY_ID, long("r-9"))]));
        let resumed = ReplaySelection {
            replay_id: Some("r-9".into()),
            ..ReplaySelection::all()
        };
        let check = |s: &ReplaySelection| s.check(&came_back, &DeadLetter::interpret(&came_back));
        assert_eq!(check(&resumed), Err(Skipped::AlreadyReplayed));
        assert_eq!(check(&ReplaySelection::all()), Ok(()));
    }
}
