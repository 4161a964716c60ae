//! What exists on one vhost of a broker, as read in one pass.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Argument msgpipe puts on every binding it makes (value `true`), so a route the spec no
/// longer wants is told apart from one somebody else added. Direct and fanout exchanges
/// ignore binding arguments when routing.
pub const BINDING_MARKER: &str = "x-msgpipe-managed";

/// Declare argument of a migration's holding queue (value: the queue type the migration
/// goes to). RabbitMQ keeps unknown `x-` arguments and ignores them (3.10, 4.0, 4.3).
pub const MIGRATION_MARKER: &str = "x-msgpipe-migrating-to";

/// Declare arguments that have a policy key of the same name without `x-`: the settings
/// msgpipe's policies carry.
pub const POLICY_ARGUMENTS: [&str; 8] = [
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-delivery-limit",
];

/// A snapshot of one vhost: every exchange, queue, queue binding and policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveVhost {
    pub exchanges: BTreeMap<String, LiveExchange>,
    pub queues: BTreeMap<String, LiveQueue>,
    /// Exchange-to-queue bindings (source, queue, routing key), each with whether it carries
    /// msgpipe's marker argument ([`BINDING_MARKER`]): a route msgpipe made, which it removes
    /// once the spec no longer wants it. (One map, not a set and a subset: a snapshot of a
    /// vhost of 1,000 pipelines holds 6,000 bindings.)
    pub bindings: BTreeMap<LiveBinding, bool>,
    pub policies: BTreeMap<String, LivePolicy>,
    /// Major version of the server (3 or 4), which changes what a policy may say.
    pub server_major: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveExchange {
    pub kind: String,
    pub durable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveQueue {
    /// `quorum`, `classic` or `stream`.
    pub queue_type: String,
    pub durable: bool,
    /// Ready + unacknowledged, from management stats (they lag by the stats interval).
    pub messages: u64,
    pub consumers: u64,
    /// The queue its own declare arguments dead-letter every message to, through the default
    /// exchange (`x-dead-letter-exchange: ""` and `x-dead-letter-routing-key`): what a
    /// msgpipe retry tier is declared with. The only declare argument msgpipe reads back, so
    /// the only one a snapshot keeps (a snapshot holds every queue of the vhost: thousands).
    pub dead_letters_to: Option<String>,
    /// The queue type a migration is taking this queue's contents to, when it is msgpipe's
    /// holding queue of a migration (its declare argument [`MIGRATION_MARKER`]): what lets a
    /// restarted process finish the migration from the broker's state alone.
    pub migrating_to: Option<String>,
    /// Declare arguments that set what msgpipe's policy sets (`x-dead-letter-exchange`,
    /// `x-delivery-limit`, ...), on a queue that is not a retry tier (a tier is declared with
    /// its settings; see `dead_letters_to`): what an application declared on a queue msgpipe
    /// adopts. A declare argument beats any policy, so one that contradicts the spec is
    /// reported (only a migration changes it). None for every queue msgpipe declares, so a
    /// snapshot of msgpipe's own queues stays small.
    pub declared: Option<Box<Map<String, Value>>>,
}

impl LiveQueue {
    /// Whether the queue's own arguments dead-letter every message to `queue` through the
    /// default exchange: what a msgpipe retry tier of that work queue is declared with.
    pub fn returns_to(&self, queue: &str) -> bool {
        self.dead_letters_to.as_deref() == Some(queue)
    }

    /// [`LiveQueue::migrating_to`] of a queue declared with `arguments`.
    pub fn migrating_to(arguments: &Map<String, Value>) -> Option<String> {
        arguments
            .get(MIGRATION_MARKER)
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// [`LiveQueue::declared`] of a queue declared with `arguments`.
    pub fn declared_settings(arguments: &Map<String, Value>) -> Option<Box<Map<String, Value>>> {
        if Self::dead_letters_to(arguments).is_some() {
            return None;
        }
        let settings: Map<String, Value> = arguments
            .iter()
            .filter(|(key, _)| POLICY_ARGUMENTS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        (!settings.is_empty()).then(|| Box::new(settings))
    }

    /// [`LiveQueue::dead_letters_to`] of a queue declared with `arguments`.
    pub fn dead_letters_to(arguments: &Map<String, Value>) -> Option<String> {
        if arguments.get("x-dead-letter-exchange") != Some(&Value::from("")) {
            return None;
        }
        arguments
            .get("x-dead-letter-routing-key")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LiveBinding {
    pub source: String,
    pub destination: String,
    pub routing_key: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LivePolicy {
    pub pattern: String,
    pub apply_to: String,
    pub priority: i64,
    pub definition: Map<String, Value>,
}

impl LiveVhost {
    /// The bindings map of a snapshot from the management API's rows, (binding, carries
    /// msgpipe's marker). Arguments are part of a binding's identity to RabbitMQ, so one
    /// (source, queue, key) can be listed twice, once with the marker and once without (a
    /// route somebody else added): it is msgpipe's if any copy carries the marker, whatever
    /// the order of the list. Built from sorted rows, so the B-tree's nodes are full.
    pub fn binding_map(
        rows: impl IntoIterator<Item = (LiveBinding, bool)>,
    ) -> BTreeMap<LiveBinding, bool> {
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.dedup_by(|next, kept| {
            let same = next.0 == kept.0;
            if same {
                kept.1 |= next.1;
            }
            same
        });
        rows.into_iter().collect()
    }

    pub fn has_binding(&self, source: &str, destination: &str, routing_key: &str) -> bool {
        self.bindings.contains_key(&LiveBinding {
            source: source.into(),
            destination: destination.into(),
            routing_key: routing_key.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(source: &str, routing_key: &str) -> LiveBinding {
        LiveBinding {
            source: source.into(),
            destination: "notes_queue".into(),
            routing_key: routing_key.into(),
        }
    }

    #[test]
    fn a_binding_listed_with_and_without_the_marker_is_msgpipes_in_either_order() {
        let ours = binding("notes", "notes");
        let theirs = binding("audit", "notes");
        for rows in [
            vec![
                (ours.clone(), true),
                (theirs.clone(), false),
                (ours.clone(), false),
            ],
            vec![
                (ours.clone(), false),
                (theirs.clone(), false),
                (ours.clone(), true),
            ],
        ] {
            let map = LiveVhost::binding_map(rows);
            assert_eq!(map.len(), 2, "{map:?}");
            assert_eq!(map.get(&ours), Some(&true), "{map:?}");
            assert_eq!(map.get(&theirs), Some(&false), "{map:?}");
        }
    }
}
