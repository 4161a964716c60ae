//! What exists on one vhost of a broker, as read in one pass.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Argument msgpipe puts on every binding it makes (value `true`), so a route the spec no
/// longer wants is told apart from one somebody else added. Direct and fanout exchanges
/// ignore binding arguments when routing.
pub const BINDING_MARKER: &str = "x-msgpipe-managed";

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
}

impl LiveQueue {
    /// Whether the queue's own arguments dead-letter every message to `queue` through the
    /// default exchange: what a msgpipe retry tier of that work queue is declared with.
    pub fn returns_to(&self, queue: &str) -> bool {
        self.dead_letters_to.as_deref() == Some(queue)
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
    pub fn has_binding(&self, source: &str, destination: &str, routing_key: &str) -> bool {
        self.bindings.contains_key(&LiveBinding {
            source: source.into(),
            destination: destination.into(),
            routing_key: routing_key.into(),
        })
    }
}
