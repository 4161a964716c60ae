//! The broker work of pipelines reconciled at the same time, run per vhost the way
//! `msgpipe apply` runs a file of pipelines: every pipeline's policies first, then the
//! declares and bindings.
//!
//! The controller reconciles each pipeline on its own, many at once. Their broker work goes
//! through one queue per (broker, vhost), worked by one runner task:
//!
//! 1. Pipelines that joined the queue are taken together: one snapshot of the vhost (its read
//!    also answers the broker's probe, so pipelines held at the gate join at once), a plan
//!    each, and all their policy writes, [`BrokerPool::concurrency`] pipelines at a time.
//! 2. Then the rest of their plans (exchanges, queues, bindings), `concurrency` pipelines at
//!    a time. Pipelines that joined meanwhile wait for the batch before them and then form
//!    the next one (step 1 again): within a batch every policy goes in before any queue, as
//!    in `msgpipe apply`. RabbitMQ matches every policy of a vhost against every queue on
//!    each policy write, so a policy written after a thousand queues exist costs far more
//!    than one written before (docs/broker.md); taking newcomers one by one between
//!    declares (an earlier version) made a burst larger than the controller's concurrency
//!    crawl, one snapshot and one policy at a time.
//!
//! A new runner first gathers: it waits while pipelines keep joining ([`GATHER_QUIET`]
//! without a newcomer ends it, [`GATHER_MAX`] at most), so a burst is one batch. A lone spec
//! change pays the quiet period once. Each pipeline gets its own report as soon as its own
//! work is done; nobody waits for a quiet period and comes back later.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::Instrument;

use super::brokers::{BrokerPool, PooledBroker};
use std::future::Future;

use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, stream};

use crate::broker::{BrokerEndpoint, BrokerError, BrokerReport, Change, Failed, PhasedPlan};
use crate::plan::DesiredState;

/// One pipeline's broker work, waiting for its batch.
pub(super) struct Job {
    desired: DesiredState,
    /// The pipeline's own last write: its snapshot must be younger.
    not_before: Option<Instant>,
    reply: oneshot::Sender<Result<BrokerReport, Failed>>,
    /// The pipeline's reconcile span: the runner's work for it logs under its name.
    span: tracing::Span,
}

/// The jobs of one (broker, vhost) not yet taken by its runner, and whether one runs.
#[derive(Default)]
pub(super) struct Queue {
    pending: Vec<Job>,
    running: bool,
}

type Key = (String, String);

/// A new runner starts once no pipeline joined its first batch for this long...
pub const GATHER_QUIET: Duration = Duration::from_millis(25);
/// ...or once it has gathered for this long: long enough for `kubectl apply` of a thousand
/// pipelines (the watch delivers them as the server creates them, a few ms apart), since a
/// pipeline left to a later batch writes its policies after the first batch's queues exist,
/// which RabbitMQ makes seconds per policy in a vhost of thousands of queues.
pub const GATHER_MAX: Duration = Duration::from_secs(5);

impl<B: PooledBroker> BrokerPool<B> {
    /// Converges `desired` on `broker` together with the other pipelines of its vhost that
    /// arrive meanwhile (see the module's text). `not_before` is the pipeline's own last write.
    pub async fn converge_in_batch(
        self: &Arc<Self>,
        endpoint: &BrokerEndpoint,
        broker: Arc<B>,
        desired: DesiredState,
        not_before: Option<Instant>,
    ) -> Result<BrokerReport, Failed> {
        let key = (endpoint.pool_key(), desired.topology.vhost.clone());
        let (reply, answer) = oneshot::channel();
        let start_runner = {
            let mut batches = self.batches_map();
            let queue = batches.entry(key.clone()).or_default();
            queue.pending.push(Job {
                desired,
                not_before,
                reply,
                span: tracing::Span::current(),
            });
            !std::mem::replace(&mut queue.running, true)
        };
        if start_runner {
            let runner = Runner {
                pool: self.clone(),
                key,
                finished: false,
            };
            tokio::spawn(runner.run(endpoint.clone(), broker));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(Failed {
                error: BrokerError::Unreachable {
                    endpoint: endpoint.to_string(),
                    reason: "the broker pass stopped before this pipeline's turn (operator shutting down)".into(),
                },
                applied: vec![],
            }),
        }
    }

