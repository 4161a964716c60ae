//! Desired topology vs live vhost -> the list of broker actions (pure; no IO).
//!
//! The one diff type of the broker edge: `apply --dry-run`, events, logs and metrics all
//! describe these actions.

use std::fmt;

use regex::Regex;
use serde_json::{Map, Value};

use super::live::LiveVhost;
use crate::api::Reason;
use crate::plan::DesiredState;
use crate::plan::topology::{
    Binding, Exchange, POLICY_PREFIX, Policy, PolicyDefinition, Queue, QueueRole,
};

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
    /// Delete a queue only if it holds no message (ready or unacknowledged) and has no
    /// consumer; then its policy. How each broker version is held to that: docs/broker.md.
    DeleteQueueIfEmpty {
        queue: String,
        policy: Option<String>,
    },
    /// Delete an exchange (teardown only; planned only when nothing else is bound to it).
    DeleteExchange {
        exchange: String,
    },
    /// Leave an object in place on purpose (teardown): nothing is written, the reason is
    /// reported like any change.
    Keep {
        kind: &'static str,
        name: String,
        reason: String,
    },
}

impl BrokerAction {
    /// Kind of object, for metrics and events.
    pub fn object_kind(&self) -> &'static str {
        match self {
            BrokerAction::PutPolicy { .. } => "policy",
            BrokerAction::DeclareExchange(_) | BrokerAction::DeleteExchange { .. } => "exchange",
            BrokerAction::Keep { kind, .. } => kind,
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
                write!(f, "delete queue {queue} if empty and unused")
            }
            BrokerAction::DeleteExchange { exchange } => write!(f, "delete exchange {exchange}"),
            BrokerAction::Keep { kind, name, reason } => write!(f, "keep {kind} {name} ({reason})"),
        }
    }
}

/// A difference that cannot be fixed without deleting something that may hold messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Spec field the user would change to resolve it.
    pub field: String,
    pub message: String,
    /// `ImmutableFieldChanged`, or `Migrating` while a migration is under way.
    pub reason: Reason,
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
    definition.for_server(server_major).to_map()
}

