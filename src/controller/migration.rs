//! The operator running queue migrations (docs/migration.md): when the broker shows that a
//! pipeline's queues must move to another type (`spec.queue.type` changed), or that a
//! migration is under way (holding queues carrying `x-msgpipe-migrating-to`), reconcile
//! starts [`broker::migrate`] in a task of its own and comes back every few seconds to
//! report progress (`status.migration`, a Normal event per step, `Ready=False, Migrating`).
//!
//! One task per pipeline, owned by the [`Context`]: dropping the context (shutdown, lost
//! leadership) stops them. Nothing about a migration is kept in memory that the broker does
//! not show: a new process, or a new leader, finds the holding queues and resumes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Context;
use super::brokers::PooledBroker;
use super::status::Verdict;
use crate::api::reason::one_line;
use crate::api::{MessagePipeline, MigrationStatus, QueueType, Reason};
use crate::broker::migration::{
    MigrationRefused, plan_migration, recorded_target, room_for_copy, type_specific_policies,
};
use crate::broker::{
    self, BrokerEndpoint, LiveVhost, MigrationBroker, MigrationEvent, MigrationPhase, Mover,
};
use crate::plan::{self, DesiredState};

/// How often a pipeline whose migration runs is reconciled (progress, events).
pub const MIGRATION_POLL: Duration = Duration::from_secs(3);
/// A refused or failed migration is looked at again after this.
pub const MIGRATION_RETRY: Duration = Duration::from_secs(30);

/// What reconcile reports while a migration runs, is refused, or failed.
#[derive(Clone, Debug)]
pub struct Migrating {
    /// BrokerReady (and so Ready): False, reason Migrating, MigrationRefused or MigrationFailed.
    pub verdict: Verdict,
    pub status: MigrationStatus,
    pub requeue: Duration,
}

/// The migration tasks of this operator, one per pipeline at most.
#[derive(Default)]
pub struct Migrations {
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    task: JoinHandle<()>,
    progress: Arc<Mutex<Progress>>,
    /// The type the task migrates to last.
    target: QueueType,
    /// Steps already published as events.
    reported: usize,
    /// A later spec type already announced as waiting for this migration.
    announced: Option<QueueType>,
    started: Instant,
}

/// What the task tells reconcile.
#[derive(Default)]
struct Progress {
    status: MigrationStatus,
    /// Every step started, `[phase] step`, in order.
    steps: Vec<String>,
    /// Messages moved by the drains finished so far.
    moved_before: u64,
    /// The drain under way: (source queue, messages it moved so far).
    drain: Option<(String, u64)>,
    /// Set once the task is over: the messages moved, or why it stopped.
    done: Option<Result<u64, String>>,
}

