//! Migrating live queues to what they cannot change in place (their type), as a plan of
//! steps decided from the broker's state alone (pure; no IO).
//!
//! A queue's type is fixed for its life, so the work queue `Q`, its DLQ `D` and its retry
//! tiers `T…` (they share `spec.queue.type`) each move through a **holding queue** `X.migrating`,
//! already of the target type and declared with the argument [`MIGRATION_MARKER`] naming
//! that type. The stages, each one a list of [`MigrationStep`]s (docs/migration.md):
//!
//! 1. **Holding**: declare the holding queues (`Q.migrating` first: the holding tiers
//!    dead-letter into it); route to them (work queue and DLQ: bind the holding queue, then
//!    unbind the old one, so a publisher always has a route; tiers: unbind, then bind, so a
//!    retry never reaches two queues).
//! 2. **Draining**: move `Q` into `Q.migrating` and `D` into `D.migrating` (confirm-then-ack),
//!    until they hold nothing and the old tiers — which return their messages to `Q` when
//!    their delay is over — are empty; then delete the old tiers, `Q` and `D`.
//! 3. **Replacing**: policies of the new type, then `Q`, `D` and the tiers declared with the new
//!    type, routed again, and the holding queues unrouted.
//! 4. **Returning**: move `Q.migrating` back into `Q` (until the holding tiers, which now
//!    dead-letter into it, are empty too) and `D.migrating` into `D`; delete the holding queues.
//!
//! Retry tiers dead-letter to the default exchange with the work queue's name as routing key,
//! so a retried message expiring while `Q` does not exist would be dropped. No tier ever
//! points at a missing `Q`: the old tiers are drained and deleted before `Q` is, and the
//! holding tiers dead-letter into `Q.migrating`, which outlives them.
//!
//! [`plan_migration`] looks only at what exists (queues, their types and markers, bindings),
//! never at message counts, and returns the steps of the first stage not finished yet. Every
//! step is idempotent, so a process killed at any point reruns it from a fresh snapshot.

use std::fmt;

use serde::Serialize;

use super::diff::{BrokerAction, policy_definition};
use super::live::{LiveQueue, LiveVhost};
use crate::api::{QueueType, RABBIT_NAME_MAX_BYTES};
use crate::plan::DesiredState;
use crate::plan::topology::{
    Binding, POLICY_PREFIX, PolicyDefinition, Queue, QueueRole, UNLIMITED_DELIVERIES,
};

/// Suffix of a holding queue's name: `notes_queue.migrating`.
pub const HOLDING_SUFFIX: &str = ".migrating";

pub use super::live::MIGRATION_MARKER;
pub use type_policies::type_specific_policies;

/// The holding queue of `queue` during a migration.
pub fn holding_name(queue: &str) -> String {
    format!("{queue}{HOLDING_SUFFIX}")
}

/// The stage a migration is in (what its next steps do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum MigrationPhase {
    /// Declaring holding queues and routing to them.
    Holding,
    /// Moving the old queues' messages into the holding queues; deleting the old queues.
    Draining,
    /// Declaring the queues with the new type and routing to them.
    Replacing,
    /// Moving the holding queues' messages back; deleting the holding queues.
    Returning,
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationPhase::Holding => "holding",
            MigrationPhase::Draining => "draining",
            MigrationPhase::Replacing => "replacing",
            MigrationPhase::Returning => "returning",
        })
    }
}

/// One step of a migration.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationStep {
    /// A declare, bind, unbind or policy write.
    Broker(BrokerAction),
    /// Move every message of `from` into `into` (publisher confirm, then ack), until `from`
    /// holds none, ready or unacknowledged, and every queue of `feeders` (retry tiers that
    /// return their messages to `from` when their delay is over) is empty.
    Drain {
        from: String,
        into: String,
        feeders: Vec<String>,
    },
    /// Delete queues that were drained and are unrouted, each once it holds no message
    /// (ready, unacknowledged, or waiting to be dead-lettered); together, and the next step
    /// only once every one of them is gone. Consumers still attached get a cancel
    /// notification: the queue they follow is about to be declared again.
    DeleteDrained { queues: Vec<String> },
}