/// Actions that make `live` match `desired`, plus what cannot be matched.
pub fn converge(desired: &DesiredState, live: &LiveVhost) -> BrokerPlan {
    let topology = &desired.topology;
    let mut plan = BrokerPlan::default();
    // A queue whose live type differs is refused, and nothing about it is written: its
    // policy made for the other type would strip settings the live queue relies on.
    let refused = refused_queues(desired, live, &mut plan);
    let untouchable = |queue: &str| refused.iter().any(|r| r == queue);
    // Policies first: a queue is never live without its dead-letter settings.
    for policy in &topology.policies {
        let queue = policy.name.strip_prefix(POLICY_PREFIX).unwrap_or_default();
        if untouchable(queue) {
            continue;
        }
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
                reason: Reason::ImmutableFieldChanged,
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
    // Tiers of an earlier schedule (or an earlier delay) are unbound before the new tiers
    // are bound, so a routing key never reaches two tiers at once (one retry, one copy); a
    // retry published in between is returned to the consumer (`mandatory`), which gives it
    // back. They are deleted once empty, at the end.
    let mut retired = BrokerPlan::default();
    retire_removed_tiers(desired, live, &mut retired);
    let (retired_unbinds, retired_deletes): (Vec<_>, Vec<_>) = retired
        .actions
        .into_iter()
        .partition(|a| matches!(a, BrokerAction::Unbind(_)));
    for queue in &topology.queues {
        if !live.queues.contains_key(&queue.name) && !untouchable(&queue.name) {
            plan.actions.push(BrokerAction::DeclareQueue(Queue {
                arguments: queue.arguments.for_server(live.server_major),
                ..queue.clone()
            }));
        }
    }
    plan.actions.extend(retired_unbinds);
    for binding in &topology.bindings {
        if !untouchable(&binding.destination)
            && !live.has_binding(&binding.source, &binding.destination, &binding.routing_key)
        {
            plan.actions.push(BrokerAction::Bind(binding.clone()));
        }
    }
    remove_stale_bindings(desired, live, &refused, &mut plan);
    plan.actions.extend(retired_deletes);
    plan.warnings = overriding_policies(desired, live);
    plan.conflicts.extend(
        super::observe::contradicting_arguments(desired, live)
            .iter()
            .map(super::observe::Contradiction::conflict),
    );
    plan
}

/// Desired queues that exist on the broker with another type or not durable: each one is a
/// conflict, and the names are returned so nothing else about them is written.
fn refused_queues(desired: &DesiredState, live: &LiveVhost, plan: &mut BrokerPlan) -> Vec<String> {
    let mut refused = Vec::new();
    for queue in &desired.topology.queues {
        let holding = super::migration::holding_name(&queue.name);
        if live
            .queues
            .get(&holding)
            .is_some_and(|h| h.migrating_to.is_some())
        {
            // A migration is under way (or was stopped): only the migration writes these.
            plan.conflicts.push(Conflict {
                field: "spec.queue.type".into(),
                reason: Reason::Migrating,
                message: format!(
                    "queue {} is being migrated (holding queue {holding} exists); finish it with `msgpipe migrate` (or `msgpipe apply`); nothing about this queue was changed",
                    queue.name
                ),
            });
            refused.push(queue.name.clone());
            continue;
        }
        let Some(found) = live.queues.get(&queue.name) else {
            continue;
        };
        if found.queue_type == queue.queue_type.as_str() && found.durable {
            continue;
        }
        plan.conflicts.push(Conflict {
            field: "spec.queue.type".into(),
            reason: Reason::ImmutableFieldChanged,
            message: format!(
                "queue {} is a {} queue on the broker and the spec asks for {}; a queue's type cannot change in place: `msgpipe migrate -f FILE` (or `msgpipe apply`) migrates it without losing a message (docs/migration.md), or revert the spec; nothing about this queue was changed",
                queue.name,
                found.queue_type,
                queue.queue_type.as_str()
            ),
        });
        refused.push(queue.name.clone());
    }
    refused
}

/// Routes msgpipe made into the pipeline's queues that the spec no longer wants (a changed
/// routing key or work exchange): a binding carrying msgpipe's marker, or one from an
/// exchange the pipeline declares (made before bindings were marked). A binding someone else
/// added from another exchange is left alone.
fn remove_stale_bindings(
    desired: &DesiredState,
    live: &LiveVhost,
    refused: &[String],
    plan: &mut BrokerPlan,
) {
    let topology = &desired.topology;
    let ours = |queue: &str| {
        topology.queues.iter().any(|q| q.name == queue) && !refused.iter().any(|r| r == queue)
    };
    let our_exchange = |exchange: &str| topology.exchanges.iter().any(|e| e.name == exchange);
    for (live_binding, owned) in &live.bindings {
        let wanted = topology.bindings.iter().any(|b| {
            b.source == live_binding.source
                && b.destination == live_binding.destination
                && b.routing_key == live_binding.routing_key
        });
        // An unmarked binding from one of our exchanges was taken for a route msgpipe made
        // before bindings were marked; once the pipeline adopted objects, it may be theirs.
        let made_by_us =
            *owned || (desired.adopted.is_empty() && our_exchange(&live_binding.source));
        if wanted || !made_by_us || !ours(&live_binding.destination) {
            continue;
        }
        plan.actions.push(BrokerAction::Unbind(Binding {
            source: live_binding.source.clone(),
            destination: live_binding.destination.clone(),
            routing_key: live_binding.routing_key.clone(),
        }));
    }
}

/// A pipeline's teardown (`deletionPolicy: Delete`) as stages of actions. A stage runs only
/// once every queue the earlier stages delete is gone, so nothing a kept queue still needs
/// goes: retry tiers first (they return messages to the work queue), then the retry
/// exchange and the work queue, then the work exchange and the DLQ, then the dead-letter
/// exchange. Queues are unbound before they are deleted, except the DLQ (its exchange only
/// carries dead letters of the queues already gone).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeardownPlan {
    pub stages: Vec<Vec<BrokerAction>>,
}

