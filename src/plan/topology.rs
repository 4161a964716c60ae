//! The broker objects one pipeline needs (SPEC §2), as plain data.

use serde::Serialize;
use serde_json::{Map, Value};

use super::names::PipelineNames;
use super::tiers::RetryTier;
use crate::api::{MessagePipelineSpec, QueueType};

/// Priority of every msgpipe policy. RabbitMQ applies only the highest-priority policy that
/// matches a queue, so this must beat broad catch-all policies (documented in docs/broker.md).
pub const POLICY_PRIORITY: i32 = 10;
/// Prefix of the policies msgpipe owns; the rest of the name is the queue name.
pub const POLICY_PREFIX: &str = "msgpipe.";

/// Everything one pipeline needs on one vhost.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredTopology {
    pub vhost: String,
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
    pub policies: Vec<Policy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exchange {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ExchangeKind,
    pub durable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
        }
    }
}

/// A queue. The work queue and the DLQ are declared with their type only and take every
/// other setting from their [`Policy`], so changing the spec never requires re-declaring
/// (and so deleting) them. A retry tier carries all of its settings as declare arguments
/// instead, and no policy: every one of them is fixed by its name (which holds its delay),
/// so a changed delay is a new tier queue, and the vhost's policy count does not grow with
/// the tiers (RabbitMQ re-matches every queue against every policy on each policy write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Queue {
    pub name: String,
    pub role: QueueRole,
    #[serde(rename = "type")]
    pub queue_type: QueueType,
    pub durable: bool,
    /// Settings given as `x-` declare arguments (empty: the type only).
    #[serde(skip_serializing_if = "PolicyDefinition::is_empty")]
    pub arguments: PolicyDefinition,
    /// Set only on a migration's holding queue: the type the migration goes to, declared as
    /// the argument `x-msgpipe-migrating-to` (docs/migration.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<QueueType>,
}

/// What a queue is for in the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum QueueRole {
    Work,
    /// Retry tier (1-based index).
    Retry(u32),
    DeadLetter,
}

/// An exchange-to-queue binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    pub source: String,
    pub destination: String,
    pub routing_key: String,
}

/// One operator-owned policy matching exactly one queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    /// Anchored, escaped regex matching only the queue's name.
    pub pattern: String,
    /// Always `queues` (`quorum_queues` needs RabbitMQ 3.12).
    pub apply_to: String,
    pub priority: i32,
    pub definition: PolicyDefinition,
}

/// The policy keys msgpipe sets (RabbitMQ's own spelling). Absent keys are not set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyDefinition {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_routing_key: Option<String>,
    /// `at-least-once` (quorum queues): a dead letter leaves its queue only once the target confirms it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_ttl: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    /// `reject-publish`: a full queue refuses new messages (publishers get a nack) instead of dropping old ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflow: Option<String>,
    /// Quorum queues only. `-1` means unlimited (RabbitMQ 4 defaults to 20 and then drops or
    /// dead-letters); on RabbitMQ 3.x the broker layer omits it, which means unlimited there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_limit: Option<i64>,
}

impl PolicyDefinition {
    pub fn is_empty(&self) -> bool {
        *self == PolicyDefinition::default()
    }

    /// The settings a server of major version `server_major` accepts: RabbitMQ 3.x refuses
    /// a negative delivery limit, and there no limit is the default.
    pub fn for_server(&self, server_major: u32) -> PolicyDefinition {
        let mut adapted = self.clone();
        if server_major < 4 && adapted.delivery_limit.is_some_and(|l| l < 0) {
            adapted.delivery_limit = None;
        }
        adapted
    }

    /// The settings as RabbitMQ spells them (policy keys), absent ones left out.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    /// The settings as queue declare arguments: `x-` + the policy key.
    pub fn declare_arguments(&self) -> Map<String, Value> {
        self.to_map()
            .into_iter()
            .map(|(key, value)| (format!("x-{key}"), value))
            .collect()
    }
}

/// Unlimited deliveries, for queues whose messages must never be dropped by a delivery count.
pub const UNLIMITED_DELIVERIES: i64 = -1;

