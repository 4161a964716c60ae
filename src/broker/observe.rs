//! `managementPolicy: Observe`: what differs between a vhost and a pipeline's spec, field by
//! field, and what `Full` would do about it (pure; no IO).
//!
//! The differences come from the reconciler's own plan ([`diff::converge`]), so Observe
//! reports exactly what Full would then write, never a second opinion. A policy write is
//! broken down into the settings it changes on the queue as they are in effect today (an
//! application's declare arguments, or a hand-made policy); a declare argument that
//! contradicts the spec is reported as needing a migration (it beats any policy).

use regex::Regex;
use serde_json::{Map, Value};

use super::diff::{self, BrokerAction, Conflict};
use super::live::{LiveQueue, LiveVhost};
use super::reconcile::{LiveCounts, counts};
use crate::api::{Difference, Reason};
use crate::plan::DesiredState;
use crate::plan::topology::{POLICY_PREFIX, Policy};

/// At most this many differences are kept (a status stays small); the total is counted.
pub const MAX_DIFFERENCES: usize = 32;

/// What observing one pipeline found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The first [`MAX_DIFFERENCES`] differences, in plan order.
    pub differences: Vec<Difference>,
    /// How many differences there are in all.
    pub total: usize,
    /// Foreign policies that work against the pipeline (as in a Full reconcile).
    pub warnings: Vec<String>,
    pub counts: LiveCounts,
}

/// Compares `live` with `desired`: the differences a Full reconcile would act on.
pub fn observe(desired: &DesiredState, live: &LiveVhost) -> Observed {
    let plan = diff::converge(desired, live);
    let contradictions = contradicting_arguments(desired, live);
    let from_arguments: Vec<Conflict> =
        contradictions.iter().map(Contradiction::conflict).collect();
    let mut all = Vec::new();
    for conflict in plan
        .conflicts
        .iter()
        .filter(|c| !from_arguments.contains(c))
    {
        all.push(Difference {
            object: "pipeline".into(),
            field: conflict.field.clone(),
            live: None,
            desired: None,
            action: format!("needs a migration: {}", conflict.message),
        });
    }
    all.extend(contradictions.iter().map(Contradiction::difference));
    for action in &plan.actions {
        all.extend(differences_of(action, live));
    }
    let total = all.len();
    all.truncate(MAX_DIFFERENCES);
    Observed {
        differences: all,
        total,
        warnings: plan.warnings,
        counts: counts(desired, live),
    }
}

/// A declare argument of one of the pipeline's queues that says something else than the
/// pipeline's policy would: the argument wins, so only a migration gives the spec effect.
#[derive(Clone, Debug, PartialEq)]
pub struct Contradiction {
    pub queue: String,
    /// `x-dead-letter-exchange`, ...
    pub argument: String,
    pub live: Value,
    pub desired: Value,
}

impl Contradiction {
    /// The condition a Full reconcile reports (`ImmutableFieldChanged`).
    pub fn conflict(&self) -> Conflict {
        Conflict {
            field: spec_field(&self.argument).into(),
            reason: Reason::ImmutableFieldChanged,
            message: format!(
                "queue {} was declared with {} {}, which beats msgpipe's policy ({}); a declare argument cannot change in place, only a migration gives the spec effect (docs/adoption.md); the queue is kept as it is",
                self.queue, self.argument, self.live, self.desired
            ),
        }
    }

    fn difference(&self) -> Difference {
        Difference {
            object: format!("queue {}", self.queue),
            field: format!("arguments.{}", self.argument),
            live: Some(self.live.to_string()),
            desired: Some(self.desired.to_string()),
            action: "needs a migration (a declare argument beats msgpipe's policy)".into(),
        }
    }
}

/// The declare arguments of the pipeline's queues that contradict its policies.
pub fn contradicting_arguments(desired: &DesiredState, live: &LiveVhost) -> Vec<Contradiction> {
    let mut found = Vec::new();
    for policy in &desired.topology.policies {
        let queue = policy.name.strip_prefix(POLICY_PREFIX).unwrap_or_default();
        let Some(declared) = live.queues.get(queue).and_then(|q| q.declared.as_deref()) else {
            continue;
        };
        let wanted = policy.definition.for_server(live.server_major).to_map();
        for (key, value) in &wanted {
            let argument = format!("x-{key}");
            match declared.get(&argument) {
                Some(live_value) if !same(live_value, value) => found.push(Contradiction {
                    queue: queue.to_string(),
                    argument,
                    live: live_value.clone(),
                    desired: value.clone(),
                }),
                _ => {}
            }
        }
    }
    found
}

/// The spec field that sets a policy key (through its declare argument's name).
fn spec_field(argument: &str) -> &'static str {
    match argument {
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" => "spec.deadLetter.exchange",
        "x-delivery-limit" => "spec.retry.maxAttempts",
        "x-max-length" => "spec.queue.maxLength",
        "x-message-ttl" => "spec.deadLetter.retention",
        _ => "spec",
    }
}