impl Drop for Migrations {
    fn drop(&mut self) {
        for running in lock(&self.running).values() {
            running.task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Never held across an await; a poisoned lock only means a task panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What became of a pipeline's task since the last look.
enum Look {
    None,
    Running {
        status: MigrationStatus,
        new_steps: Vec<String>,
        target: QueueType,
        announce: bool,
    },
    Finished {
        result: Result<u64, String>,
        status: MigrationStatus,
        /// Steps started since the last look, not yet published.
        new_steps: Vec<String>,
        took: Duration,
    },
}

impl Migrations {
    /// Whether a migration task of this operator runs for `key`.
    pub fn is_running(&self, key: &str) -> bool {
        lock(&self.running).contains_key(key)
    }

    fn look(&self, key: &str, asked: QueueType) -> Look {
        let mut running = lock(&self.running);
        let Some(entry) = running.get_mut(key) else {
            return Look::None;
        };
        let progress = lock(&entry.progress);
        let new_steps = progress.steps[entry.reported.min(progress.steps.len())..].to_vec();
        if let Some(result) = progress.done.clone() {
            let status = progress.status.clone();
            drop(progress);
            let took = entry.started.elapsed();
            running.remove(key);
            return Look::Finished {
                result,
                status,
                new_steps,
                took,
            };
        }
        entry.reported = progress.steps.len();
        let status = progress.status.clone();
        drop(progress);
        let announce = asked != entry.target && entry.announced != Some(asked);
        if announce {
            entry.announced = Some(asked);
        }
        Look::Running {
            status,
            new_steps,
            target: entry.target,
            announce,
        }
    }

    /// Starts `targets` in turn on `broker`, unless a task already runs for `key`.
    fn start<B: MigrationBroker + 'static>(
        &self,
        key: &str,
        broker: Arc<B>,
        targets: Vec<DesiredState>,
        status: MigrationStatus,
    ) {
        let mut running = lock(&self.running);
        if running.contains_key(key) {
            return;
        }
        let target = targets.last().map_or(QueueType::Quorum, work_queue_type);
        let progress = Arc::new(Mutex::new(Progress {
            status,
            ..Progress::default()
        }));
        let task = tokio::spawn(run(broker, targets, progress.clone(), key.to_string()));
        running.insert(
            key.to_string(),
            Running {
                task,
                progress,
                target,
                reported: 0,
                announced: None,
                started: Instant::now(),
            },
        );
    }
}

fn work_queue_type(desired: &DesiredState) -> QueueType {
    desired
        .topology
        .queues
        .first()
        .map_or(QueueType::Quorum, |q| q.queue_type)
}

fn other_type(queue_type: QueueType) -> QueueType {
    match queue_type {
        QueueType::Quorum => QueueType::Classic,
        QueueType::Classic => QueueType::Quorum,
    }
}

fn phase_name(phase: MigrationPhase) -> &'static str {
    match phase {
        MigrationPhase::Holding => "Holding",
        MigrationPhase::Draining => "Draining",
        MigrationPhase::Replacing => "Replacing",
        MigrationPhase::Returning => "Returning",
    }
}

/// The task: each target in turn (a migration under way to another type first), recording
/// every step and the movers' progress.
async fn run<B: MigrationBroker>(
    broker: Arc<B>,
    targets: Vec<DesiredState>,
    progress: Arc<Mutex<Progress>>,
    key: String,
) {
    let mut moved = 0;
    for target in &targets {
        {
            let mut p = lock(&progress);
            let to = work_queue_type(target);
            p.status.to = to.as_str().into();
            p.status.from = Some(other_type(to).as_str().into());
        }
        let mut on_event = |event: MigrationEvent| record(&progress, event);
        match broker::migrate(broker.as_ref(), target, &mut on_event).await {
            Ok(report) => moved += report.moved,
            Err(error) => {
                let message = one_line(&format!("{:#}", anyhow::Error::new(error)));
                warn!(pipeline = %key, error = %message, "migration stopped");
                lock(&progress).done = Some(Err(message));
                return;
            }
        }
    }
    info!(pipeline = %key, moved, "migration finished");
    lock(&progress).done = Some(Ok(moved));
}

fn record(progress: &Mutex<Progress>, event: MigrationEvent) {
    let mut p = lock(progress);
    match event {
        MigrationEvent::Step { phase, step } => {
            let text = step.to_string();
            p.steps.push(format!("[{phase}] {text}"));
            p.status.phase = phase_name(phase).into();
            p.status.step = Some(text);
            if let Some((_, drained)) = p.drain.take() {
                p.moved_before += drained;
            }
        }
        MigrationEvent::Progress(drain) => {
            if p.drain
                .as_ref()
                .is_some_and(|(from, _)| *from != drain.from)
                && let Some((_, drained)) = p.drain.take()
            {
                p.moved_before += drained;
            }
            p.drain = Some((drain.from.clone(), drain.moved));
            p.status.moved = p.moved_before + drain.moved;
            p.status.remaining = drain.remaining;
        }
        MigrationEvent::Kept { queue, messages } => {
            p.status.message =
                format!("{queue} still holds {messages} messages: moving them first");
        }
    }
}

/// Reconcile's hook: Some while a migration runs for this pipeline, is refused or failed
/// (reconcile then reports it and leaves the broker pass out); None when there is nothing to
/// migrate, or the broker cannot be read (the broker pass reports that).
pub async fn drive<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    endpoint: &BrokerEndpoint,
    ctx: &Context<B>,
) -> Option<Migrating> {
    let key = desired.pipeline.to_string();
    let look = ctx.migrations.look(&key, work_queue_type(desired));
    if let Some(reported) = report_task(pipeline, desired, look, ctx).await {
        return Some(reported);
    }
    let broker = ctx.brokers.broker(endpoint).await.ok()?;
    let live = ctx
        .brokers
        .snapshot(
            endpoint,
            &broker,
            &desired.topology.vhost,
            ctx.last_write(&key),
        )
        .await
        .ok()?;
    let asked = work_queue_type(desired);
    let targets = match targets(pipeline, desired, &live, endpoint) {
        Ok(Some(targets)) => targets,
        Ok(None) => return None,
        Err(refused) => return Some(refuse(pipeline, asked, &refused.to_string(), ctx).await),
    };
    let resuming = targets.len() > 1 || recorded_target(desired, &live).ok().flatten().is_some();
    let mut notes = Vec::new();
    if !resuming {
        if let Err(reason) = check_room(broker.as_ref(), desired).await {
            return Some(refuse(pipeline, asked, &reason, ctx).await);
        }
        for warning in type_specific_policies(desired, &live, asked) {
            ctx.event(
                pipeline,
                EventType::Warning,
                Reason::TypeSpecificPolicy,
                &warning,
            )
            .await;
            notes.push(warning);
        }
    }
    drop(live);
    Some(start(pipeline, desired, broker, targets, resuming, &notes, ctx).await)
}