impl TeardownPlan {
    /// Every action of every stage, in order (what `delete --dry-run` prints).
    pub fn actions(&self) -> impl Iterator<Item = &BrokerAction> {
        self.stages.iter().flatten()
    }
}

/// The teardown of `desired` given the live vhost (pure).
pub fn teardown(desired: &DesiredState, live: &LiveVhost) -> TeardownPlan {
    let names = &desired.names;
    let mut tiers: Vec<String> = desired
        .topology
        .queues
        .iter()
        .filter(|q| matches!(q.role, QueueRole::Retry(_)))
        .map(|q| q.name.clone())
        .collect();
    // Tiers left over from an earlier, longer retry schedule.
    let mut retired = BrokerPlan::default();
    retire_removed_tiers(desired, live, &mut retired);
    tiers.extend(retired.actions.into_iter().filter_map(|a| match a {
        BrokerAction::DeleteQueueIfEmpty { queue, .. } => Some(queue),
        _ => None,
    }));
    let mut ours: Vec<&str> = desired
        .topology
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    ours.extend(tiers.iter().map(String::as_str));

    let mut stages = vec![Vec::new(); 4];
    let adopted = &desired.adopted;
    let queue = |name: &str, unbind: bool, stage: &mut Vec<BrokerAction>| {
        if adopted.queue(name) {
            keep_adopted(live.queues.contains_key(name), "queue", name, stage);
        } else {
            remove_queue(live, name, unbind, stage);
        }
    };
    let exchange = |name: &str, stage: &mut Vec<BrokerAction>| {
        if adopted.exchange(name) {
            keep_adopted(live.exchanges.contains_key(name), "exchange", name, stage);
        } else {
            remove_exchange(live, name, &ours, stage);
        }
    };
    for tier in &tiers {
        queue(tier, true, &mut stages[0]);
    }
    exchange(&names.retry_exchange, &mut stages[1]);
    queue(&names.queue, true, &mut stages[1]);
    exchange(&names.work_exchange, &mut stages[2]);
    queue(&names.dead_letter_queue, false, &mut stages[2]);
    exchange(&names.dead_letter_exchange, &mut stages[3]);
    stages.retain(|stage| !stage.is_empty());
    TeardownPlan { stages }
}

/// An adopted object stays, with everything bound to it and its msgpipe policy (removing
/// the policy would change how a queue that stays dead-letters).
fn keep_adopted(exists: bool, kind: &'static str, name: &str, actions: &mut Vec<BrokerAction>) {
    if exists {
        actions.push(BrokerAction::Keep {
            kind,
            name: name.to_string(),
            reason: "adopted: msgpipe did not create it (annotation msgpipe.io/adopted)".into(),
        });
    }
}

fn remove_queue(live: &LiveVhost, queue: &str, unbind: bool, actions: &mut Vec<BrokerAction>) {
    if !live.queues.contains_key(queue) {
        return;
    }
    if unbind {
        actions.extend(
            live.bindings
                .keys()
                .filter(|b| b.destination == queue)
                .map(|b| {
                    BrokerAction::Unbind(Binding {
                        source: b.source.clone(),
                        destination: b.destination.clone(),
                        routing_key: b.routing_key.clone(),
                    })
                }),
        );
    }
    actions.push(BrokerAction::DeleteQueueIfEmpty {
        queue: queue.to_string(),
        policy: our_policy(live, queue),
    });
}

/// The name of msgpipe's policy for `queue`, when there is one on the broker.
fn our_policy(live: &LiveVhost, queue: &str) -> Option<String> {
    let policy = format!("{POLICY_PREFIX}{queue}");
    live.policies.contains_key(&policy).then_some(policy)
}

/// Deletes an exchange unless something outside the pipeline is bound to it.
fn remove_exchange(
    live: &LiveVhost,
    exchange: &str,
    ours: &[&str],
    actions: &mut Vec<BrokerAction>,
) {
    if !live.exchanges.contains_key(exchange) {
        return;
    }
    let shared = live
        .bindings
        .keys()
        .any(|b| b.source == exchange && !ours.contains(&b.destination.as_str()));
    actions.push(if shared {
        BrokerAction::Keep {
            kind: "exchange",
            name: exchange.to_string(),
            reason: "other queues are bound to it".into(),
        }
    } else {
        BrokerAction::DeleteExchange {
            exchange: exchange.to_string(),
        }
    });
}

