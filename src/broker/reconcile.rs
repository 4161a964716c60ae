//! Carrying out a pipeline's broker plan: converge, or tear down on deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures_util::future::join_all;
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
///
/// `live` is let go of once the plan is made, before the first write: a snapshot of a large
/// vhost is megabytes, and a pass may wait long on its policy writes.
pub async fn reconcile_policies_first<B: BrokerApi>(
    broker: &B,
    desired: &DesiredState,
    live: impl std::ops::Deref<Target = LiveVhost>,
    go_on: impl FnOnce(&[Change]) -> bool,
) -> Result<BrokerReport, Failed> {
    let plan = PhasedPlan::new(desired, &live);
    drop(live);
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
pub struct PhasedPlan {
    vhost: String,
    plan: diff::BrokerPlan,
    /// Index of the first action that is not a policy write.
    split: usize,
    counts: LiveCounts,
}

impl PhasedPlan {
    pub fn new(desired: &DesiredState, live: &LiveVhost) -> Self {
        let plan = diff::converge(desired, live);
        let split = plan
            .actions
            .iter()
            .position(|a| !matches!(a, BrokerAction::PutPolicy { .. }))
            .unwrap_or(plan.actions.len());
        Self {
            vhost: desired.topology.vhost.clone(),
            plan,
            split,
            counts: counts(desired, live),
        }
    }

    fn rest(&self) -> &[BrokerAction] {
        &self.plan.actions[self.split..]
    }

    /// Writes the plan's policies, adding them to `changes`.
    pub async fn put_policies<B: BrokerApi>(
        &self,
        broker: &B,
        changes: &mut Vec<Change>,
    ) -> Result<(), Failed> {
        let policies = &self.plan.actions[..self.split];
        execute_all(broker, &self.vhost, policies, changes).await
    }

    /// Runs the rest, after the policy `changes` already made.
    pub async fn finish<B: BrokerApi>(
        self,
        broker: &B,
        mut changes: Vec<Change>,
    ) -> Result<BrokerReport, Failed> {
        execute_all(broker, &self.vhost, self.rest(), &mut changes).await?;
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

/// How many actions of one run (see [`run_together`]) are in flight at once.
const ACTIONS_IN_FLIGHT: usize = 8;

/// Whether `next` may run at the same time as `first`: consecutive actions of one kind that
/// do not depend on each other (declares of exchanges or of queues, binds, unbinds, policy
/// writes). The order between kinds stays (a queue is declared before it is bound, old routes
/// are unbound before new ones are bound), and deletes run one at a time, each re-checking
/// its queue.
fn run_together(first: &BrokerAction, next: &BrokerAction) -> bool {
    use BrokerAction::{Bind, DeclareExchange, DeclareQueue, PutPolicy, Unbind};
    std::mem::discriminant(first) == std::mem::discriminant(next)
        && matches!(
            first,
            DeclareExchange(_) | DeclareQueue(_) | Bind(_) | Unbind(_) | PutPolicy { .. }
        )
}

/// Executes actions in order, adding to `changes`: each run of actions that may go together
/// ([`run_together`]) at once, the runs one after another. Stops after the first run with an
/// error, with what was done so far (the run's other actions included).
async fn execute_all<B: BrokerApi>(
    broker: &B,
    vhost: &str,
    actions: &[BrokerAction],
    changes: &mut Vec<Change>,
) -> Result<(), Failed> {
    let mut rest = actions;
    while let Some(first) = rest.first() {
        let length = rest.iter().take_while(|a| run_together(first, a)).count();
        let (run, after) = rest.split_at(length.max(1));
        rest = after;
        let mut first_error = None;
        for batch in run.chunks(ACTIONS_IN_FLIGHT) {
            // Collected first: a lazy iterator of borrowing futures would not be `Send`
            // for the controller's spawned reconciles.
            let calls: Vec<_> = batch
                .iter()
                .map(|action| execute_one(broker, vhost, action))
                .collect();
            for (action, outcome) in batch.iter().zip(join_all(calls).await) {
                match outcome {
                    Ok(outcome) => changes.extend(change_of(action, outcome)),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
        }
        if let Some(error) = first_error {
            return Err(Failed {
                error,
                applied: std::mem::take(changes),
            });
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
///
/// A state whose vhost `live` lacks fails with [`BrokerError::VhostNotFound`].
pub async fn reconcile_many<'a, B: BrokerApi, L: std::borrow::Borrow<LiveVhost>>(
    broker: &B,
    states: &'a [DesiredState],
    live: &BTreeMap<String, L>,
    concurrency: usize,
) -> Vec<(&'a DesiredState, Result<BrokerReport, Failed>)> {
    let (plans, unread): (Vec<_>, Vec<_>) = states
        .iter()
        .map(|state| match live.get(&state.topology.vhost) {
            Some(vhost) => Ok((state, PhasedPlan::new(state, vhost.borrow()))),
            None => Err(state),
        })
        .partition(Result::is_ok);
    let plans: Vec<(&'a DesiredState, PhasedPlan)> = plans.into_iter().flatten().collect();
    let mut results: Vec<_> = unread
        .into_iter()
        .filter_map(Result::err)
        .map(|state| {
            let error = BrokerError::VhostNotFound {
                endpoint: String::new(),
                vhost: state.topology.vhost.clone(),
            };
            (
                state,
                Err(Failed {
                    error,
                    applied: vec![],
                }),
            )
        })
        .collect();
    // The futures are made first, then run `concurrency` at a time: a stream mapping
    // borrowed plans to futures lazily is not `Send` for a spawned batch runner.
    let policy_calls: Vec<_> = plans
        .iter()
        .map(|(_, plan)| async move {
            let mut changes = Vec::new();
            plan.put_policies(broker, &mut changes)
                .await
                .map(|()| changes)
        })
        .collect();
    let policies: Vec<Result<Vec<Change>, Failed>> = stream::iter(policy_calls)
        .buffered(concurrency)
        .collect()
        .await;
    let rest_calls: Vec<_> = plans
        .into_iter()
        .zip(policies)
        .map(|((desired, plan), policies)| async move {
            match policies {
                Ok(changes) => (desired, plan.finish(broker, changes).await),
                Err(failed) => (desired, Err(failed)),
            }
        })
        .collect();
    let done = stream::iter(rest_calls)
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    results.extend(done);
    results
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::api::load::parse_pipelines;
    use crate::broker::MemoryBroker;
    use crate::plan::plan;

    /// A memory broker whose writes take 10 ms each: records the most writes of each kind in
    /// flight at once and the order they finished in, and refuses one queue's declare.
    struct Slow {
        inner: MemoryBroker,
        /// Kinds of the writes in flight.
        in_flight: Mutex<Vec<String>>,
        most: Mutex<BTreeMap<String, usize>>,
        /// Whether a write ever started while one of another kind was in flight.
        mixed: AtomicBool,
        refuse: Option<String>,
    }

    impl Slow {
        fn new(vhost: &str, refuse: Option<String>) -> Self {
            Self {
                inner: MemoryBroker::new("memory://slow").with_vhost(vhost, 4),
                in_flight: Mutex::new(Vec::new()),
                most: Mutex::new(BTreeMap::new()),
                mixed: AtomicBool::new(false),
                refuse,
            }
        }

        fn most(&self, kind: &str) -> usize {
            self.most.lock().expect("most")[kind]
        }
    }

    fn kind(action: &BrokerAction) -> String {
        let verb = match action {
            BrokerAction::Unbind(_) => "unbind",
            BrokerAction::DeleteQueueIfEmpty { .. } => "delete",
            _ => "put",
        };
        format!("{verb} {}", action.object_kind())
    }

    impl BrokerApi for Slow {
        async fn snapshot(&self, vhost: &str) -> Result<LiveVhost, BrokerError> {
            self.inner.snapshot(vhost).await
        }

        async fn execute(
            &self,
            vhost: &str,
            action: &BrokerAction,
        ) -> Result<ActionOutcome, BrokerError> {
            let kind = kind(action);
            {
                let mut in_flight = self.in_flight.lock().expect("in flight");
                if in_flight.iter().any(|k| *k != kind) {
                    self.mixed.store(true, Ordering::SeqCst);
                }
                in_flight.push(kind.clone());
                let mut most = self.most.lock().expect("most");
                let seen = most.entry(kind.clone()).or_default();
                *seen = (*seen).max(in_flight.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            {
                let mut in_flight = self.in_flight.lock().expect("in flight");
                if let Some(at) = in_flight.iter().position(|k| *k == kind) {
                    in_flight.remove(at);
                }
            }
            if let BrokerAction::DeclareQueue(queue) = action
                && Some(&queue.name) == self.refuse.as_ref()
            {
                return Err(BrokerError::Rejected {
                    endpoint: "memory://slow".into(),
                    operation: format!("create queue {}", queue.name),
                    reason: "refused by the test".into(),
                });
            }
            self.inner.execute(vhost, action).await
        }

        async fn queue_depth(
            &self,
            vhost: &str,
            queue: &str,
        ) -> Result<Option<QueueDepth>, BrokerError> {
            self.inner.queue_depth(vhost, queue).await
        }

        async fn delete_exchange(&self, vhost: &str, exchange: &str) -> Result<(), BrokerError> {
            self.inner.delete_exchange(vhost, exchange).await
        }
    }

    fn notes() -> DesiredState {
        let p = parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
            .expect("parses")
            .remove(0);
        plan(&p, None).expect("plans")
    }

    #[tokio::test(start_paused = true)]
    async fn independent_writes_of_one_kind_overlap_and_kinds_keep_their_order() {
        let desired = notes();
        let vhost = desired.topology.vhost.clone();
        let broker = Slow::new(&vhost, None);
        let live = broker.snapshot(&vhost).await.expect("vhost");
        let report = reconcile(&broker, &desired, &live)
            .await
            .expect("converges");
        let queues = desired.topology.queues.len();
        assert!(queues >= 4, "the example has tiers: {queues} queues");
        // Every queue of the pipeline declared at once, every binding bound at once...
        assert_eq!(broker.most("put queue"), queues.min(ACTIONS_IN_FLIGHT));
        assert_eq!(
            broker.most("put binding"),
            desired.topology.bindings.len().min(ACTIONS_IN_FLIGHT)
        );
        // ...and never two kinds at once: each write found only its own kind in flight.
        assert!(!broker.mixed.load(Ordering::SeqCst));
        let verbs: Vec<&str> = report.changes.iter().map(|c| c.kind).collect();
        let first_binding = verbs.iter().position(|k| *k == "binding");
        let last_queue = verbs.iter().rposition(|k| *k == "queue");
        assert!(last_queue < first_binding, "{verbs:?}");
        let after = broker.snapshot(&vhost).await.expect("vhost");
        assert_eq!(diff::converge(&desired, &after).actions, vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_declare_stops_the_pass_before_the_next_kind() {
        let desired = notes();
        let vhost = desired.topology.vhost.clone();
        let refused = desired.names.dead_letter_queue.clone();
        let broker = Slow::new(&vhost, Some(refused.clone()));
        let live = broker.snapshot(&vhost).await.expect("vhost");
        let failed = reconcile(&broker, &desired, &live)
            .await
            .expect_err("the DLQ is refused");
        assert!(
            failed.error.to_string().contains(&refused),
            "{}",
            failed.error
        );
        let after = broker.snapshot(&vhost).await.expect("vhost");
        // The other queues of the run were declared and are reported; nothing was bound.
        assert_eq!(after.queues.len(), desired.topology.queues.len() - 1);
        assert!(!after.queues.contains_key(&refused));
        assert!(after.bindings.is_empty(), "{:?}", after.bindings);
        let declared = failed.applied.iter().filter(|c| c.kind == "queue").count();
        assert_eq!(declared, desired.topology.queues.len() - 1);
    }
}