/// Publishes the steps the task started since the last look, and what it now reports: Some
/// while it runs or when it failed; None when there is none or it just finished.
async fn report_task<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    look: Look,
    ctx: &Context<B>,
) -> Option<Migrating> {
    if let Look::Running { new_steps, .. } | Look::Finished { new_steps, .. } = &look {
        for step in new_steps {
            ctx.change_event(pipeline, EventType::Normal, Reason::Migrating, step)
                .await;
        }
    }
    let key = desired.pipeline.to_string();
    let asked = work_queue_type(desired);
    match look {
        Look::None => None,
        Look::Running {
            status,
            target,
            announce,
            ..
        } => {
            let mut message = progress_message(&desired.names.queue, &status);
            if asked != target {
                let waiting = format!(
                    "spec.queue.type now asks for {}: the migration to {} finishes first, then the next one starts",
                    asked.as_str(),
                    target.as_str()
                );
                if announce {
                    ctx.change_event(pipeline, EventType::Normal, Reason::Migrating, &waiting)
                        .await;
                }
                message = format!("{message}; {waiting}");
            }
            Some(Migrating {
                verdict: Verdict::failed(Reason::Migrating, &message),
                status: MigrationStatus {
                    message: one_line(&message),
                    ..status
                },
                requeue: MIGRATION_POLL,
            })
        }
        Look::Finished {
            result: Ok(moved),
            status,
            took,
            ..
        } => {
            let note = format!(
                "migrated the queues of {} to {}: {moved} messages moved in {:.0}s",
                desired.names.queue,
                status.to,
                took.as_secs_f64()
            );
            ctx.change_event(pipeline, EventType::Normal, Reason::Migrated, &note)
                .await;
            // The next snapshot must show what the migration did.
            ctx.wrote_now(&key);
            None
        }
        Look::Finished {
            result: Err(message),
            status,
            ..
        } => {
            ctx.event(
                pipeline,
                EventType::Warning,
                Reason::MigrationFailed,
                &message,
            )
            .await;
            ctx.wrote_now(&key);
            let message = format!("{message}; started again in {}s", MIGRATION_RETRY.as_secs());
            Some(Migrating {
                verdict: Verdict::failed(Reason::MigrationFailed, &message),
                status: MigrationStatus {
                    phase: "Failed".into(),
                    message: one_line(&message),
                    ..status
                },
                requeue: MIGRATION_RETRY,
            })
        }
    }
}

/// Starts the task (a start or a resume, as `resuming` says), with an event saying so.
async fn start<B: PooledBroker>(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    broker: Arc<B>,
    targets: Vec<DesiredState>,
    resuming: bool,
    notes: &[String],
    ctx: &Context<B>,
) -> Migrating {
    let asked = work_queue_type(desired);
    let first = targets.first().map_or(asked, work_queue_type);
    let mover = match broker.mover_in_use(&desired.topology.vhost).await {
        Ok(Mover::Shovel) => Some("shovel"),
        Ok(_) => Some("confirm"),
        Err(_) => None,
    };
    let mut message = if resuming {
        format!(
            "resuming the migration of {} to {} found under way on the broker",
            desired.names.queue,
            first.as_str()
        )
    } else {
        format!(
            "starting to migrate the queues of {} from {} to {}",
            desired.names.queue,
            other_type(asked).as_str(),
            asked.as_str()
        )
    };
    if first != asked {
        message.push_str(&format!(", then to {}", asked.as_str()));
    }
    for note in notes {
        message.push_str("; ");
        message.push_str(note);
    }
    let message = one_line(&message);
    let key = desired.pipeline.to_string();
    info!(pipeline = %key, %message, "migration");
    ctx.change_event(pipeline, EventType::Normal, Reason::Migrating, &message)
        .await;
    let status = MigrationStatus {
        phase: "Holding".into(),
        from: Some(other_type(first).as_str().into()),
        to: first.as_str().into(),
        mover: mover.map(Into::into),
        started_at: Some(Time(Timestamp::now())),
        message: message.clone(),
        ..MigrationStatus::default()
    };
    ctx.migrations.start(&key, broker, targets, status.clone());
    Migrating {
        verdict: Verdict::failed(Reason::Migrating, &message),
        status,
        requeue: MIGRATION_POLL,
    }
}

