//! Everything `msgpipe import` reads from one vhost, as plain data: every queue with all of
//! its declare arguments and the policy the broker applies to it, every queue binding with
//! its arguments, every exchange and every policy.
//!
//! Broader than [`LiveVhost`] on purpose: the reconciler's snapshot keeps one fact per queue
//! (where its arguments dead-letter to) because the operator holds snapshots of thousands of
//! queues; an import reads a vhost once and needs every argument to say what it cannot
//! express. [`VhostInventory::to_live`] gives the reconciler's view of the same read, so an
//! import can ask the reconciler what adopting a pipeline would do.
//!
//! The builder methods (`exchange`, `queue`, `bind`, `policy`) make fixtures for the pure
//! import code; [`super::RabbitBroker::inventory`] fills one from the management API.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Value};

use super::live::{BINDING_MARKER, LiveBinding, LiveExchange, LivePolicy, LiveQueue, LiveVhost};

/// One vhost as an import reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VhostInventory {
    pub vhost: String,
    /// `3.10.8`, `4.3.6`, ...
    pub server_version: String,
    pub exchanges: BTreeMap<String, InventoryExchange>,
    pub queues: BTreeMap<String, InventoryQueue>,
    /// Exchange-to-queue bindings (the default exchange's implicit ones left out).
    pub bindings: Vec<InventoryBinding>,
    pub policies: BTreeMap<String, LivePolicy>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InventoryExchange {
    /// `direct`, `fanout`, `topic`, `headers`, or a plugin's type.
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InventoryQueue {
    /// `quorum`, `classic` or `stream`.
    pub queue_type: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    /// Every declare argument (`x-message-ttl`, `x-dead-letter-exchange`, ...).
    pub arguments: Map<String, Value>,
    /// The user policy the broker applies to the queue, as the broker reports it.
    pub policy: Option<String>,
    /// The operator policy the broker applies to the queue, if any.
    pub operator_policy: Option<String>,
    /// Ready + unacknowledged (management figures; they lag by the statistics interval).
    pub messages: u64,
    pub consumers: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InventoryBinding {
    pub source: String,
    pub destination: String,
    pub routing_key: String,
    pub arguments: Map<String, Value>,
}

impl InventoryBinding {
    /// Whether msgpipe made this binding (it carries [`BINDING_MARKER`]).
    pub fn is_msgpipes(&self) -> bool {
        self.arguments.contains_key(BINDING_MARKER)
    }

    /// Arguments other than msgpipe's marker (they matter to headers exchanges only).
    pub fn foreign_arguments(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.arguments.iter().filter(|(k, _)| *k != BINDING_MARKER)
    }
}

impl InventoryQueue {
    /// A durable queue of `queue_type` with no arguments but its type (fixture builder).
    pub fn new(queue_type: &str) -> Self {
        let mut arguments = Map::new();
        if queue_type != "classic" {
            arguments.insert("x-queue-type".into(), Value::from(queue_type));
        }
        Self {
            queue_type: queue_type.into(),
            durable: true,
            auto_delete: false,
            exclusive: false,
            arguments,
            policy: None,
            operator_policy: None,
            messages: 0,
            consumers: 0,
        }
    }

    pub fn quorum() -> Self {
        Self::new("quorum")
    }

    pub fn classic() -> Self {
        Self::new("classic")
    }

    /// Adds a declare argument, e.g. `.arg("x-message-ttl", 5000)`.
    pub fn arg(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.arguments.insert(key.into(), value.into());
        self
    }

    pub fn messages(mut self, messages: u64) -> Self {
        self.messages = messages;
        self
    }

    pub fn consumers(mut self, consumers: u64) -> Self {
        self.consumers = consumers;
        self
    }

    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self.durable = false;
        self
    }
}

impl VhostInventory {
    /// An empty vhost of a server of `server_version` (fixture builder).
    pub fn new(vhost: &str, server_version: &str) -> Self {
        Self {
            vhost: vhost.into(),
            server_version: server_version.into(),
            ..Self::default()
        }
    }

    /// Adds a durable exchange of `kind`.
    pub fn exchange(mut self, name: &str, kind: &str) -> Self {
        let exchange = InventoryExchange {
            kind: kind.into(),
            durable: true,
            auto_delete: false,
            internal: false,
        };
        self.exchanges.insert(name.into(), exchange);
        self
    }

    pub fn queue(mut self, name: &str, queue: InventoryQueue) -> Self {
        self.queues.insert(name.into(), queue);
        self
    }

    /// Binds `destination` to `source` with `routing_key`, no arguments.
    pub fn bind(self, source: &str, destination: &str, routing_key: &str) -> Self {
        self.bind_with(source, destination, routing_key, Map::new())
    }

    pub fn bind_with(
        mut self,
        source: &str,
        destination: &str,
        routing_key: &str,
        arguments: Map<String, Value>,
    ) -> Self {
        self.bindings.push(InventoryBinding {
            source: source.into(),
            destination: destination.into(),
            routing_key: routing_key.into(),
            arguments,
        });
        self
    }

    /// Adds a policy (apply-to `queues`) and applies it, as RabbitMQ would, to every queue it
    /// matches with a higher priority than the queue's current policy.
    pub fn policy(
        mut self,
        name: &str,
        pattern: &str,
        priority: i64,
        keys: &[(&str, Value)],
    ) -> Self {
        let policy = LivePolicy {
            pattern: pattern.into(),
            apply_to: "queues".into(),
            priority,
            definition: keys
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
        };
        self.policies.insert(name.into(), policy);
        self.match_policies();
        self
    }

    /// Sets every queue's policy to the one RabbitMQ applies: of the policies whose pattern
    /// matches its name and whose `apply-to` covers it, the one of highest priority.
    ///
    /// Computed rather than taken from the broker's report, which comes from the statistics
    /// and lags a policy change by the statistics interval; except that a queue keeps the
    /// policy the broker reported when that policy's pattern is one Rust's regex cannot read
    /// (RabbitMQ's patterns are PCRE: look-arounds, back-references).
    pub fn match_policies(&mut self) {
        let mut compiled = Vec::new();
        let mut unreadable = Vec::new();
        for (name, policy) in &self.policies {
            match Regex::new(&policy.pattern) {
                Ok(regex) => compiled.push((name, policy, regex)),
                Err(_) => unreadable.push(name.as_str()),
            }
        }
        for (queue_name, queue) in &mut self.queues {
            if queue
                .policy
                .as_deref()
                .is_some_and(|reported| unreadable.contains(&reported))
            {
                continue;
            }
            queue.policy = compiled
                .iter()
                .filter(|(_, p, regex)| {
                    applies_to_queue(&p.apply_to, &queue.queue_type) && regex.is_match(queue_name)
                })
                .max_by_key(|(_, p, _)| p.priority)
                .map(|(name, _, _)| (*name).clone());
        }
    }

    /// Major version of the server (3 or 4).
    pub fn server_major(&self) -> u32 {
        self.server_version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(3)
    }

    /// What a queue's settings are in effect: its arguments and its policy combined as
    /// RabbitMQ combines them. None if the queue does not exist.
    pub fn settings(&self, queue: &str) -> Option<QueueSettings> {
        let found = self.queues.get(queue)?;
        let policy = found
            .policy
            .as_ref()
            .and_then(|name| self.policies.get(name).map(|p| (name.as_str(), p)));
        Some(QueueSettings::combine(&found.arguments, policy))
    }

    /// Queues that a message dead-lettered (or published) to `exchange` with `routing_key`
    /// reaches: the default exchange routes by queue name; a direct exchange by equal key; a
    /// fanout one to all; anything else (topic, headers) is not resolved (None).
    pub fn route(&self, exchange: &str, routing_key: Option<&str>) -> Option<Vec<String>> {
        if exchange.is_empty() {
            let key = routing_key?;
            return Some(
                self.queues
                    .contains_key(key)
                    .then(|| key.to_string())
                    .into_iter()
                    .collect(),
            );
        }
        let kind = self.exchanges.get(exchange).map(|e| e.kind.as_str())?;
        let bound = self.bindings.iter().filter(|b| b.source == exchange);
        let mut queues: Vec<String> = match kind {
            "fanout" => bound.map(|b| b.destination.clone()).collect(),
            "direct" => {
                let key = routing_key?;
                bound
                    .filter(|b| b.routing_key == key)
                    .map(|b| b.destination.clone())
                    .collect()
            }
            _ => return None,
        };
        // The lists are read at once, not atomically: a binding may name a queue the queue
        // list (read a moment apart) does not have.
        queues.retain(|q| self.queues.contains_key(q));
        queues.sort();
        queues.dedup();
        Some(queues)
    }

    /// The reconciler's view of the same read ([`LiveVhost`]), so the reconciler's own diff
    /// can say what adopting a pipeline would do.
    pub fn to_live(&self) -> LiveVhost {
        LiveVhost {
            server_major: self.server_major(),
            exchanges: self
                .exchanges
                .iter()
                .map(|(name, e)| {
                    let exchange = LiveExchange {
                        kind: e.kind.clone(),
                        durable: e.durable,
                    };
                    (name.clone(), exchange)
                })
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|(name, q)| {
                    let queue = LiveQueue {
                        queue_type: q.queue_type.clone(),
                        durable: q.durable,
                        messages: q.messages,
                        consumers: q.consumers,
                        dead_letters_to: LiveQueue::dead_letters_to(&q.arguments),
                        migrating_to: LiveQueue::migrating_to(&q.arguments),
                        declared: LiveQueue::declared_settings(&q.arguments),
                    };
                    (name.clone(), queue)
                })
                .collect(),
            bindings: LiveVhost::binding_map(self.bindings.iter().map(|b| {
                let binding = LiveBinding {
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    routing_key: b.routing_key.clone(),
                };
                (binding, b.is_msgpipes())
            })),
            policies: self.policies.clone(),
        }
    }
}