impl fmt::Display for MigrationStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationStep::Broker(BrokerAction::DeclareQueue(queue))
                if queue.migrating_to.is_some() =>
            {
                write!(
                    f,
                    "create holding queue {} ({})",
                    queue.name,
                    queue.queue_type.as_str()
                )
            }
            MigrationStep::Broker(action) => action.fmt(f),
            MigrationStep::Drain {
                from,
                into,
                feeders,
            } if feeders.is_empty() => write!(f, "move every message of {from} into {into}"),
            MigrationStep::Drain {
                from,
                into,
                feeders,
            } => write!(
                f,
                "move every message of {from} into {into} until {} {} empty",
                feeders.join(", "),
                if feeders.len() == 1 { "is" } else { "are" }
            ),
            MigrationStep::DeleteDrained { queues } if queues.len() == 1 => {
                write!(f, "delete queue {} once it holds no message", queues[0])
            }
            MigrationStep::DeleteDrained { queues } => {
                write!(
                    f,
                    "delete queues {} once they hold no message",
                    queues.join(", ")
                )
            }
        }
    }
}

/// The next steps of a migration, from the broker's state.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationPlan {
    pub phase: MigrationPhase,
    /// The type the queues are migrating to.
    pub target: QueueType,
    pub steps: Vec<MigrationStep>,
}

/// Why a migration cannot start (nothing was written).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MigrationRefused {
    #[error(
        "cannot migrate queue {queue}: its holding queue name {holding:?} would be longer than RabbitMQ's {RABBIT_NAME_MAX_BYTES} bytes (shorten the queue name)"
    )]
    NameTooLong { queue: String, holding: String },
    #[error(
        "cannot migrate queue {queue}: queue {holding} exists and is not a msgpipe holding queue (it lacks the argument {MIGRATION_MARKER}); rename or remove it"
    )]
    ForeignHoldingQueue { queue: String, holding: String },
    #[error(
        "cannot migrate queue {queue}: it is a {found} queue on the broker; msgpipe migrates between quorum and classic queues only"
    )]
    UnsupportedType { queue: String, found: String },
    #[error(
        "cannot migrate queue {queue}: exchange {exchange} routes to it with key {routing_key:?} and msgpipe did not make that binding; a migration would have to recreate it (remove it, migrate, and bind it again)"
    )]
    ForeignBinding {
        queue: String,
        exchange: String,
        routing_key: String,
    },
    #[error(
        "cannot start migrating queue {queue}: the broker has no room for a second copy of its messages: {reason}"
    )]
    NoRoom { queue: String, reason: String },
    #[error(
        "cannot migrate queue {queue}: the holding queues record a migration to {recorded}, and {other} records one to {other_type}; finish by hand (docs/migration.md)"
    )]
    MixedTargets {
        queue: String,
        recorded: String,
        other: String,
        other_type: String,
    },
}

/// What a broker node reports that decides whether a migration may start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom {
    pub node: String,
    pub memory_alarm: bool,
    pub disk_alarm: bool,
    /// Free disk, bytes.
    pub disk_free: u64,
    /// The free disk below which the node raises its disk alarm (and blocks publishers).
    pub disk_free_limit: u64,
}

/// Whether the broker can take a second copy of `bytes` (the message bytes of the queues
/// about to be migrated: for a while every message exists in its queue and in the holding
/// queue, and a quorum queue's log holds more): no node in a memory or disk alarm (publishers
/// are blocked already, the movers too), and on every node the free disk stays above its
/// alarm limit with twice `bytes` written.
pub fn room_for_copy(queue: &str, nodes: &[NodeRoom], bytes: u64) -> Result<(), MigrationRefused> {
    let refused = |reason: String| MigrationRefused::NoRoom {
        queue: queue.to_string(),
        reason,
    };
    for node in nodes {
        if node.memory_alarm {
            return Err(refused(format!("node {} is in a memory alarm", node.node)));
        }
        if node.disk_alarm {
            return Err(refused(format!("node {} is in a disk alarm", node.node)));
        }
        let needed = node.disk_free_limit.saturating_add(bytes.saturating_mul(2));
        if node.disk_free < needed {
            return Err(refused(format!(
                "node {} has {} MB of disk free; the queues hold {} MB, and a copy needs {} MB above its alarm limit of {} MB",
                node.node,
                node.disk_free / 1_000_000,
                bytes / 1_000_000,
                bytes.saturating_mul(2) / 1_000_000,
                node.disk_free_limit / 1_000_000
            )));
        }
    }
    Ok(())
}

