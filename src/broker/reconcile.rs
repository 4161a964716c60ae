//! Carrying out a pipeline's broker plan: converge, or tear down on deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures_util::{StreamExt, stream};

use super::diff::{self, BrokerAction, Conflict};
use super::live::LiveVhost;
use super::{ActionOutcome, BrokerApi, BrokerError, QueueDepth};
use crate::plan::DesiredState;
use crate::plan::topology::Binding;

/// One thing that changed (or was deliberately left) on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// created, updated, bound, unbound, deleted, kept
    pub verb: &'static str,
    /// exchange, queue, binding, policy
    pub kind: &'static str,
    pub name: String,
    pub detail: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == "binding" {
            write!(f, "{} {}", self.verb, self.name)?;
        } else {
            write!(f, "{} {} {}", self.verb, self.kind, self.name)?;
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// Live message counts of a pipeline's queues (management stats; they lag a few seconds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    pub queue_messages: Option<u64>,
    pub consumers: Option<u64>,
    pub dead_letter_messages: Option<u64>,
    /// (queue, messages) per retry tier, in tier order.
    pub retry_queues: Vec<(String, u64)>,
}

/// The result of reconciling one pipeline on its broker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerReport {
    pub changes: Vec<Change>,
    /// Differences refused (reason ImmutableFieldChanged).
    pub conflicts: Vec<Conflict>,
    pub warnings: Vec<String>,
    /// Counts as read before the changes.
    pub counts: LiveCounts,
    /// Actions left for a later pass because the caller held them back after the policies
    /// (see [`reconcile_policies_first`]); 0 when the pipeline is converged.
    pub deferred: usize,
}

impl BrokerReport {
    /// Whether anything was written.
    pub fn wrote(&self) -> bool {
        self.changes.iter().any(|c| c.verb != "kept")
    }
}

/// A reconcile that stopped at an error, with what it had already changed.
#[derive(Debug)]
pub struct Failed {
    pub error: BrokerError,
    pub applied: Vec<Change>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Makes the broker match `desired`, given a snapshot `live` of its vhost.
pub async fn reconcile<B: BrokerApi>(
    broker: &B,
    desired: &DesiredState,
    live: &LiveVhost,
) -> Result<BrokerReport, Failed> {
    reconcile_policies_first(broker, desired, live, |_| true).await
}

/// Like [`reconcile`], but once the pipeline's policies are written, asks `go_on` (given
/// the policy changes; asked whenever the pass wrote a policy or has more to do) whether
/// the rest — declares, bindings, retirements — runs now. If not, the report lists the
/// policy changes and counts the rest in `deferred`.
///
/// Why: RabbitMQ 3.x re-matches every policy of the vhost against every queue and exchange
/// on each policy write, so when many pipelines are created at once, policies written while
/// other pipelines' queues are being declared grow ever slower (docs/broker.md). Holding
/// the declares back until the burst of policy writes is over keeps each write cheap.
pub async fn reconcile_policies_first<B: BrokerApi>(
    broker: &B,
    desired: &DesiredState,
    live: &LiveVhost,
    go_on: impl FnOnce(&[Change]) -> bool,
) -> Result<BrokerReport, Failed> {
    let plan = PhasedPlan::new(desired, live);
    let mut changes = Vec::new();
    plan.put_policies(broker, &mut changes).await?;
    // A converged pipeline has nothing to ask about; a policy-only pass asks (the caller
    // may count its writes) but has nothing to hold back.
    let rest = plan.rest().len();
    let go = (changes.is_empty() && rest == 0) || go_on(&changes);
    if go || rest == 0 {
        plan.finish(broker, changes).await
    } else {
        Ok(plan.report(changes, rest))
    }
}

/// A pipeline's plan with its leading policy writes told apart from the rest, so the two
/// parts can run at different times from one snapshot (the rest never depends on the
/// policies being read back).
struct PhasedPlan<'a> {
    desired: &'a DesiredState,
    plan: diff::BrokerPlan,
    /// Index of the first action that is not a policy write.
    split: usize,
    counts: LiveCounts,
}

