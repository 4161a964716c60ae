//! A broker held in memory: [`BrokerApi`] over [`LiveVhost`] values, for testing the
//! reconcilers (ordering, isolation, status) without RabbitMQ. It answers the way RabbitMQ
//! does where the reconcilers can tell: a declare of an existing object with other
//! properties is refused, a bind needs both ends, a delete-if-empty keeps a queue holding
//! messages, an unknown vhost is `VhostNotFound`.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{Map, Value};

use super::live::{LiveBinding, LiveExchange, LivePolicy, LiveQueue, MIGRATION_MARKER};
use super::migrate::{DrainProgress, MigrationBroker};
use super::migration::NodeRoom;
use super::{ActionOutcome, BrokerAction, BrokerApi, BrokerError, LiveVhost, QueueDepth};

/// The size the memory broker gives each message, for [`MigrationBroker::room`].
pub const MEMORY_MESSAGE_BYTES: u64 = 1_000;

/// Called with (vhost, action) after each write the broker carried out.
type WriteHook = Box<dyn Fn(&str, &BrokerAction) + Send + Sync>;

/// An in-memory RabbitMQ: vhosts of exchanges, queues, bindings and policies.
///
/// ```
/// use msgpipe::broker::MemoryBroker;
/// let broker = MemoryBroker::new("memory://a").with_vhost("/", 4);
/// assert!(broker.vhost("/").is_some_and(|v| v.queues.is_empty()));
/// ```
pub struct MemoryBroker {
    name: String,
    vhosts: Mutex<BTreeMap<String, LiveVhost>>,
    /// Each queue's declare arguments, by (vhost, queue): a snapshot keeps only what msgpipe
    /// reads back, and a redeclare must still be checked against all of them.
    arguments: Mutex<BTreeMap<(String, String), Map<String, Value>>>,
    unreachable: Mutex<Option<String>>,
    /// What [`MigrationBroker::room`] reports (one roomy node unless set).
    nodes: Mutex<Vec<NodeRoom>>,
    on_write: Mutex<Option<WriteHook>>,
    writes: Mutex<Vec<String>>,
}