/// The migrations to run, in order: one under way to another type first (its holding queues
/// say so), then the one the spec asks for; None when there is nothing to migrate.
fn targets(
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    live: &LiveVhost,
    endpoint: &BrokerEndpoint,
) -> Result<Option<Vec<DesiredState>>, MigrationRefused> {
    let asked = work_queue_type(desired);
    match recorded_target(desired, live)? {
        Some(recorded) if recorded != asked => {
            let mut other = pipeline.clone();
            other.spec.queue.queue_type = recorded;
            let uri_vhost = endpoint.uri_vhost();
            // The same spec with the other type plans as the spec does.
            let Ok(first) = plan::plan(&other, Some(&uri_vhost)) else {
                return Ok(None);
            };
            Ok(Some(vec![first, desired.clone()]))
        }
        Some(_) => Ok(Some(vec![desired.clone()])),
        None => Ok(plan_migration(desired, live)?.map(|_| vec![desired.clone()])),
    }
}

/// Whether the broker can hold a second copy of the queues' messages (the safety rail).
async fn check_room<B: MigrationBroker>(broker: &B, desired: &DesiredState) -> Result<(), String> {
    let queues: Vec<String> = desired
        .topology
        .queues
        .iter()
        .map(|q| q.name.clone())
        .collect();
    let (nodes, bytes) = broker
        .room(&desired.topology.vhost, &queues)
        .await
        .map_err(|e| format!("cannot start migrating queue {}: {e}", desired.names.queue))?;
    room_for_copy(&desired.names.queue, &nodes, bytes).map_err(|e| e.to_string())
}

async fn refuse<B: PooledBroker>(
    pipeline: &MessagePipeline,
    asked: QueueType,
    reason: &str,
    ctx: &Context<B>,
) -> Migrating {
    let message = format!(
        "{reason}; nothing was written; looked at again in {}s",
        MIGRATION_RETRY.as_secs()
    );
    ctx.event(
        pipeline,
        EventType::Warning,
        Reason::MigrationRefused,
        &message,
    )
    .await;
    Migrating {
        verdict: Verdict::failed(Reason::MigrationRefused, &message),
        status: MigrationStatus {
            phase: "Refused".into(),
            to: asked.as_str().into(),
            message: one_line(&message),
            ..MigrationStatus::default()
        },
        requeue: MIGRATION_RETRY,
    }
}

/// One line on where a running migration stands.
fn progress_message(queue: &str, status: &MigrationStatus) -> String {
    let mut message = format!(
        "migrating the queues of {queue} from {} to {}: {}",
        status.from.as_deref().unwrap_or("?"),
        status.to,
        status.phase.to_lowercase()
    );
    if let Some(step) = &status.step {
        message.push_str(&format!(", {step}"));
    }
    message.push_str(&format!(
        "; {} messages moved, {} ready to move",
        status.moved, status.remaining
    ));
    if let Some(mover) = &status.mover {
        message.push_str(&format!(" (mover: {mover})"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::DrainProgress;
    use crate::broker::MigrationStep;

    #[test]
    fn progress_adds_up_moves_across_drains_and_tracks_the_step() {
        let progress = Mutex::new(Progress::default());
        let drain = |from: &str, moved, remaining| {
            MigrationEvent::Progress(DrainProgress {
                from: from.into(),
                into: format!("{from}.migrating"),
                moved,
                remaining,
            })
        };
        let step = |phase, from: &str, into: &str| MigrationEvent::Step {
            phase,
            step: MigrationStep::Drain {
                from: from.into(),
                into: into.into(),
                feeders: vec![],
            },
        };
        record(
            &progress,
            step(MigrationPhase::Draining, "q", "q.migrating"),
        );
        record(&progress, drain("q", 100, 900));
        record(&progress, drain("q", 1000, 0));
        record(&progress, drain("dlq", 5, 0));
        record(
            &progress,
            step(MigrationPhase::Returning, "q.migrating", "q"),
        );
        record(&progress, drain("q.migrating", 40, 965));
        let p = lock(&progress);
        assert_eq!(p.status.moved, 1045);
        assert_eq!(p.status.remaining, 965);
        assert_eq!(p.status.phase, "Returning");
        assert_eq!(
            p.steps,
            [
                "[draining] move every message of q into q.migrating",
                "[returning] move every message of q.migrating into q"
            ]
        );
    }
}