    fn batches_map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Key, Queue>> {
        // Never held across an await; a poisoned lock only means a runner panicked.
        self.batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many pipelines wait for `key`'s runner, and the latest of their own last writes.
    fn waiting(&self, key: &Key) -> (usize, Option<Instant>) {
        self.batches_map().get(key).map_or((0, None), |queue| {
            let latest = queue.pending.iter().filter_map(|job| job.not_before).max();
            (queue.pending.len(), latest)
        })
    }

    /// The jobs of `key` a snapshot read after `not_before` may serve (all of them when
    /// `not_before` is None and none has written), or None (and the runner's end) when nobody
    /// waits. Jobs that wrote later stay for the next batch.
    fn take_batch(&self, key: &Key, not_before: Option<Instant>) -> Option<Vec<Job>> {
        let mut batches = self.batches_map();
        let queue = batches.get_mut(key)?;
        if queue.pending.is_empty() {
            batches.remove(key);
            return None;
        }
        let (taken, later) = std::mem::take(&mut queue.pending)
            .into_iter()
            .partition(|job| job.not_before.is_none() || job.not_before <= not_before);
        queue.pending = later;
        Some(taken)
    }

    /// Ends `key`'s runner if nobody waits (under the lock, so a newcomer either is seen
    /// here or starts a new runner).
    fn end_if_idle(&self, key: &Key) -> bool {
        let mut batches = self.batches_map();
        match batches.get(key) {
            Some(queue) if !queue.pending.is_empty() => false,
            _ => {
                batches.remove(key);
                true
            }
        }
    }

    /// Step 1 for the pipelines waiting now: one snapshot, a plan each, their policies.
    /// Those whose policies went in join `ready`; the others get their failure.
    async fn take_newcomers(
        &self,
        key: &Key,
        endpoint: &BrokerEndpoint,
        broker: &B,
        gather: bool,
        ready: &mut VecDeque<Planned>,
    ) {
        let (_, not_before) = self.waiting(key);
        let live = self.snapshot(endpoint, broker, &key.1, not_before).await;
        if gather {
            let started = Instant::now();
            let mut seen = self.waiting(key).0;
            while started.elapsed() < GATHER_MAX {
                tokio::time::sleep(GATHER_QUIET).await;
                let now = self.waiting(key).0;
                if now == seen {
                    break;
                }
                seen = now;
            }
        }
        let Some(jobs) = self.take_batch(key, not_before) else {
            return;
        };
        let live = match live {
            Ok(live) => live,
            Err(error) => {
                for job in jobs {
                    let _ = job.reply.send(Err(Failed {
                        error: error.clone(),
                        applied: vec![],
                    }));
                }
                return;
            }
        };
        let planned: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let plan = job.span.in_scope(|| PhasedPlan::new(&job.desired, &live));
                (plan, job.reply, job.span)
            })
            .collect();
        drop(live);
        // Made first, then run: a lazily mapped stream would not be `Send` for the runner.
        let calls: Vec<_> = planned
            .into_iter()
            .map(|(plan, reply, span)| {
                let kept = span.clone();
                let write = async move {
                    let mut changes = Vec::new();
                    let written = plan.put_policies(broker, &mut changes).await;
                    (plan, changes, written, reply, kept)
                };
                write.instrument(span)
            })
            .collect();
        let written: Vec<_> = stream::iter(calls)
            .buffered(self.concurrency())
            .collect()
            .await;
        for (plan, changes, result, reply, span) in written {
            match result {
                Ok(()) => ready.push_back(Planned {
                    plan,
                    changes,
                    reply,
                    span,
                }),
                Err(failed) => {
                    let _ = reply.send(Err(failed));
                }
            }
        }
    }

    /// Step 2: the rest of `planned`'s plan, under its pipeline's span; its reply and report.
    fn finish(
        broker: &B,
        planned: Planned,
    ) -> impl Future<
        Output = (
            oneshot::Sender<Result<BrokerReport, Failed>>,
            Result<BrokerReport, Failed>,
        ),
    > + Send
    + '_ {
        let Planned {
            plan,
            changes,
            reply,
            span,
        } = planned;
        async move { (reply, plan.finish(broker, changes).await) }.instrument(span)
    }
}

/// A pipeline whose policies are in, waiting for the rest of its plan.
struct Planned {
    plan: PhasedPlan,
    changes: Vec<Change>,
    reply: oneshot::Sender<Result<BrokerReport, Failed>>,
    span: tracing::Span,
}

/// Works through one (broker, vhost)'s batches until nobody waits. Dropped (a panic, the
/// runtime shutting down), it lets the queue go: waiting pipelines get an error and retry,
/// and the next arrival starts a new runner.
struct Runner<B: PooledBroker> {
    pool: Arc<BrokerPool<B>>,
    key: Key,
    /// The queue was found empty and let go: the key may already be a new runner's.
    finished: bool,
}

impl<B: PooledBroker> Runner<B> {
    async fn run(mut self, endpoint: BrokerEndpoint, broker: Arc<B>) {
        let mut ready = VecDeque::new();
        let mut running = FuturesUnordered::new();
        let mut gather = true;
        loop {
            // Newcomers are taken once the pipelines before them are done: they form one
            // batch, policies first, however they trickled in meanwhile (a burst larger than
            // the controller's concurrency arrives one pipeline per finished reconcile).
            if running.is_empty() && ready.is_empty() && self.pool.waiting(&self.key).0 > 0 {
                self.pool
                    .take_newcomers(&self.key, &endpoint, &broker, gather, &mut ready)
                    .await;
                // Later newcomers arrive while the runner works.
                gather = false;
                continue;
            }
            while running.len() < self.pool.concurrency() {
                match ready.pop_front() {
                    Some(planned) => {
                        running.push(BrokerPool::<B>::finish(broker.as_ref(), planned));
                    }
                    None => break,
                }
            }
            match running.next().await {
                Some((reply, result)) => {
                    let _ = reply.send(result);
                }
                None if self.pool.end_if_idle(&self.key) => break,
                None => {}
            }
        }
        self.finished = true;
    }
}

impl<B: PooledBroker> Drop for Runner<B> {
    fn drop(&mut self) {
        // After a panic (or a runtime shutdown) the waiters' replies are dropped here and
        // they see an error; after a normal end the entry is already gone.
        if !self.finished {
            self.pool.batches_map().remove(&self.key);
        }
    }
}