/// Whether a policy's `apply-to` covers a queue of `queue_type`.
fn applies_to_queue(apply_to: &str, queue_type: &str) -> bool {
    match apply_to {
        "queues" | "all" => true,
        "quorum_queues" => queue_type == "quorum",
        "classic_queues" => queue_type == "classic",
        "streams" => queue_type == "stream",
        _ => false,
    }
}

/// Where a setting in effect comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingSource {
    /// A declare argument (`x-<key>`): fixed for the queue's life, and it beats any policy.
    Argument,
    /// The named policy.
    Policy(String),
}

impl std::fmt::Display for SettingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingSource::Argument => f.write_str("declare argument"),
            SettingSource::Policy(name) => write!(f, "policy {name}"),
        }
    }
}

/// One setting in effect on a queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    pub value: Value,
    pub source: SettingSource,
}

/// A queue's settings in effect, by policy key (`message-ttl`, `dead-letter-exchange`,
/// ...; a declare argument `x-message-ttl` is key `message-ttl`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSettings {
    pub keys: BTreeMap<String, Setting>,
}

/// Keys where RabbitMQ takes the smaller of argument and policy; for every other key the
/// argument wins (`rabbit_amqqueue_process` / `rabbit_quorum_queue` policy lookups).
const SMALLER_WINS: [&str; 5] = [
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "expires",
    "delivery-limit",
];