impl<'a> PhasedPlan<'a> {
    fn new(desired: &'a DesiredState, live: &LiveVhost) -> Self {
        let plan = diff::converge(desired, live);
        let split = plan
            .actions
            .iter()
            .position(|a| !matches!(a, BrokerAction::PutPolicy { .. }))
            .unwrap_or(plan.actions.len());
        Self {
            desired,
            plan,
            split,
            counts: counts(desired, live),
        }
    }

    fn rest(&self) -> &[BrokerAction] {
        &self.plan.actions[self.split..]
    }

    async fn put_policies<B: BrokerApi>(
        &self,
        broker: &B,
        changes: &mut Vec<Change>,
    ) -> Result<(), Failed> {
        let policies = &self.plan.actions[..self.split];
        execute_all(broker, &self.desired.topology.vhost, policies, changes).await
    }

    /// Runs the rest, after the policy `changes` already made.
    async fn finish<B: BrokerApi>(
        self,
        broker: &B,
        mut changes: Vec<Change>,
    ) -> Result<BrokerReport, Failed> {
        execute_all(
            broker,
            &self.desired.topology.vhost,
            self.rest(),
            &mut changes,
        )
        .await?;
        Ok(self.report(changes, 0))
    }

    fn report(self, changes: Vec<Change>, deferred: usize) -> BrokerReport {
        BrokerReport {
            changes,
            conflicts: self.plan.conflicts,
            warnings: self.plan.warnings,
            counts: self.counts,
            deferred,
        }
    }
}

/// Executes actions in order, adding to `changes`; stops at the first error, with what was
/// done so far.
async fn execute_all<B: BrokerApi>(
    broker: &B,
    vhost: &str,
    actions: &[BrokerAction],
    changes: &mut Vec<Change>,
) -> Result<(), Failed> {
    for action in actions {
        match execute_one(broker, vhost, action).await {
            Ok(outcome) => changes.extend(change_of(action, outcome)),
            Err(error) => {
                return Err(Failed {
                    error,
                    applied: std::mem::take(changes),
                });
            }
        }
    }
    Ok(())
}

/// One snapshot per vhost, shared by every pipeline on it.
pub async fn snapshot_vhosts<B: BrokerApi>(
    broker: &B,
    states: &[DesiredState],
) -> Result<BTreeMap<String, LiveVhost>, BrokerError> {
    let vhosts: BTreeSet<&str> = states.iter().map(|s| s.topology.vhost.as_str()).collect();
    let mut live = BTreeMap::new();
    for vhost in vhosts {
        live.insert(vhost.to_string(), broker.snapshot(vhost).await?);
    }
    Ok(live)
}