impl MemoryBroker {
    /// An empty broker; `name` stands for its address in error messages.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            vhosts: Mutex::new(BTreeMap::new()),
            arguments: Mutex::new(BTreeMap::new()),
            unreachable: Mutex::new(None),
            nodes: Mutex::new(vec![NodeRoom {
                node: "memory@localhost".into(),
                memory_alarm: false,
                disk_alarm: false,
                disk_free: 100_000_000_000,
                disk_free_limit: 50_000_000,
            }]),
            on_write: Mutex::new(None),
            writes: Mutex::new(Vec::new()),
        }
    }

    /// Adds an empty vhost on a server of major version `server_major`.
    pub fn with_vhost(self, vhost: &str, server_major: u32) -> Self {
        lock(&self.vhosts).insert(
            vhost.into(),
            LiveVhost {
                server_major,
                ..LiveVhost::default()
            },
        );
        self
    }

    /// What the nodes report from now on (alarms, free disk).
    pub fn set_nodes(&self, nodes: Vec<NodeRoom>) {
        *lock(&self.nodes) = nodes;
    }

    /// From now on every call fails as unreachable with `reason` (None: reachable again).
    pub fn set_unreachable(&self, reason: Option<&str>) {
        *lock(&self.unreachable) = reason.map(str::to_string);
    }

    /// Calls `hook` after each write, e.g. to interleave broker writes with other calls in
    /// one journal.
    pub fn on_write(&self, hook: impl Fn(&str, &BrokerAction) + Send + Sync + 'static) {
        *lock(&self.on_write) = Some(Box::new(hook));
    }

    /// Every write so far, as `apply --dry-run` words it.
    pub fn writes(&self) -> Vec<String> {
        lock(&self.writes).clone()
    }

    /// The current state of `vhost`.
    /// Adds `vhost` (RabbitMQ 4) unless it exists; true when it was added.
    pub fn create_vhost(&self, vhost: &str) -> bool {
        let mut vhosts = lock(&self.vhosts);
        if vhosts.contains_key(vhost) {
            return false;
        }
        vhosts.insert(
            vhost.into(),
            LiveVhost {
                server_major: 4,
                ..LiveVhost::default()
            },
        );
        true
    }

    pub fn vhost(&self, vhost: &str) -> Option<LiveVhost> {
        lock(&self.vhosts).get(vhost).cloned()
    }

    /// Sets a queue's ready messages (as if published); false if there is no such queue.
    pub fn set_messages(&self, vhost: &str, queue: &str, messages: u64) -> bool {
        let mut vhosts = lock(&self.vhosts);
        match vhosts.get_mut(vhost).and_then(|v| v.queues.get_mut(queue)) {
            Some(found) => {
                found.messages = messages;
                true
            }
            None => false,
        }
    }

    fn reachable(&self) -> Result<(), BrokerError> {
        match lock(&self.unreachable).as_ref() {
            Some(reason) => Err(BrokerError::Unreachable {
                endpoint: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn rejected(&self, operation: String, reason: &str) -> BrokerError {
        BrokerError::Rejected {
            endpoint: self.name.clone(),
            operation,
            reason: reason.into(),
        }
    }

    fn with_vhost_mut<T>(
        &self,
        vhost: &str,
        f: impl FnOnce(&mut LiveVhost) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        self.reachable()?;
        let mut vhosts = lock(&self.vhosts);
        let live = vhosts
            .get_mut(vhost)
            .ok_or_else(|| BrokerError::VhostNotFound {
                endpoint: self.name.clone(),
                vhost: vhost.into(),
            })?;
        f(live)
    }

    fn apply(
        &self,
        vhost: &str,
        live: &mut LiveVhost,
        action: &BrokerAction,
    ) -> Result<ActionOutcome, BrokerError> {
        match action {
            BrokerAction::PutPolicy {
                policy, definition, ..
            } => {
                live.policies.insert(
                    policy.name.clone(),
                    LivePolicy {
                        pattern: policy.pattern.clone(),
                        apply_to: policy.apply_to.clone(),
                        priority: i64::from(policy.priority),
                        definition: definition.clone(),
                    },
                );
            }
            BrokerAction::DeclareExchange(exchange) => {
                let wanted = LiveExchange {
                    kind: exchange.kind.as_str().into(),
                    durable: exchange.durable,
                };
                match live.exchanges.get(&exchange.name) {
                    Some(found) if *found != wanted => {
                        return Err(self.rejected(
                            format!("declare exchange {}", exchange.name),
                            "PRECONDITION_FAILED - inequivalent arg 'type'",
                        ));
                    }
                    Some(_) => {}
                    None => {
                        live.exchanges.insert(exchange.name.clone(), wanted);
                    }
                }
            }
            BrokerAction::DeclareQueue(queue) => {
                let mut arguments = queue.arguments.declare_arguments();
                arguments.insert("x-queue-type".into(), queue.queue_type.as_str().into());
                if let Some(target) = queue.migrating_to {
                    arguments.insert(MIGRATION_MARKER.into(), target.as_str().into());
                }
                let key = (vhost.to_string(), queue.name.clone());
                let mut declared = lock(&self.arguments);
                match live.queues.get(&queue.name) {
                    // RabbitMQ refuses a redeclare whose type, durability or arguments differ.
                    Some(found)
                        if found.queue_type != queue.queue_type.as_str()
                            || found.durable != queue.durable
                            || declared.get(&key) != Some(&arguments) =>
                    {
                        return Err(self.rejected(
                            format!("declare queue {}", queue.name),
                            "PRECONDITION_FAILED - inequivalent arg",
                        ));
                    }
                    Some(_) => {}
                    None => {
                        live.queues.insert(
                            queue.name.clone(),
                            LiveQueue {
                                queue_type: queue.queue_type.as_str().into(),
                                durable: queue.durable,
                                messages: 0,
                                consumers: 0,
                                dead_letters_to: LiveQueue::dead_letters_to(&arguments),
                                migrating_to: LiveQueue::migrating_to(&arguments),
                                declared: LiveQueue::declared_settings(&arguments),
                            },
                        );
                        declared.insert(key, arguments);
                    }
                }
            }
            BrokerAction::Bind(binding) => {
                if !live.exchanges.contains_key(&binding.source)
                    || !live.queues.contains_key(&binding.destination)
                {
                    return Err(self.rejected(
                        format!("bind {} -> {}", binding.source, binding.destination),
                        "NOT_FOUND - no exchange or queue",
                    ));
                }
                // As on RabbitMQ, where msgpipe's binds carry its marker argument.
                live.bindings.insert(live_binding(binding), true);
            }
            BrokerAction::Unbind(binding) => {
                live.bindings.remove(&live_binding(binding));
            }
            BrokerAction::DeleteQueueIfEmpty { queue, policy } => {
                let Some(found) = live.queues.get(queue) else {
                    return Ok(ActionOutcome::Gone);
                };
                if found.messages > 0 || found.consumers > 0 {
                    return Ok(ActionOutcome::Kept(QueueDepth {
                        messages: found.messages,
                        consumers: found.consumers,
                    }));
                }
                live.queues.remove(queue);
                lock(&self.arguments).remove(&(vhost.to_string(), queue.clone()));
                live.bindings.retain(|b, _| &b.destination != queue);
                if let Some(policy) = policy {
                    live.policies.remove(policy);
                }
            }
            BrokerAction::DeleteExchange { exchange } => {
                live.exchanges.remove(exchange);
                live.bindings.retain(|b, _| &b.source != exchange);
            }
            // Nothing is written; the plan reports why.
            BrokerAction::Keep { .. } => {}
        }
        Ok(ActionOutcome::Done)
    }
}

fn live_binding(binding: &crate::plan::topology::Binding) -> LiveBinding {
    LiveBinding {
        source: binding.source.clone(),
        destination: binding.destination.clone(),
        routing_key: binding.routing_key.clone(),
    }
}

/// A poisoned lock only means a test panicked while holding it; the data is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryBroker {
    /// A broker holding `live` as its vhost `vhost`: to play a plan through without touching
    /// the real one (`msgpipe migrate --dry-run`).
    pub fn from_live(name: &str, vhost: &str, live: LiveVhost) -> Self {
        let broker = Self::new(name);
        lock(&broker.vhosts).insert(vhost.into(), live);
        broker
    }
}

impl MigrationBroker for MemoryBroker {
    async fn drain(
        &self,
        vhost: &str,
        from: &str,
        into: &str,
        feeders: &[String],
        progress: &mut (dyn FnMut(DrainProgress) + Send),
    ) -> Result<u64, BrokerError> {
        let moved = self.with_vhost_mut(vhost, |live| {
            if !live.queues.contains_key(into) {
                return Err(self.rejected(
                    format!("move {from} into {into}"),
                    "the copy was returned: no such queue",
                ));
            }
            // A feeder (a retry tier) returns its messages to `from`, where they are moved too.
            let mut moved = 0;
            for queue in feeders.iter().map(String::as_str).chain([from]) {
                if let Some(found) = live.queues.get_mut(queue) {
                    moved += std::mem::take(&mut found.messages);
                }
            }
            if let Some(target) = live.queues.get_mut(into) {
                target.messages += moved;
            }
            Ok(moved)
        })?;
        lock(&self.writes).push(format!("move {moved} messages from {from} into {into}"));
        progress(DrainProgress {
            from: from.into(),
            into: into.into(),
            moved,
            remaining: 0,
        });
        Ok(moved)
    }

    async fn room(
        &self,
        vhost: &str,
        queues: &[String],
    ) -> Result<(Vec<NodeRoom>, u64), BrokerError> {
        let bytes = self.with_vhost_mut(vhost, |live| {
            Ok(queues
                .iter()
                .filter_map(|q| live.queues.get(q))
                .map(|q| q.messages * MEMORY_MESSAGE_BYTES)
                .sum())
        })?;
        Ok((lock(&self.nodes).clone(), bytes))
    }

    async fn delete_drained(&self, vhost: &str, queue: &str) -> Result<ActionOutcome, BrokerError> {
        let outcome = self.with_vhost_mut(vhost, |live| {
            let Some(found) = live.queues.get(queue) else {
                return Ok(ActionOutcome::Gone);
            };
            if found.messages > 0 {
                return Ok(ActionOutcome::Kept(QueueDepth {
                    messages: found.messages,
                    consumers: found.consumers,
                }));
            }
            live.queues.remove(queue);
            live.bindings.retain(|b, _| b.destination != queue);
            lock(&self.arguments).remove(&(vhost.to_string(), queue.to_string()));
            Ok(ActionOutcome::Done)
        })?;
        if outcome == ActionOutcome::Done {
            lock(&self.writes).push(format!("delete queue {queue}"));
        }
        Ok(outcome)
    }
}

impl BrokerApi for MemoryBroker {
    async fn snapshot(&self, vhost: &str) -> Result<LiveVhost, BrokerError> {
        self.with_vhost_mut(vhost, |live| Ok(live.clone()))
    }

    async fn execute(
        &self,
        vhost: &str,
        action: &BrokerAction,
    ) -> Result<ActionOutcome, BrokerError> {
        let outcome = self.with_vhost_mut(vhost, |live| self.apply(vhost, live, action))?;
        if outcome == ActionOutcome::Done {
            lock(&self.writes).push(action.to_string());
            if let Some(hook) = lock(&self.on_write).as_ref() {
                hook(vhost, action);
            }
        }
        Ok(outcome)
    }

    async fn queue_depth(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<Option<QueueDepth>, BrokerError> {
        self.with_vhost_mut(vhost, |live| {
            Ok(live.queues.get(queue).map(|q| QueueDepth {
                messages: q.messages,
                consumers: q.consumers,
            }))
        })
    }

    async fn delete_exchange(&self, vhost: &str, exchange: &str) -> Result<(), BrokerError> {
        self.with_vhost_mut(vhost, |live| {
            live.exchanges.remove(exchange);
            live.bindings.retain(|b, _| b.source != exchange);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::load::parse_pipelines;
    use crate::broker::{diff, reconcile, teardown};
    use crate::plan::plan;

    fn notes() -> crate::plan::DesiredState {
        let p = parse_pipelines(include_str!("../../examples/notes-pipeline.yaml"))
            .expect("parses")
            .remove(0);
        plan(&p, None).expect("plans")
    }

    #[tokio::test]
    async fn a_converged_memory_vhost_plans_no_further_action() {
        let desired = notes();
        let broker = MemoryBroker::new("memory://a").with_vhost(&desired.topology.vhost, 4);
        let live = broker
            .snapshot(&desired.topology.vhost)
            .await
            .expect("vhost");
        let report = reconcile(&broker, &desired, &live)
            .await
            .expect("converges");
        assert!(report.wrote());
        let after = broker
            .snapshot(&desired.topology.vhost)
            .await
            .expect("vhost");
        assert_eq!(diff::converge(&desired, &after).actions, vec![]);
        assert_eq!(after.queues.len(), desired.topology.queues.len());
    }

    #[tokio::test]
    async fn teardown_keeps_a_queue_holding_messages() {
        let desired = notes();
        let vhost = desired.topology.vhost.clone();
        let broker = MemoryBroker::new("memory://a").with_vhost(&vhost, 4);
        let live = broker.snapshot(&vhost).await.expect("vhost");
        reconcile(&broker, &desired, &live)
            .await
            .expect("converges");
        assert!(broker.set_messages(&vhost, &desired.names.dead_letter_queue, 1));
        let live = broker.snapshot(&vhost).await.expect("vhost");
        let report = teardown(&broker, &desired, &live).await.expect("teardown");
        assert!(report.changes.iter().any(|c| c.verb == "kept"));
        let left: Vec<String> = broker
            .vhost(&vhost)
            .expect("vhost")
            .queues
            .into_keys()
            .collect();
        assert_eq!(left, std::slice::from_ref(&desired.names.dead_letter_queue));
    }

    #[tokio::test]
    async fn an_unreachable_memory_broker_fails_every_call() {
        let broker = MemoryBroker::new("memory://a").with_vhost("/", 4);
        broker.set_unreachable(Some("connection refused"));
        let error = broker.snapshot("/").await.expect_err("unreachable");
        assert_eq!(
            error.condition_reason(),
            crate::api::Reason::BrokerUnreachable
        );
    }
}