impl QueueSettings {
    /// Combines declare arguments and the policy in effect as RabbitMQ does.
    pub fn combine(arguments: &Map<String, Value>, policy: Option<(&str, &LivePolicy)>) -> Self {
        let mut keys: BTreeMap<String, Setting> = BTreeMap::new();
        if let Some((name, policy)) = policy {
            for (key, value) in &policy.definition {
                let setting = Setting {
                    value: value.clone(),
                    source: SettingSource::Policy(name.into()),
                };
                keys.insert(key.clone(), setting);
            }
        }
        for (argument, value) in arguments {
            let Some(key) = argument.strip_prefix("x-") else {
                continue;
            };
            let from_policy = keys.get(key).and_then(|s| s.value.as_i64());
            let policy_smaller = SMALLER_WINS.contains(&key)
                && matches!((from_policy, value.as_i64()), (Some(p), Some(a)) if p < a);
            if !policy_smaller {
                let setting = Setting {
                    value: value.clone(),
                    source: SettingSource::Argument,
                };
                keys.insert(key.to_string(), setting);
            }
        }
        Self { keys }
    }

    pub fn get(&self, key: &str) -> Option<&Setting> {
        self.keys.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|s| s.value.as_str())
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|s| s.value.as_i64())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn arguments_beat_policies_except_where_the_smaller_limit_wins() {
        let inventory = VhostInventory::new("/", "4.3.6")
            .queue(
                "orders",
                InventoryQueue::quorum()
                    .arg("x-dead-letter-exchange", "from-arg")
                    .arg("x-max-length", 500)
                    .arg("x-message-ttl", 1_000),
            )
            .policy(
                "limits",
                "^orders$",
                1,
                &[
                    ("dead-letter-exchange", json!("from-policy")),
                    ("max-length", json!(100)),
                    ("message-ttl", json!(60_000)),
                    ("overflow", json!("reject-publish")),
                ],
            );
        let settings = inventory.settings("orders").expect("queue");
        assert_eq!(settings.str("dead-letter-exchange"), Some("from-arg"));
        assert_eq!(
            settings.get("dead-letter-exchange").map(|s| &s.source),
            Some(&SettingSource::Argument)
        );
        assert_eq!(settings.int("max-length"), Some(100));
        assert_eq!(
            settings.get("max-length").map(|s| &s.source),
            Some(&SettingSource::Policy("limits".into()))
        );
        assert_eq!(settings.int("message-ttl"), Some(1_000));
        assert_eq!(settings.str("overflow"), Some("reject-publish"));
        assert_eq!(settings.str("queue-type"), Some("quorum"));
    }

    #[test]
    fn the_highest_priority_matching_policy_applies_and_apply_to_is_respected() {
        let inventory = VhostInventory::new("/", "3.13.7")
            .queue("orders", InventoryQueue::quorum())
            .queue("orders.dlq", InventoryQueue::classic())
            .policy("all", ".*", 0, &[])
            .policy("orders", "^orders", 5, &[])
            .policy("quorum-only", "^orders", 9, &[]);
        let mut inventory = inventory;
        inventory
            .policies
            .get_mut("quorum-only")
            .expect("policy")
            .apply_to = "quorum_queues".into();
        inventory.match_policies();
        assert_eq!(
            inventory.queues["orders"].policy.as_deref(),
            Some("quorum-only")
        );
        assert_eq!(
            inventory.queues["orders.dlq"].policy.as_deref(),
            Some("orders")
        );
    }

    #[test]
    fn routes_resolve_through_the_default_direct_and_fanout_exchanges_only() {
        let inventory = VhostInventory::new("/", "4.3.6")
            .exchange("work", "direct")
            .exchange("dlx", "fanout")
            .exchange("events", "topic")
            .queue("a", InventoryQueue::classic())
            .queue("b", InventoryQueue::classic())
            .bind("work", "a", "a")
            .bind("work", "b", "b")
            .bind("dlx", "a", "x")
            .bind("dlx", "b", "y")
            .bind("events", "a", "#");
        assert_eq!(inventory.route("", Some("b")), Some(vec!["b".to_string()]));
        assert_eq!(inventory.route("", Some("missing")), Some(vec![]));
        assert_eq!(
            inventory.route("work", Some("a")),
            Some(vec!["a".to_string()])
        );
        assert_eq!(
            inventory.route("dlx", None),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(inventory.route("events", Some("a.b")), None);
        assert_eq!(inventory.route("work", None), None);
    }
}