/// Equal as settings: numbers compare by value (an argument may be `5` or `5.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn differences_of(action: &BrokerAction, live: &LiveVhost) -> Vec<Difference> {
    let would = format!("would {action}");
    let exists = |object: String, live: Option<String>, wanted: Option<String>| Difference {
        object,
        field: "exists".into(),
        live,
        desired: wanted,
        action: would.clone(),
    };
    match action {
        BrokerAction::PutPolicy {
            policy, definition, ..
        } => policy_differences(policy, definition, live, &would),
        BrokerAction::DeclareExchange(e) => vec![exists(
            format!("exchange {}", e.name),
            None,
            Some(format!("{} exchange", e.kind.as_str())),
        )],
        BrokerAction::DeclareQueue(q) => vec![exists(
            format!("queue {}", q.name),
            None,
            Some(format!("{} queue", q.queue_type.as_str())),
        )],
        BrokerAction::Bind(b) => vec![exists(
            format!(
                "binding {} -> {} (key {:?})",
                b.source, b.destination, b.routing_key
            ),
            None,
            Some("bound".into()),
        )],
        BrokerAction::Unbind(b) => vec![exists(
            format!(
                "binding {} -> {} (key {:?})",
                b.source, b.destination, b.routing_key
            ),
            Some("bound".into()),
            None,
        )],
        BrokerAction::DeleteQueueIfEmpty { queue, .. } => {
            let messages = live.queues.get(queue).map_or(0, |q| q.messages);
            vec![exists(
                format!("queue {queue}"),
                Some(format!("{messages} messages")),
                None,
            )]
        }
        BrokerAction::DeleteExchange { exchange } => {
            vec![exists(
                format!("exchange {exchange}"),
                Some("exists".into()),
                None,
            )]
        }
        BrokerAction::Keep { .. } => Vec::new(),
    }
}

/// A policy write, setting by setting: each key whose value in effect on the queue today
/// (its declare argument, else the policy that applies to it) differs from the spec's. A
/// policy to create whose settings are all in effect already is still one difference: the
/// settings then move to msgpipe's policy.
fn policy_differences(
    policy: &Policy,
    definition: &Map<String, Value>,
    live: &LiveVhost,
    would: &str,
) -> Vec<Difference> {
    let queue_name = policy.name.strip_prefix(POLICY_PREFIX).unwrap_or_default();
    let queue = live.queues.get(queue_name);
    let in_effect = applying_policy(live, queue_name, queue);
    let object = format!("queue {queue_name}");
    let mut found = Vec::new();
    let mut keys: Vec<&String> = definition.keys().collect();
    if let Some((_, applied)) = &in_effect {
        keys.extend(applied.keys().filter(|k| !definition.contains_key(*k)));
    }
    for key in keys {
        let declared = queue
            .and_then(|q| q.declared.as_deref())
            .and_then(|d| d.get(&format!("x-{key}")));
        if declared.is_some() {
            continue; // an argument: agrees, or is a contradiction reported on its own
        }
        let current = in_effect.as_ref().and_then(|(_, p)| p.get(key));
        let wanted = definition.get(key);
        if current.zip(wanted).is_some_and(|(a, b)| same(a, b)) {
            continue;
        }
        if current.is_none() && wanted.is_none() {
            continue;
        }
        found.push(Difference {
            object: object.clone(),
            field: format!("policy.{key}"),
            live: current.map(ToString::to_string),
            desired: wanted.map(ToString::to_string),
            action: would.to_string(),
        });
    }
    let ours = in_effect
        .as_ref()
        .is_some_and(|(name, _)| *name == policy.name);
    if found.is_empty() && !ours {
        found.push(Difference {
            object,
            field: "policy".into(),
            live: in_effect.map(|(name, _)| name),
            desired: Some(policy.name.clone()),
            action: format!("{would} (its settings are in effect already)"),
        });
    } else if found.is_empty() {
        // msgpipe's own policy, with another pattern, priority or apply-to.
        found.push(Difference {
            object: format!("policy {}", policy.name),
            field: "pattern, priority, apply-to".into(),
            live: live
                .policies
                .get(&policy.name)
                .map(|p| format!("{:?} {} {}", p.pattern, p.priority, p.apply_to)),
            desired: Some(format!(
                "{:?} {} {}",
                policy.pattern, policy.priority, policy.apply_to
            )),
            action: would.to_string(),
        });
    }
    found
}