/// Retry tiers that exist but are no longer desired (a shorter schedule, a changed delay):
/// unbind, then delete once empty. They keep their settings until they are gone, so waiting
/// messages still return to the work queue after their delay.
///
/// Only tiers msgpipe made are retired: `<queue>.retry.<index>.<delay>` declared to return
/// its messages to the work queue, or `<queue>.retry.<index>` with msgpipe's policy (how
/// tiers were made before their settings became declare arguments; the policy then stays
/// until the queue is gone).
fn retire_removed_tiers(desired: &DesiredState, live: &LiveVhost, plan: &mut BrokerPlan) {
    let work_queue = desired.names.queue.as_str();
    let prefix = format!("{work_queue}.retry.");
    let desired_queues: Vec<&str> = desired
        .topology
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .collect();
    for (name, queue) in &live.queues {
        let Some(tier) = name.strip_prefix(&prefix) else {
            continue;
        };
        let (index, delay) = tier.split_once('.').unwrap_or((tier, ""));
        let is_index = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
        let policy = our_policy(live, name);
        let ours = if delay.is_empty() {
            policy.is_some()
        } else {
            queue.returns_to(work_queue)
        };
        if !is_index
            || !ours
            || desired_queues.contains(&name.as_str())
            || desired.adopted.queue(name)
        {
            continue;
        }
        for binding in live.bindings.keys().filter(|b| &b.destination == name) {
            plan.actions.push(BrokerAction::Unbind(Binding {
                source: binding.source.clone(),
                destination: binding.destination.clone(),
                routing_key: binding.routing_key.clone(),
            }));
        }
        plan.actions.push(BrokerAction::DeleteQueueIfEmpty {
            queue: name.clone(),
            policy,
        });
    }
}