/// Reconciles every pipeline from one snapshot per vhost (`live`, from [`snapshot_vhosts`]),
/// `concurrency` at a time, in two phases: every pipeline's policies first (see
/// [`reconcile_policies_first`] for why), then the rest of each plan. Each queue still
/// finds its policy in place when it is declared.
pub async fn reconcile_many<'a, B: BrokerApi>(
    broker: &B,
    states: &'a [DesiredState],
    live: &BTreeMap<String, LiveVhost>,
    concurrency: usize,
) -> Vec<(&'a DesiredState, Result<BrokerReport, Failed>)> {
    let plans: Vec<PhasedPlan<'a>> = states
        .iter()
        .map(|state| PhasedPlan::new(state, &live[&state.topology.vhost]))
        .collect();
    let policies: Vec<Result<Vec<Change>, Failed>> = stream::iter(&plans)
        .map(|plan| async move {
            let mut changes = Vec::new();
            plan.put_policies(broker, &mut changes)
                .await
                .map(|()| changes)
        })
        .buffered(concurrency)
        .collect()
        .await;
    stream::iter(plans.into_iter().zip(policies))
        .map(|(plan, policies)| async move {
            let desired = plan.desired;
            match policies {
                Ok(changes) => (desired, plan.finish(broker, changes).await),
                Err(failed) => (desired, Err(failed)),
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Removes a pipeline's broker objects (`deletionPolicy: Delete`): runs the teardown plan
/// ([`diff::teardown`]) stage by stage, never deleting a queue that holds messages (ready or
/// unacknowledged) or has consumers, and stopping before a stage that needs a kept queue gone.
pub async fn teardown<B: BrokerApi>(
    broker: &B,
    desired: &DesiredState,
    live: &LiveVhost,
) -> Result<BrokerReport, Failed> {
    let plan = diff::teardown(desired, live);
    let vhost = &desired.topology.vhost;
    let mut changes = Vec::new();
    for stage in &plan.stages {
        let mut all_gone = true;
        for action in stage {
            let outcome = match execute_one(broker, vhost, action).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    return Err(Failed {
                        error,
                        applied: changes,
                    });
                }
            };
            all_gone &= !matches!(outcome, ActionOutcome::Kept(_));
            changes.extend(change_of(action, outcome));
        }
        if !all_gone {
            break;
        }
    }
    Ok(BrokerReport {
        changes,
        counts: counts(desired, live),
        ..BrokerReport::default()
    })
}

/// One action: `Keep` writes nothing, exchange deletes go through
/// [`BrokerApi::delete_exchange`], the rest through [`BrokerApi::execute`].
async fn execute_one<B: BrokerApi>(
    broker: &B,
    vhost: &str,
    action: &BrokerAction,
) -> Result<ActionOutcome, BrokerError> {
    match action {
        BrokerAction::Keep { .. } => Ok(ActionOutcome::Done),
        BrokerAction::DeleteExchange { exchange } => broker
            .delete_exchange(vhost, exchange)
            .await
            .map(|()| ActionOutcome::Done),
        other => broker.execute(vhost, other).await,
    }
}

fn change_of(action: &BrokerAction, outcome: ActionOutcome) -> Option<Change> {
    let (verb, name) = match (action, outcome) {
        (_, ActionOutcome::Gone) => return None,
        (BrokerAction::DeleteQueueIfEmpty { queue, .. }, ActionOutcome::Kept(depth)) => {
            return Some(Change {
                verb: "kept",
                kind: "queue",
                name: queue.clone(),
                detail: Some(kept_because(depth)),
            });
        }
        (BrokerAction::PutPolicy { policy, exists, .. }, _) => (
            if *exists { "updated" } else { "created" },
            policy.name.clone(),
        ),
        (BrokerAction::DeclareExchange(e), _) => ("created", e.name.clone()),
        (BrokerAction::DeclareQueue(q), _) => ("created", q.name.clone()),
        (BrokerAction::Bind(b), _) => ("bound", binding_name(b)),
        (BrokerAction::Unbind(b), _) => ("unbound", binding_name(b)),
        (BrokerAction::DeleteQueueIfEmpty { queue, .. }, _) => ("deleted", queue.clone()),
        (BrokerAction::DeleteExchange { exchange }, _) => ("deleted", exchange.clone()),
        (BrokerAction::Keep { name, reason, .. }, _) => {
            return Some(Change {
                verb: "kept",
                kind: action.object_kind(),
                name: name.clone(),
                detail: Some(reason.clone()),
            });
        }
    };
    Some(Change {
        verb,
        kind: action.object_kind(),
        name,
        detail: None,
    })
}

fn kept_because(depth: QueueDepth) -> String {
    match (depth.messages, depth.consumers) {
        (m, 0) => format!("holds {m} messages (ready or unacknowledged)"),
        (0, c) => format!("has {c} consumers"),
        (m, c) => format!("holds {m} messages and has {c} consumers"),
    }
}

fn binding_name(binding: &Binding) -> String {
    format!(
        "{} -> {} (key {:?})",
        binding.source, binding.destination, binding.routing_key
    )
}

/// The pipeline's queue counts from a snapshot.
pub fn counts(desired: &DesiredState, live: &LiveVhost) -> LiveCounts {
    let names = &desired.names;
    let work = live.queues.get(&names.queue);
    LiveCounts {
        queue_messages: work.map(|q| q.messages),
        consumers: work.map(|q| q.consumers),
        dead_letter_messages: live
            .queues
            .get(&names.dead_letter_queue)
            .map(|q| q.messages),
        retry_queues: desired
            .retry_tiers
            .iter()
            .map(|tier| {
                let name = names.retry_queue(tier);
                let messages = live.queues.get(&name).map_or(0, |q| q.messages);
                (name, messages)
            })
            .collect(),
    }
}