/// The user policy RabbitMQ applies to `queue`: the highest priority one whose pattern
/// matches and whose `apply-to` covers the queue. (Name, definition.)
fn applying_policy(
    live: &LiveVhost,
    name: &str,
    queue: Option<&LiveQueue>,
) -> Option<(String, Map<String, Value>)> {
    let queue_type = queue.map_or("", |q| q.queue_type.as_str());
    live.policies
        .iter()
        .filter(|(_, p)| match p.apply_to.as_str() {
            "queues" | "all" => true,
            "quorum_queues" => queue_type == "quorum",
            "classic_queues" => queue_type == "classic",
            _ => false,
        })
        .filter(|(_, p)| Regex::new(&p.pattern).is_ok_and(|r| r.is_match(name)))
        .max_by_key(|(_, p)| p.priority)
        .map(|(n, p)| (n.clone(), p.definition.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::load::parse_pipelines;
    use crate::broker::inventory::{InventoryQueue, VhostInventory};
    use crate::plan::plan;

    const ORDERS: &str = r#"
apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {name: orders, namespace: shop}
spec:
  broker: {secretRef: {name: rabbitmq-admin}}
  managementPolicy: Observe
  queue: {name: orders, exchange: orders, routingKey: orders}
  retry: {maxAttempts: 1}
  deadLetter: {exchange: orders.dlx, queue: orders.dlq}
  alerts: {enabled: false}
"#;

    fn orders() -> DesiredState {
        let p = parse_pipelines(ORDERS).expect("parses").remove(0);
        plan(&p, None).expect("plans")
    }

    /// The vhost exactly as msgpipe would leave it, but the work queue declared by an
    /// application with `x-dead-letter-exchange: dlx`.
    fn legacy(dead_letter_exchange: &str) -> LiveVhost {
        let desired = orders();
        let mut live = VhostInventory::new("/", "4.3.6").to_live();
        for exchange in &desired.topology.exchanges {
            live.exchanges.insert(
                exchange.name.clone(),
                crate::broker::live::LiveExchange {
                    kind: exchange.kind.as_str().into(),
                    durable: true,
                },
            );
        }
        let app = VhostInventory::new("/", "4.3.6")
            .queue(
                "orders",
                InventoryQueue::quorum().arg("x-dead-letter-exchange", dead_letter_exchange),
            )
            .queue("orders.dlq", InventoryQueue::quorum())
            .to_live();
        live.queues = app.queues;
        for b in &desired.topology.bindings {
            live.bindings.insert(
                crate::broker::live::LiveBinding {
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    routing_key: b.routing_key.clone(),
                },
                true,
            );
        }
        for p in &desired.topology.policies {
            live.policies.insert(
                p.name.clone(),
                crate::broker::live::LivePolicy {
                    pattern: p.pattern.clone(),
                    apply_to: p.apply_to.clone(),
                    priority: i64::from(p.priority),
                    definition: p.definition.for_server(4).to_map(),
                },
            );
        }
        live.server_major = 4;
        live
    }

    #[test]
    fn a_vhost_that_matches_has_no_difference_even_with_an_agreeing_argument() {
        let observed = observe(&orders(), &legacy("orders.dlx"));
        assert_eq!(observed.differences, vec![]);
        assert_eq!(observed.total, 0);
    }

    #[test]
    fn a_contradicting_declare_argument_needs_a_migration_and_is_a_conflict_of_full() {
        let live = legacy("legacy.dlx");
        let observed = observe(&orders(), &live);
        assert_eq!(
            observed.differences,
            vec![Difference {
                object: "queue orders".into(),
                field: "arguments.x-dead-letter-exchange".into(),
                live: Some("\"legacy.dlx\"".into()),
                desired: Some("\"orders.dlx\"".into()),
                action: "needs a migration (a declare argument beats msgpipe's policy)".into(),
            }]
        );
        let plan = diff::converge(&orders(), &live);
        assert_eq!(plan.actions, vec![], "nothing to write: the queue is kept");
        assert_eq!(plan.conflicts.len(), 1);
        assert_eq!(plan.conflicts[0].field, "spec.deadLetter.exchange");
        assert_eq!(plan.conflicts[0].reason, Reason::ImmutableFieldChanged);
    }

    #[test]
    fn a_missing_policy_is_reported_setting_by_setting_against_what_is_in_effect() {
        let mut live = legacy("orders.dlx");
        live.policies.clear();
        let observed = observe(&orders(), &live);
        let fields: Vec<(&str, &str, Option<&str>)> = observed
            .differences
            .iter()
            .map(|d| (d.object.as_str(), d.field.as_str(), d.live.as_deref()))
            .collect();
        // The DLX is an argument that agrees: not a difference; what the policy adds is.
        assert!(
            fields.contains(&("queue orders", "policy.dead-letter-strategy", None)),
            "{fields:?}"
        );
        assert!(
            !fields.iter().any(|f| f.1.contains("dead-letter-exchange")),
            "{fields:?}"
        );
        assert!(
            observed
                .differences
                .iter()
                .all(|d| d.action.starts_with("would create policy"))
        );
    }
}