/// The type a migration under way on the broker is going to (read from its holding queues'
/// marker), if one is under way for this pipeline. A migration under way is finished to this
/// type even when the spec since asks for another: then another migration follows.
pub fn recorded_target(
    desired: &DesiredState,
    live: &LiveVhost,
) -> Result<Option<QueueType>, MigrationRefused> {
    let mut found: Option<(String, String)> = None;
    for queue in &desired.topology.queues {
        let holding = holding_name(&queue.name);
        let Some(live_holding) = live.queues.get(&holding) else {
            continue;
        };
        let Some(target) = &live_holding.migrating_to else {
            return Err(MigrationRefused::ForeignHoldingQueue {
                queue: queue.name.clone(),
                holding,
            });
        };
        match &found {
            Some((other, other_type)) if other_type != target => {
                return Err(MigrationRefused::MixedTargets {
                    queue: queue.name.clone(),
                    recorded: target.clone(),
                    other: other.clone(),
                    other_type: other_type.clone(),
                });
            }
            Some(_) => {}
            None => found = Some((holding, target.clone())),
        }
    }
    Ok(found.and_then(|(_, target)| parse_type(&target)))
}

fn parse_type(text: &str) -> Option<QueueType> {
    match text {
        "quorum" => Some(QueueType::Quorum),
        "classic" => Some(QueueType::Classic),
        _ => None,
    }
}

/// One queue of the pipeline being migrated, and its state on the broker.
struct Slot<'a> {
    desired: &'a Queue,
    holding: String,
    /// Desired bindings into the queue (the routes it and its holding queue take in turn).
    routes: Vec<&'a Binding>,
    live: Option<&'a LiveQueue>,
    live_holding: Option<&'a LiveQueue>,
}

impl Slot<'_> {
    fn name(&self) -> &str {
        &self.desired.name
    }

    fn is_tier(&self) -> bool {
        matches!(self.desired.role, QueueRole::Retry(_))
    }

    /// The queue exists with the type it is migrating away from.
    fn old(&self, target: QueueType) -> bool {
        self.live.is_some_and(|q| q.queue_type != target.as_str())
    }

    fn routes_to(&self, queue: &str) -> impl Iterator<Item = Binding> + '_ {
        let queue = queue.to_string();
        self.routes.iter().map(move |b| Binding {
            destination: queue.clone(),
            ..(*b).clone()
        })
    }
}

/// The next steps that migrate the pipeline's queues to the type `desired` asks for, or None
/// when no queue needs it. Looks at what exists only, never at counts (see the module docs).
pub fn plan_migration(
    desired: &DesiredState,
    live: &LiveVhost,
) -> Result<Option<MigrationPlan>, MigrationRefused> {
    let Some(work) = desired
        .topology
        .queues
        .iter()
        .find(|q| q.role == QueueRole::Work)
    else {
        return Ok(None);
    };
    let target = work.queue_type;
    let slots = slots(desired, live)?;
    let any_holding = slots.iter().any(|s| s.live_holding.is_some());
    if !any_holding && !slots.iter().any(|s| s.old(target)) {
        return Ok(None);
    }
    check_bindings(desired, live, &slots)?;
    let feeders = retired_feeders(desired, live);
    let (phase, steps) = if slots.iter().any(|s| s.old(target) && !held(live, s)) {
        (
            MigrationPhase::Holding,
            hold(desired, live, &slots, &feeders, target),
        )
    } else if slots.iter().any(|s| s.old(target)) || !feeders.is_empty() {
        (
            MigrationPhase::Draining,
            drain_old(desired, &slots, &feeders, target),
        )
    } else if slots.iter().any(|s| needs_replacing(live, s)) {
        (
            MigrationPhase::Replacing,
            replace(desired, live, &slots, target),
        )
    } else {
        (MigrationPhase::Returning, return_held(desired, &slots))
    };
    Ok(Some(MigrationPlan {
        phase,
        target,
        steps,
    }))
}

