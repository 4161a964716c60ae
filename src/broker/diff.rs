//! Desired topology vs live vhost -> the list of broker actions (pure; no IO).
//!
//! The one diff type of the broker edge: `apply --dry-run`, events, logs and metrics all
//! describe these actions.

use std::fmt;

use regex::Regex;
use serde_json::{Map, Value};

use super::live::LiveVhost;
use crate::plan::DesiredState;
use crate::plan::topology::{Binding, Exchange, POLICY_PREFIX, Policy, PolicyDefinition, Queue};

/// One change to make on the broker.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerAction {
    /// Create or update an operator-owned policy; `definition` is already adapted to the server.
    PutPolicy {
        policy: Policy,
        definition: Map<String, Value>,
        exists: bool,
    },
    DeclareExchange(Exchange),
    DeclareQueue(Queue),
    Bind(Binding),
    Unbind(Binding),
    /// Delete a queue only if a passive declare finds it empty and unconsumed; then its policy.
    DeleteQueueIfEmpty {
        queue: String,
        policy: Option<String>,
    },
}

impl BrokerAction {
    /// Kind of object, for metrics and events.
    pub fn object_kind(&self) -> &'static str {
        match self {
            BrokerAction::PutPolicy { .. } => "policy",
            BrokerAction::DeclareExchange(_) => "exchange",
            BrokerAction::DeclareQueue(_) | BrokerAction::DeleteQueueIfEmpty { .. } => "queue",
            BrokerAction::Bind(_) | BrokerAction::Unbind(_) => "binding",
        }
    }
}

impl fmt::Display for BrokerAction {
    /// What the action will do, in the words `apply --dry-run` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerAction::PutPolicy {
                policy,
                exists: false,
                ..
            } => write!(f, "create policy {}", policy.name),
            BrokerAction::PutPolicy {
                policy,
                exists: true,
                ..
            } => write!(f, "update policy {}", policy.name),
            BrokerAction::DeclareExchange(e) => {
                write!(f, "create exchange {} ({})", e.name, e.kind.as_str())
            }
            BrokerAction::DeclareQueue(q) => {
                write!(f, "create queue {} ({})", q.name, q.queue_type.as_str())
            }
            BrokerAction::Bind(b) => write!(
                f,
                "bind {} -> {} (key {:?})",
                b.source, b.destination, b.routing_key
            ),
            BrokerAction::Unbind(b) => write!(
                f,
                "unbind {} -> {} (key {:?})",
                b.source, b.destination, b.routing_key
            ),
            BrokerAction::DeleteQueueIfEmpty { queue, .. } => {
                write!(f, "delete queue {queue} if empty")
            }
        }
    }
}

/// A difference that cannot be fixed without deleting something that may hold messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Spec field the user would change to resolve it.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What to do on one vhost for one pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerPlan {
    pub actions: Vec<BrokerAction>,
    /// Reported as `ImmutableFieldChanged`; the other actions still run.
    pub conflicts: Vec<Conflict>,
    /// Things that work against the pipeline but are not ours to change.
    pub warnings: Vec<String>,
}

/// The policy definition as sent to a server of major version `server_major`.
pub fn policy_definition(definition: &PolicyDefinition, server_major: u32) -> Map<String, Value> {
    let mut map = match serde_json::to_value(definition) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    // RabbitMQ 3.x refuses a negative delivery limit; there, no limit is the default.
    if server_major < 4
        && map
            .get("delivery-limit")
            .and_then(Value::as_i64)
            .is_some_and(|l| l < 0)
    {
        map.remove("delivery-limit");
    }
    map
}

/// Actions that make `live` match `desired`, plus what cannot be matched.
pub fn converge(desired: &DesiredState, live: &LiveVhost) -> BrokerPlan {
    let topology = &desired.topology;
    let mut plan = BrokerPlan::default();
    // Policies first: a queue is never live without its dead-letter settings.
    for policy in &topology.policies {
        let definition = policy_definition(&policy.definition, live.server_major);
        let current = live.policies.get(&policy.name);
        let matches = current.is_some_and(|p| {
            p.pattern == policy.pattern
                && p.apply_to == policy.apply_to
                && p.priority == i64::from(policy.priority)
                && p.definition == definition
        });
        if !matches {
            plan.actions.push(BrokerAction::PutPolicy {
                policy: policy.clone(),
                definition,
                exists: current.is_some(),
            });
        }
    }
    for exchange in &topology.exchanges {
        match live.exchanges.get(&exchange.name) {
            None => plan.actions.push(BrokerAction::DeclareExchange(exchange.clone())),
            Some(found) if found.kind != exchange.kind.as_str() || !found.durable => plan.conflicts.push(Conflict {
                field: exchange_field(desired, &exchange.name).into(),
                message: format!(
                    "exchange {} exists as a {}{} exchange; the pipeline needs a durable {} one (use another name, or delete it yourself)",
                    exchange.name,
                    if found.durable { "durable " } else { "transient " },
                    found.kind,
                    exchange.kind.as_str()
                ),
            }),
            Some(_) => {}
        }
    }
    for queue in &topology.queues {
        match live.queues.get(&queue.name) {
            None => plan.actions.push(BrokerAction::DeclareQueue(queue.clone())),
            Some(found) if found.queue_type != queue.queue_type.as_str() || !found.durable => {
                plan.conflicts.push(Conflict {
                    field: "spec.queue.type".into(),
                    message: format!(
                        "queue {} is a {} queue on the broker and the spec asks for {}; a queue's type cannot change, and msgpipe never deletes a queue to change it (drain and delete it yourself, or revert the spec)",
                        queue.name,
                        found.queue_type,
                        queue.queue_type.as_str()
                    ),
                })
            }
            Some(_) => {}
        }
    }
    for binding in &topology.bindings {
        if !live.has_binding(&binding.source, &binding.destination, &binding.routing_key) {
            plan.actions.push(BrokerAction::Bind(binding.clone()));
        }
    }
    retire_removed_tiers(desired, live, &mut plan);
    plan.warnings = overriding_policies(desired, live);
    plan
}