/// Foreign policies that change one of our queues. RabbitMQ applies one policy per queue: one
/// of higher priority than msgpipe's silently replaces the work queue's or the DLQ's
/// settings. A retry tier has no msgpipe policy (its settings are declare arguments, which
/// win), so any foreign policy matching it applies the keys its arguments do not set, such as
/// `expires`, which would delete the tier with the messages waiting in it.
fn overriding_policies(desired: &DesiredState, live: &LiveVhost) -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, policy) in &live.policies {
        let ours = name.starts_with(POLICY_PREFIX);
        let outranks = policy.priority > i64::from(crate::plan::topology::POLICY_PRIORITY);
        let targets_queues = matches!(
            policy.apply_to.as_str(),
            "queues" | "all" | "quorum_queues" | "classic_queues"
        );
        if ours || !targets_queues {
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
            if queue.arguments.is_empty() && outranks {
                warnings.push(format!(
                    "policy {name} (priority {}) matches queue {} and outranks msgpipe's policy, so the queue's dead-letter and TTL settings do not apply",
                    policy.priority, queue.name
                ));
                continue;
            }
            let declared = queue.arguments.to_map();
            let applied: Vec<&str> = policy
                .definition
                .keys()
                .map(String::as_str)
                .filter(|key| !declared.contains_key(*key))
                .collect();
            if !queue.arguments.is_empty() && !applied.is_empty() {
                warnings.push(format!(
                    "policy {name} matches retry queue {} and sets {} on it (msgpipe's settings there are declare arguments and win, but not these keys)",
                    queue.name,
                    applied.join(", ")
                ));
            }
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
                    let arguments = q.arguments.for_server(server_major).declare_arguments();
                    let live = LiveQueue {
                        queue_type: q.queue_type.as_str().into(),
                        durable: true,
                        messages: 0,
                        consumers: 0,
                        dead_letters_to: LiveQueue::dead_letters_to(&arguments),
                        migrating_to: None,
                        declared: None,
                    };
                    (q.name.clone(), live)
                })
                .collect(),
            bindings: t
                .bindings
                .iter()
                .map(|b| {
                    let live = LiveBinding {
                        source: b.source.clone(),
                        destination: b.destination.clone(),
                        routing_key: b.routing_key.clone(),
                    };
                    (live, false)
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
        live.bindings
            .retain(|b, _| b.source != "notes_dlq_exchange");
        live.policies
            .get_mut("msgpipe.notes_queue_dlq")
            .expect("policy")
            .definition
            .insert("message-ttl".into(), 5.into());
        assert_eq!(
            described(&converge(&desired, &live)),
            [
                "update policy msgpipe.notes_queue_dlq",
                "bind notes_dlq_exchange -> notes_queue_dlq (key \"\")"
            ]
        );
    }

    #[test]
    fn removed_tiers_are_unbound_first_and_deleted_if_empty_at_the_end() {
        let live = converged(&notes(5), 4);
        let plan = converge(&notes(3), &live);
        // Fewer attempts also lowers the quorum work queue's delivery-limit.
        assert_eq!(
            described(&plan),
            [
                "update policy msgpipe.notes_queue",
                "unbind notes_queue.retry -> notes_queue.retry.3.4s (key \"3\")",
                "unbind notes_queue.retry -> notes_queue.retry.4.8s (key \"4\")",
                "delete queue notes_queue.retry.3.4s if empty and unused",
                "delete queue notes_queue.retry.4.8s if empty and unused"
            ]
        );
        // A tier has no policy: its settings go with the queue.
        assert!(matches!(
            &plan.actions[3],
            BrokerAction::DeleteQueueIfEmpty { policy: None, .. }
        ));
    }

    fn with_initial_delay(mut desired_ms: u64) -> DesiredState {
        let mut p = parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
            .expect("parses")
            .remove(0);
        desired_ms = desired_ms.max(1);
        p.spec.retry.backoff.initial_delay = crate::api::Duration::from_millis(desired_ms);
        plan(&p, None).expect("plans")
    }

    #[test]
    fn a_changed_delay_is_a_new_tier_declared_with_its_settings_and_bound_after_the_old_is_unbound()
    {
        let live = converged(&with_initial_delay(1_000), 4);
        let plan = converge(&with_initial_delay(2_000), &live);
        let described = described(&plan);
        // 1s 2s 4s 8s becomes 2s 4s 8s 16s: tiers 1..4 all change delay, so all are new.
        let first_bind = described
            .iter()
            .position(|a| a.starts_with("bind notes_queue.retry -> notes_queue.retry.1.2s"))
            .expect("new tier 1 bound");
        let old_unbind = described
            .iter()
            .position(|a| a.starts_with("unbind notes_queue.retry -> notes_queue.retry.1.1s"))
            .expect("old tier 1 unbound");
        assert!(old_unbind < first_bind, "{described:#?}");
        assert!(
            described
                .last()
                .is_some_and(|a| a.starts_with("delete queue notes_queue.retry."))
        );
        assert!(
            !plan
                .actions
                .iter()
                .any(|a| matches!(a, BrokerAction::PutPolicy { .. })),
            "{described:#?}"
        );
        let declared = plan
            .actions
            .iter()
            .find_map(|a| match a {
                BrokerAction::DeclareQueue(q) if q.name == "notes_queue.retry.1.2s" => Some(q),
                _ => None,
            })
            .expect("declared");
        let arguments = declared.arguments.declare_arguments();
        assert_eq!(arguments.get("x-message-ttl"), Some(&Value::from(2_000)));
        assert_eq!(
            arguments.get("x-dead-letter-exchange"),
            Some(&Value::from(""))
        );
        assert_eq!(
            arguments.get("x-dead-letter-routing-key"),
            Some(&Value::from("notes_queue"))
        );
        assert_eq!(arguments.get("x-delivery-limit"), Some(&Value::from(-1)));
    }

    #[test]
    fn tiers_made_with_policies_are_drained_and_removed_with_their_policy() {
        let desired = notes(5);
        let mut live = converged(&desired, 4);
        // A vhost made by a version whose tiers were `<queue>.retry.<n>` with a policy each.
        for tier in &desired.retry_tiers {
            let new = desired.names.retry_queue(tier);
            let queue = live.queues.remove(&new).expect("tier");
            let old = format!("notes_queue.retry.{}", tier.index);
            live.queues.insert(
                old.clone(),
                LiveQueue {
                    dead_letters_to: None,
                    ..queue
                },
            );
            live.bindings.retain(|b, _| b.destination != new);
            live.bindings.insert(
                LiveBinding {
                    source: "notes_queue.retry".into(),
                    destination: old.clone(),
                    routing_key: tier.routing_key(),
                },
                false,
            );
            live.policies.insert(
                format!("{POLICY_PREFIX}{old}"),
                LivePolicy {
                    pattern: format!("^{}$", crate::plan::topology::regex_escape(&old)),
                    apply_to: "queues".into(),
                    priority: 10,
                    definition: Map::new(),
                },
            );
        }
        let plan = converge(&desired, &live);
        let described = described(&plan);
        assert_eq!(
            described
                .iter()
                .filter(|a| a.starts_with("create queue notes_queue.retry."))
                .count(),
            4
        );
        let last_unbind = described
            .iter()
            .rposition(|a| a.starts_with("unbind"))
            .expect("unbinds");
        let first_bind = described
            .iter()
            .position(|a| a.starts_with("bind"))
            .expect("binds");
        assert!(last_unbind < first_bind, "{described:#?}");
        let deleted: Vec<(&String, &Option<String>)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                BrokerAction::DeleteQueueIfEmpty { queue, policy } => Some((queue, policy)),
                _ => None,
            })
            .collect();
        assert_eq!(deleted.len(), 4, "{described:#?}");
        for (queue, policy) in deleted {
            assert_eq!(policy.as_deref(), Some(format!("msgpipe.{queue}").as_str()));
        }
    }

    #[test]
    fn queues_msgpipe_did_not_make_are_never_retired() {
        let mut live = converged(&notes(3), 3);
        let stranger = LiveQueue {
            queue_type: "quorum".into(),
            durable: true,
            messages: 0,
            consumers: 0,
            dead_letters_to: None,
            migrating_to: None,
            declared: None,
        };
        // No policy of ours, and no arguments returning messages to the work queue.
        live.queues
            .insert("notes_queue.retry.9".into(), stranger.clone());
        live.queues
            .insert("notes_queue.retry.9.1s".into(), stranger.clone());
        let elsewhere = LiveQueue {
            dead_letters_to: LiveQueue::dead_letters_to(&Map::from_iter([
                ("x-dead-letter-exchange".into(), "".into()),
                ("x-dead-letter-routing-key".into(), "another_queue".into()),
            ])),
            ..stranger
        };
        live.queues
            .insert("notes_queue.retry.8.1s".into(), elsewhere);
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
    fn a_refused_queue_type_writes_nothing_about_that_queue() {
        let desired = notes(5);
        let mut live = converged(&desired, 4);
        live.queues
            .get_mut("notes_queue")
            .expect("queue")
            .queue_type = "classic".into();
        // Its policy and binding differ too: still, nothing about notes_queue is written.
        live.policies
            .get_mut("msgpipe.notes_queue")
            .expect("policy")
            .definition
            .insert("delivery-limit".into(), 9.into());
        live.bindings.retain(|b, _| b.destination != "notes_queue");
        let plan = converge(&desired, &live);
        assert_eq!(plan.conflicts.len(), 1, "{plan:?}");
        assert!(plan.actions.is_empty(), "{:?}", described(&plan));
    }

    #[test]
    fn a_route_the_spec_no_longer_wants_is_removed_and_a_foreign_one_kept() {
        let desired = notes(5);
        let mut live = converged(&desired, 4);
        let stale = LiveBinding {
            source: "notes".into(),
            destination: "notes_queue".into(),
            routing_key: "old-key".into(),
        };
        let moved = LiveBinding {
            source: "old_exchange".into(),
            destination: "notes_queue".into(),
            routing_key: "notes".into(),
        };
        let foreign = LiveBinding {
            source: "audit".into(),
            destination: "notes_queue".into(),
            routing_key: "notes".into(),
        };
        live.bindings.extend([
            (stale.clone(), false),
            (moved.clone(), true),
            (foreign, false),
        ]);
        assert_eq!(
            described(&converge(&desired, &live)),
            [
                "unbind notes -> notes_queue (key \"old-key\")",
                "unbind old_exchange -> notes_queue (key \"notes\")"
            ]
        );
    }

    #[test]
    fn teardown_is_staged_so_nothing_a_kept_queue_needs_goes_first() {
        let desired = notes(3);
        // A tier left over from a longer schedule is torn down with the others.
        let live = converged(&notes(4), 4);
        let plan = teardown(&desired, &live);
        let stages: Vec<Vec<String>> = plan
            .stages
            .iter()
            .map(|s| s.iter().map(ToString::to_string).collect())
            .collect();
        assert_eq!(
            stages,
            [
                vec![
                    "unbind notes_queue.retry -> notes_queue.retry.1.1s (key \"1\")",
                    "delete queue notes_queue.retry.1.1s if empty and unused",
                    "unbind notes_queue.retry -> notes_queue.retry.2.2s (key \"2\")",
                    "delete queue notes_queue.retry.2.2s if empty and unused",
                    "unbind notes_queue.retry -> notes_queue.retry.3.4s (key \"3\")",
                    "delete queue notes_queue.retry.3.4s if empty and unused",
                ],
                vec![
                    "delete exchange notes_queue.retry",
                    "unbind notes -> notes_queue (key \"notes\")",
                    "delete queue notes_queue if empty and unused",
                ],
                vec![
                    "delete exchange notes",
                    "delete queue notes_queue_dlq if empty and unused",
                ],
                vec!["delete exchange notes_dlq_exchange"],
            ]
        );
    }

    #[test]
    fn teardown_keeps_an_exchange_other_queues_use() {
        let desired = notes(2);
        let mut live = converged(&desired, 4);
        live.bindings.insert(
            LiveBinding {
                source: "notes".into(),
                destination: "audit_queue".into(),
                routing_key: "notes".into(),
            },
            false,
        );
        let plan = teardown(&desired, &live);
        assert!(
            plan.actions()
                .any(|a| a.to_string() == "keep exchange notes (other queues are bound to it)")
        );
        assert!(
            plan.actions()
                .all(|a| a.to_string() != "delete exchange notes")
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

    fn foreign_policy(priority: i64) -> LivePolicy {
        let definition =
            serde_json::json!({"expires": 60_000, "dead-letter-exchange": "elsewhere"});
        LivePolicy {
            pattern: ".*".into(),
            apply_to: "all".into(),
            priority,
            definition: definition.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn a_higher_priority_foreign_policy_is_reported() {
        let desired = notes(5);
        let mut live = converged(&desired, 3);
        live.policies.insert("ha-all".into(), foreign_policy(50));
        let plan = converge(&desired, &live);
        assert!(plan.actions.is_empty());
        let outranked: Vec<&String> = plan
            .warnings
            .iter()
            .filter(|w| w.contains("outranks msgpipe's policy"))
            .collect();
        assert_eq!(
            outranked.len(),
            2,
            "work queue and DLQ: {:?}",
            plan.warnings
        );
        let tiers: Vec<&String> = plan
            .warnings
            .iter()
            .filter(|w| w.contains("matches retry queue"))
            .collect();
        assert_eq!(
            tiers.len(),
            desired.retry_tiers.len(),
            "{:?}",
            plan.warnings
        );
        // The tier's own arguments win for the dead-letter exchange; `expires` applies.
        assert!(
            tiers.iter().all(|w| w.contains("sets expires on it")),
            "{tiers:?}"
        );
    }

    #[test]
    fn a_lower_priority_foreign_policy_is_reported_on_retry_tiers_only() {
        let desired = notes(5);
        let mut live = converged(&desired, 4);
        live.policies.insert("catch-all".into(), foreign_policy(0));
        let plan = converge(&desired, &live);
        assert_eq!(
            plan.warnings.len(),
            desired.retry_tiers.len(),
            "{:?}",
            plan.warnings
        );
        assert!(
            plan.warnings
                .iter()
                .all(|w| w.contains("matches retry queue notes_queue.retry."))
        );
    }
}