fn slots<'a>(
    desired: &'a DesiredState,
    live: &'a LiveVhost,
) -> Result<Vec<Slot<'a>>, MigrationRefused> {
    // The work queue first, then the DLQ, then the tiers: the order every stage declares in.
    let mut queues: Vec<&Queue> = desired.topology.queues.iter().collect();
    queues.sort_by_key(|q| match q.role {
        QueueRole::Work => 0,
        QueueRole::DeadLetter => 1,
        QueueRole::Retry(index) => 1 + index,
    });
    let mut slots = Vec::new();
    for queue in queues {
        let holding = holding_name(&queue.name);
        if holding.len() > RABBIT_NAME_MAX_BYTES {
            return Err(MigrationRefused::NameTooLong {
                queue: queue.name.clone(),
                holding,
            });
        }
        let live_queue = live.queues.get(&queue.name);
        if let Some(found) = live_queue
            && parse_type(&found.queue_type).is_none()
        {
            return Err(MigrationRefused::UnsupportedType {
                queue: queue.name.clone(),
                found: found.queue_type.clone(),
            });
        }
        let live_holding = live.queues.get(&holding);
        if live_holding.is_some_and(|h| h.migrating_to.is_none()) {
            return Err(MigrationRefused::ForeignHoldingQueue {
                queue: queue.name.clone(),
                holding,
            });
        }
        slots.push(Slot {
            desired: queue,
            routes: desired
                .topology
                .bindings
                .iter()
                .filter(|b| b.destination == queue.name)
                .collect(),
            holding,
            live: live_queue,
            live_holding,
        });
    }
    Ok(slots)
}