/// Retry tiers that exist but are no longer desired: unbind, then delete once empty. Their
/// policy stays until the queue is gone, so waiting messages still return to the work queue.
fn retire_removed_tiers(desired: &DesiredState, live: &LiveVhost, plan: &mut BrokerPlan) {
    let prefix = format!("{}.retry.", desired.names.queue);
    let desired_queues: Vec<&str> = desired
        .topology
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    for name in live.queues.keys() {
        let Some(index) = name.strip_prefix(&prefix) else {
            continue;
        };
        let is_tier = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
        let policy = format!("{POLICY_PREFIX}{name}");
        // Only queues msgpipe made: its policy is on them.
        if !is_tier
            || desired_queues.contains(&name.as_str())
            || !live.policies.contains_key(&policy)
        {
            continue;
        }
        for binding in live.bindings.iter().filter(|b| &b.destination == name) {
            plan.actions.push(BrokerAction::Unbind(Binding {
                source: binding.source.clone(),
                destination: binding.destination.clone(),
                routing_key: binding.routing_key.clone(),
            }));
        }
        plan.actions.push(BrokerAction::DeleteQueueIfEmpty {
            queue: name.clone(),
            policy: Some(policy),
        });
    }
}

/// RabbitMQ applies one policy per queue: a foreign policy of higher priority that matches
/// one of our queues silently replaces our dead-letter settings.
fn overriding_policies(desired: &DesiredState, live: &LiveVhost) -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, policy) in &live.policies {
        let ours = name.starts_with(POLICY_PREFIX);
        let outranks = policy.priority > i64::from(crate::plan::topology::POLICY_PRIORITY);
        let targets_queues = matches!(
            policy.apply_to.as_str(),
            "queues" | "all" | "quorum_queues" | "classic_queues"
        );
        if ours || !outranks || !targets_queues {
            continue;
        }
        let Ok(pattern) = Regex::new(&policy.pattern) else {
            continue;
        };
        for queue in desired
            .topology
            .queues
            .iter()
            .filter(|q| pattern.is_match(&q.name))
        {
            warnings.push(format!(
                "policy {name} (priority {}) matches queue {} and outranks msgpipe's policy, so the queue's dead-letter and TTL settings do not apply",
                policy.priority, queue.name
            ));
        }
    }
    warnings
}