/// Builds the topology of SPEC §2 from resolved names and tiers.
pub fn desired_topology(
    spec: &MessagePipelineSpec,
    vhost: &str,
    names: &PipelineNames,
    tiers: &[RetryTier],
) -> DesiredTopology {
    let queue_type = spec.queue.queue_type;
    let durable_exchange = |name: &str, kind| Exchange {
        name: name.to_string(),
        kind,
        durable: true,
    };
    let queue = |name: &str, role| Queue {
        name: name.to_string(),
        role,
        queue_type,
        durable: true,
        arguments: PolicyDefinition::default(),
        migrating_to: None,
    };

    let mut exchanges = vec![
        durable_exchange(&names.work_exchange, ExchangeKind::Direct),
        // Fanout: every dead letter reaches the DLQ whatever its routing key.
        durable_exchange(&names.dead_letter_exchange, ExchangeKind::Fanout),
    ];
    let mut queues = vec![
        queue(&names.queue, QueueRole::Work),
        queue(&names.dead_letter_queue, QueueRole::DeadLetter),
    ];
    let mut bindings = vec![
        Binding {
            source: names.work_exchange.clone(),
            destination: names.queue.clone(),
            routing_key: names.routing_key.clone(),
        },
        Binding {
            source: names.dead_letter_exchange.clone(),
            destination: names.dead_letter_queue.clone(),
            routing_key: String::new(),
        },
    ];
    let policies = vec![
        policy(&names.queue, work_queue_policy(spec, names)),
        policy(&names.dead_letter_queue, dead_letter_queue_policy(spec)),
    ];

    if !tiers.is_empty() {
        exchanges.push(durable_exchange(
            &names.retry_exchange,
            ExchangeKind::Direct,
        ));
    }
    for tier in tiers {
        let name = names.retry_queue(tier);
        bindings.push(Binding {
            source: names.retry_exchange.clone(),
            destination: name.clone(),
            routing_key: tier.routing_key(),
        });
        queues.push(Queue {
            arguments: retry_queue_settings(queue_type, names, tier),
            ..queue(&name, QueueRole::Retry(tier.index))
        });
    }

    DesiredTopology {
        vhost: vhost.to_string(),
        exchanges,
        queues,
        bindings,
        policies,
    }
}

fn policy(queue: &str, definition: PolicyDefinition) -> Policy {
    Policy {
        name: format!("{POLICY_PREFIX}{queue}"),
        pattern: format!("^{}$", regex_escape(queue)),
        apply_to: "queues".into(),
        priority: POLICY_PRIORITY,
        definition,
    }
}

/// Settings shared by every queue of a type: quorum queues dead-letter at-least-once, which
/// RabbitMQ only allows together with `overflow: reject-publish`.
fn base_definition(queue_type: QueueType) -> PolicyDefinition {
    let quorum = queue_type == QueueType::Quorum;
    PolicyDefinition {
        overflow: Some("reject-publish".into()),
        dead_letter_strategy: quorum.then(|| "at-least-once".into()),
        ..PolicyDefinition::default()
    }
}

fn work_queue_policy(spec: &MessagePipelineSpec, names: &PipelineNames) -> PolicyDefinition {
    let queue_type = spec.queue.queue_type;
    PolicyDefinition {
        dead_letter_exchange: Some(names.dead_letter_exchange.clone()),
        max_length: spec.queue.max_length,
        // A message that keeps crashing consumers (so is never acked nor retried) still
        // reaches the DLQ after as many deliveries as the retry protocol allows.
        delivery_limit: (queue_type == QueueType::Quorum)
            .then_some(i64::from(spec.retry.max_attempts)),
        ..base_definition(queue_type)
    }
}

/// A tier's settings (its declare arguments): hold each message for the tier's delay, then
/// dead-letter it back to the work queue.
fn retry_queue_settings(
    queue_type: QueueType,
    names: &PipelineNames,
    tier: &RetryTier,
) -> PolicyDefinition {
    PolicyDefinition {
        message_ttl: Some(tier.delay.as_millis()),
        // Default exchange + queue name: an expired message returns to this work queue only,
        // never to other queues bound to the work exchange.
        dead_letter_exchange: Some(String::new()),
        dead_letter_routing_key: Some(names.queue.clone()),
        delivery_limit: (queue_type == QueueType::Quorum).then_some(UNLIMITED_DELIVERIES),
        ..base_definition(queue_type)
    }
}

fn dead_letter_queue_policy(spec: &MessagePipelineSpec) -> PolicyDefinition {
    let queue_type = spec.queue.queue_type;
    PolicyDefinition {
        message_ttl: spec.dead_letter.retention.map(|d| d.as_millis()),
        max_length: spec.dead_letter.max_length,
        // Inspecting dead letters (get + requeue) counts as a delivery; never drop them for it.
        delivery_limit: (queue_type == QueueType::Quorum).then_some(UNLIMITED_DELIVERIES),
        // The DLQ dead-letters nowhere, so no strategy applies.
        dead_letter_strategy: None,
        ..base_definition(queue_type)
    }
}

/// Escapes PCRE metacharacters so a queue name matches itself literally.
pub fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.^$|?*+()[]{}/-".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_leaves_plain_names_and_escapes_metacharacters() {
        assert_eq!(regex_escape("notes_queue"), "notes_queue");
        assert_eq!(regex_escape("a.b*c(d)"), "a\\.b\\*c\\(d\\)");
    }
}