/// A binding into a queue being migrated that msgpipe did not make would be lost with the
/// old queue, so the migration refuses to start (ours: marked, or from one of the pipeline's
/// exchanges).
fn check_bindings(
    desired: &DesiredState,
    live: &LiveVhost,
    slots: &[Slot<'_>],
) -> Result<(), MigrationRefused> {
    let our_exchange = |name: &str| desired.topology.exchanges.iter().any(|e| e.name == name);
    for (binding, owned) in &live.bindings {
        let migrating = slots
            .iter()
            .any(|s| s.name() == binding.destination || s.holding == binding.destination);
        if migrating && !owned && !our_exchange(&binding.source) {
            return Err(MigrationRefused::ForeignBinding {
                queue: binding.destination.clone(),
                exchange: binding.source.clone(),
                routing_key: binding.routing_key.clone(),
            });
        }
    }
    Ok(())
}

/// Retry tiers of an earlier schedule still on the broker (`<queue>.retry.…`, not desired):
/// they return messages to the work queue too, so they are unrouted and must be empty and
/// gone before the work queue is deleted.
fn retired_feeders(desired: &DesiredState, live: &LiveVhost) -> Vec<String> {
    let prefix = format!("{}.retry.", desired.names.queue);
    live.queues
        .iter()
        .filter(|(name, queue)| {
            name.starts_with(&prefix)
                && queue.migrating_to.is_none()
                && !name.ends_with(HOLDING_SUFFIX)
                && !desired.topology.queues.iter().any(|q| &q.name == *name)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Whether `slot`'s traffic already goes to its holding queue: it exists, takes every route,
/// and the old queue takes none.
fn held(live: &LiveVhost, slot: &Slot<'_>) -> bool {
    slot.live_holding.is_some()
        && slot
            .routes_to(&slot.holding)
            .all(|b| live.has_binding(&b.source, &b.destination, &b.routing_key))
        && !live.bindings.keys().any(|b| b.destination == slot.name())
}

/// The holding queue of `slot`: the target type, the marker, and for a tier its delay and
/// its way back to the work queue's holding queue.
fn holding_queue(desired: &DesiredState, slot: &Slot<'_>, target: QueueType, major: u32) -> Queue {
    let arguments = match slot.desired.role {
        QueueRole::Retry(_) => PolicyDefinition {
            dead_letter_routing_key: Some(holding_name(&desired.names.queue)),
            ..slot.desired.arguments.clone()
        },
        // Nobody consumes a holding queue but the mover; a mover that dies returns what it
        // held, which a quorum queue counts as a delivery (RabbitMQ 4 drops past 20).
        QueueRole::Work | QueueRole::DeadLetter => PolicyDefinition {
            delivery_limit: (target == QueueType::Quorum).then_some(UNLIMITED_DELIVERIES),
            ..PolicyDefinition::default()
        },
    };
    Queue {
        name: slot.holding.clone(),
        role: slot.desired.role,
        queue_type: target,
        durable: true,
        arguments: arguments.for_server(major),
        migrating_to: Some(target),
    }
}

fn unbind_all(live: &LiveVhost, queue: &str) -> impl Iterator<Item = MigrationStep> {
    live.bindings
        .keys()
        .filter(|b| b.destination == queue)
        .map(|b| {
            MigrationStep::Broker(BrokerAction::Unbind(Binding {
                source: b.source.clone(),
                destination: b.destination.clone(),
                routing_key: b.routing_key.clone(),
            }))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

fn bind_missing(live: &LiveVhost, routes: impl Iterator<Item = Binding>) -> Vec<MigrationStep> {
    routes
        .filter(|b| !live.has_binding(&b.source, &b.destination, &b.routing_key))
        .map(|b| MigrationStep::Broker(BrokerAction::Bind(b)))
        .collect()
}

/// Stage 1: holding queues declared, traffic routed to them.
fn hold(
    desired: &DesiredState,
    live: &LiveVhost,
    slots: &[Slot<'_>],
    feeders: &[String],
    target: QueueType,
) -> Vec<MigrationStep> {
    let mut declares = Vec::new();
    let mut binds_first = Vec::new();
    let mut unbinds = Vec::new();
    let mut binds_after = Vec::new();
    for slot in slots.iter().filter(|s| s.old(target)) {
        if slot.live_holding.is_none() {
            let queue = holding_queue(desired, slot, target, live.server_major);
            declares.push(MigrationStep::Broker(BrokerAction::DeclareQueue(queue)));
        }
        let binds = bind_missing(live, slot.routes_to(&slot.holding));
        // A publisher always has a route (bind, then unbind: a message published in between
        // may reach both); a retry never reaches two tiers (unbind, then bind: one published
        // in between is returned to the consumer, which gives it back and tries again).
        if slot.is_tier() {
            binds_after.extend(binds);
        } else {
            binds_first.extend(binds);
        }
        unbinds.extend(unbind_all(live, slot.name()));
    }
    for feeder in feeders {
        unbinds.extend(unbind_all(live, feeder));
    }
    [declares, binds_first, unbinds, binds_after].concat()
}

/// Stage 2: the old queues drained into their holding queues, then deleted (tiers first:
/// they return messages to the work queue).
fn drain_old(
    desired: &DesiredState,
    slots: &[Slot<'_>],
    feeders: &[String],
    target: QueueType,
) -> Vec<MigrationStep> {
    let old_tiers: Vec<String> = slots
        .iter()
        .filter(|s| s.is_tier() && s.old(target))
        .map(|s| s.name().to_string())
        .chain(feeders.iter().cloned())
        .collect();
    let mut steps = Vec::new();
    for slot in slots.iter().filter(|s| !s.is_tier() && s.old(target)) {
        let feeders = if slot.name() == desired.names.queue {
            old_tiers.clone()
        } else {
            Vec::new()
        };
        steps.push(MigrationStep::Drain {
            from: slot.name().to_string(),
            into: slot.holding.clone(),
            feeders,
        });
    }
    if !old_tiers.is_empty() {
        steps.push(MigrationStep::DeleteDrained { queues: old_tiers });
    }
    let old: Vec<String> = slots
        .iter()
        .filter(|s| !s.is_tier() && s.old(target))
        .map(|s| s.name().to_string())
        .collect();
    if !old.is_empty() {
        steps.push(MigrationStep::DeleteDrained { queues: old });
    }
    steps
}

/// A slot whose new queue is not yet declared, not yet routed, or whose holding queue is
/// still routed.
fn needs_replacing(live: &LiveVhost, slot: &Slot<'_>) -> bool {
    slot.live_holding.is_some()
        && (slot.live.is_none()
            || live.bindings.keys().any(|b| b.destination == slot.holding)
            || slot
                .routes_to(slot.name())
                .any(|b| !live.has_binding(&b.source, &b.destination, &b.routing_key)))
}

/// Stage 3: policies of the new type, the new queues, their routes back from the holding queues.
fn replace(
    desired: &DesiredState,
    live: &LiveVhost,
    slots: &[Slot<'_>],
    target: QueueType,
) -> Vec<MigrationStep> {
    let mut policies = Vec::new();
    let mut declares = Vec::new();
    let mut binds_first = Vec::new();
    let mut unbinds = Vec::new();
    let mut binds_after = Vec::new();
    for slot in slots.iter().filter(|s| needs_replacing(live, s)) {
        if slot.live.is_none() {
            policies.extend(policy_for(desired, live, slot.name()));
            declares.push(MigrationStep::Broker(BrokerAction::DeclareQueue(Queue {
                arguments: slot.desired.arguments.for_server(live.server_major),
                queue_type: target,
                ..slot.desired.clone()
            })));
        }
        let binds = bind_missing(live, slot.routes_to(slot.name()));
        if slot.is_tier() {
            binds_after.extend(binds);
        } else {
            binds_first.extend(binds);
        }
        unbinds.extend(unbind_all(live, &slot.holding));
    }
    [policies, declares, binds_first, unbinds, binds_after].concat()
}

/// The pipeline's policy for `queue`, when the broker's differs: written before the queue of
/// the new type is declared (a policy of the other type would strip the live queue's settings).
fn policy_for(desired: &DesiredState, live: &LiveVhost, queue: &str) -> Option<MigrationStep> {
    let name = format!("{POLICY_PREFIX}{queue}");
    let policy = desired.topology.policies.iter().find(|p| p.name == name)?;
    let definition = policy_definition(&policy.definition, live.server_major);
    let current = live.policies.get(&name);
    if current.is_some_and(|p| p.definition == definition && p.pattern == policy.pattern) {
        return None;
    }
    Some(MigrationStep::Broker(BrokerAction::PutPolicy {
        policy: policy.clone(),
        definition,
        exists: current.is_some(),
    }))
}

/// Stage 4: the holding queues moved back into the new queues, then deleted (holding tiers
/// first: they dead-letter into the work queue's holding queue).
fn return_held(desired: &DesiredState, slots: &[Slot<'_>]) -> Vec<MigrationStep> {
    let holding_tiers: Vec<String> = slots
        .iter()
        .filter(|s| s.is_tier() && s.live_holding.is_some())
        .map(|s| s.holding.clone())
        .collect();
    let mut steps = Vec::new();
    for slot in slots
        .iter()
        .filter(|s| !s.is_tier() && s.live_holding.is_some())
    {
        let feeders = if slot.name() == desired.names.queue {
            holding_tiers.clone()
        } else {
            Vec::new()
        };
        steps.push(MigrationStep::Drain {
            from: slot.holding.clone(),
            into: slot.name().to_string(),
            feeders,
        });
    }
    if !holding_tiers.is_empty() {
        steps.push(MigrationStep::DeleteDrained {
            queues: holding_tiers,
        });
    }
    let holding: Vec<String> = slots
        .iter()
        .filter(|s| !s.is_tier() && s.live_holding.is_some())
        .map(|s| s.holding.clone())
        .collect();
    if !holding.is_empty() {
        steps.push(MigrationStep::DeleteDrained { queues: holding });
    }
    steps
}

pub mod type_policies;

#[cfg(test)]
mod tests;