fn exchange_field(desired: &DesiredState, exchange: &str) -> &'static str {
    if exchange == desired.names.dead_letter_exchange {
        "spec.deadLetter.exchange"
    } else {
        "spec.queue.exchange"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::load::parse_pipelines;
    use crate::broker::live::{LiveBinding, LiveExchange, LivePolicy, LiveQueue};
    use crate::plan::plan;

    fn notes(max_attempts: u32) -> DesiredState {
        let mut p = parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
            .expect("parses")
            .remove(0);
        p.spec.retry.max_attempts = max_attempts;
        plan(&p, None).expect("plans")
    }

    /// The vhost exactly as converging `desired` would leave it.
    fn converged(desired: &DesiredState, server_major: u32) -> LiveVhost {
        let t = &desired.topology;
        LiveVhost {
            exchanges: t
                .exchanges
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        LiveExchange {
                            kind: e.kind.as_str().into(),
                            durable: true,
                        },
                    )
                })
                .collect(),
            queues: t
                .queues
                .iter()
                .map(|q| {
                    let live = LiveQueue {
                        queue_type: q.queue_type.as_str().into(),
                        durable: true,
                        messages: 0,
                        consumers: 0,
                    };
                    (q.name.clone(), live)
                })
                .collect(),
            bindings: t
                .bindings
                .iter()
                .map(|b| LiveBinding {
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    routing_key: b.routing_key.clone(),
                })
                .collect(),
            policies: t
                .policies
                .iter()
                .map(|p| {
                    let live = LivePolicy {
                        pattern: p.pattern.clone(),
                        apply_to: p.apply_to.clone(),
                        priority: i64::from(p.priority),
                        definition: policy_definition(&p.definition, server_major),
                    };
                    (p.name.clone(), live)
                })
                .collect(),
            server_major,
        }
    }

    fn described(plan: &BrokerPlan) -> Vec<String> {
        plan.actions.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn empty_vhost_gets_everything_policies_first() {
        let desired = notes(5);
        let plan = converge(
            &desired,
            &LiveVhost {
                server_major: 3,
                ..LiveVhost::default()
            },
        );
        let t = &desired.topology;
        assert_eq!(
            plan.actions.len(),
            t.policies.len() + t.exchanges.len() + t.queues.len() + t.bindings.len()
        );
        assert!(matches!(
            plan.actions[0],
            BrokerAction::PutPolicy { exists: false, .. }
        ));
        assert!(plan.conflicts.is_empty());
    }

    #[test]
    fn converged_vhost_needs_no_action() {
        for major in [3, 4] {
            let desired = notes(5);
            assert_eq!(
                converge(&desired, &converged(&desired, major)),
                BrokerPlan::default()
            );
        }
    }

    #[test]
    fn deleted_dlx_binding_and_changed_policy_are_repaired() {
        let desired = notes(5);
        let mut live = converged(&desired, 3);
        live.bindings.retain(|b| b.source != "notes_dlq_exchange");
        live.policies
            .get_mut("msgpipe.notes_queue.retry.2")
            .expect("policy")
            .definition
            .insert("message-ttl".into(), 5.into());
        assert_eq!(
            described(&converge(&desired, &live)),
            [
                "update policy msgpipe.notes_queue.retry.2",
                "bind notes_dlq_exchange -> notes_queue_dlq (key \"\")"
            ]
        );
    }

    #[test]
    fn removed_tiers_are_unbound_then_deleted_if_empty_keeping_their_policy_until_then() {
        let live = converged(&notes(5), 3);
        let plan = converge(&notes(3), &live);
        // Fewer attempts also lowers the quorum work queue's delivery-limit.
        assert_eq!(
            described(&plan),
            [
                "update policy msgpipe.notes_queue",
                "unbind notes_queue.retry -> notes_queue.retry.3 (key \"3\")",
                "delete queue notes_queue.retry.3 if empty",
                "unbind notes_queue.retry -> notes_queue.retry.4 (key \"4\")",
                "delete queue notes_queue.retry.4 if empty"
            ]
        );
        assert!(
            matches!(&plan.actions[2], BrokerAction::DeleteQueueIfEmpty { policy: Some(p), .. } if p == "msgpipe.notes_queue.retry.3")
        );
    }

    #[test]
    fn queues_without_our_policy_are_never_retired() {
        let mut live = converged(&notes(3), 3);
        let stranger = LiveQueue {
            queue_type: "quorum".into(),
            durable: true,
            messages: 0,
            consumers: 0,
        };
        live.queues.insert("notes_queue.retry.9".into(), stranger);
        assert!(converge(&notes(3), &live).actions.is_empty());
    }

    #[test]
    fn changed_queue_type_is_a_conflict_not_a_delete() {
        let desired = notes(5);
        let mut live = converged(&desired, 3);
        live.queues
            .get_mut("notes_queue")
            .expect("queue")
            .queue_type = "classic".into();
        let plan = converge(&desired, &live);
        assert_eq!(plan.conflicts.len(), 1);
        assert_eq!(plan.conflicts[0].field, "spec.queue.type");
        assert!(
            plan.actions
                .iter()
                .all(|a| !matches!(a, BrokerAction::DeleteQueueIfEmpty { .. }))
        );
    }

    #[test]
    fn rabbitmq_3_never_gets_a_negative_delivery_limit() {
        let desired = notes(5);
        let dlq = desired
            .topology
            .policies
            .iter()
            .find(|p| p.name == "msgpipe.notes_queue_dlq")
            .expect("dlq policy");
        assert_eq!(
            policy_definition(&dlq.definition, 4).get("delivery-limit"),
            Some(&Value::from(-1))
        );
        assert_eq!(
            policy_definition(&dlq.definition, 3).get("delivery-limit"),
            None
        );
    }

    #[test]
    fn a_higher_priority_foreign_policy_is_reported() {
        let desired = notes(5);
        let mut live = converged(&desired, 3);
        live.policies.insert(
            "ha-all".into(),
            LivePolicy {
                pattern: ".*".into(),
                apply_to: "all".into(),
                priority: 50,
                definition: Map::new(),
            },
        );
        let plan = converge(&desired, &live);
        assert_eq!(plan.warnings.len(), desired.topology.queues.len());
        assert!(plan.actions.is_empty());
    }
}
