//! Carrying out a migration ([`super::migration`]): snapshot, plan the next stage, run its
//! steps, and again, until the planner finds nothing left to do. Nothing is remembered
//! between rounds but what the broker holds, so a run killed at any step is resumed by
//! running it again.

use std::future::Future;
use std::time::Duration;

use futures_util::future::join_all;

use super::migration::{
    MigrationPhase, MigrationRefused, MigrationStep, NodeRoom, plan_migration, recorded_target,
    room_for_copy,
};
use super::mover::Mover;
use super::{ActionOutcome, BrokerApi, BrokerError};
use crate::api::QueueType;
use crate::plan::DesiredState;

/// How far a drain has got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainProgress {
    pub from: String,
    pub into: String,
    /// Messages moved so far by this drain (by the shovel: the lengths it was started on).
    pub moved: u64,
    /// Ready messages left in `from` (exact, passive declare).
    pub remaining: u64,
}

/// What a broker must do beyond [`BrokerApi`] to carry out a migration.
pub trait MigrationBroker: BrokerApi {
    /// Moves every message of `from` into the queue `into`, each confirmed there before it is
    /// acknowledged in `from`, until `from` holds none (ready or unacknowledged) and every
    /// queue of `feeders` is empty. Returns how many it moved.
    fn drain(
        &self,
        vhost: &str,
        from: &str,
        into: &str,
        feeders: &[String],
        progress: &mut (dyn FnMut(DrainProgress) + Send),
    ) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// Every node's alarms and disk figures, and the message bytes of `queues` (those absent
    /// count 0): what decides whether a migration may start ([`room_for_copy`]).
    fn room(
        &self,
        vhost: &str,
        queues: &[String],
    ) -> impl Future<Output = Result<(Vec<NodeRoom>, u64), BrokerError>> + Send;

    /// The mover [`MigrationBroker::drain`] will use on `vhost`: [`Mover::Shovel`] or
    /// [`Mover::Confirm`] (what `Auto` resolves to), for progress reports.
    fn mover_in_use(&self, vhost: &str) -> impl Future<Output = Result<Mover, BrokerError>> + Send {
        let _ = vhost;
        async { Ok(Mover::Confirm) }
    }

    /// Deletes a drained, unrouted queue if it holds no message, ready, unacknowledged or
    /// waiting to be dead-lettered (`Kept` otherwise; `Gone` if it is not there). Consumers
    /// do not keep it: they are told (consumer cancel) and follow the queue's new declaration.
    fn delete_drained(
        &self,
        vhost: &str,
        queue: &str,
    ) -> impl Future<Output = Result<ActionOutcome, BrokerError>> + Send;
}

/// What a migration reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationEvent {
    /// A step is about to run.
    Step {
        phase: MigrationPhase,
        step: MigrationStep,
    },
    /// A drain moved more messages.
    Progress(DrainProgress),
    /// A drained queue still held messages; the stage is planned again.
    Kept { queue: String, messages: u64 },
}

/// How a migration ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Steps carried out.
    pub steps: usize,
    /// Messages moved, both ways.
    pub moved: u64,
    /// None when there was nothing to migrate.
    pub target: Option<QueueType>,
}

/// Why a migration stopped. Each names the pipeline's work queue and, for a step, the step.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Refused(#[from] MigrationRefused),
    // The cause is the source: `{:#}` (the CLI's one line) prints it after a colon.
    #[error("migration of {queue}: cannot read the broker")]
    Snapshot {
        queue: String,
        #[source]
        source: BrokerError,
    },
    #[error("migration of {queue} stopped in phase {phase} at step \"{step}\"")]
    Step {
        queue: String,
        phase: MigrationPhase,
        step: String,
        #[source]
        source: BrokerError,
    },
    #[error(
        "a migration of {queue} to {recorded} is under way on the broker (its holding queues say so), and this run asks for {asked}; finish it first (msgpipe migrate with the spec asking for {recorded})"
    )]
    OtherTargetUnderWay {
        queue: String,
        recorded: &'static str,
        asked: &'static str,
    },
    #[error(
        "migration of {queue} made no progress in {rounds} rounds (last step: \"{step}\"); is something still publishing to it directly?"
    )]
    Stuck {
        queue: String,
        rounds: usize,
        step: String,
    },
}

/// How long a round waits before planning again when a drained queue was kept.
const KEPT_PAUSE: Duration = Duration::from_secs(1);
/// Rounds without a finished stage before giving up.
const MAX_ROUNDS: usize = 120;

/// Migrates the pipeline's queues to the type `desired` asks for, resuming whatever the
/// broker shows is under way. A migration under way to another type is refused
/// ([`MigrationError::OtherTargetUnderWay`]): the caller finishes it first.
pub async fn migrate<B: MigrationBroker>(
    broker: &B,
    desired: &DesiredState,
    on_event: &mut (dyn FnMut(MigrationEvent) + Send),
) -> Result<MigrationReport, MigrationError> {
    let vhost = desired.topology.vhost.as_str();
    let queue = desired.names.queue.clone();
    let mut report = MigrationReport::default();
    let mut last_step = String::new();
    for _round in 0..MAX_ROUNDS {
        let live = broker
            .snapshot(vhost)
            .await
            .map_err(|source| MigrationError::Snapshot {
                queue: queue.clone(),
                source,
            })?;
        let asked = desired
            .topology
            .queues
            .first()
            .map_or(QueueType::Quorum, |q| q.queue_type);
        if let Some(recorded) = recorded_target(desired, &live)?
            && recorded != asked
        {
            return Err(MigrationError::OtherTargetUnderWay {
                queue,
                recorded: recorded.as_str(),
                asked: asked.as_str(),
            });
        }
        let Some(plan) = plan_migration(desired, &live)? else {
            return Ok(report);
        };
        // A migration starts only where a second copy fits; one under way (a holding queue
        // exists) is finished whatever the room: that is what frees it.
        if recorded_target(desired, &live)?.is_none() {
            let queues: Vec<String> = desired
                .topology
                .queues
                .iter()
                .map(|q| q.name.clone())
                .collect();
            let (nodes, bytes) =
                broker
                    .room(vhost, &queues)
                    .await
                    .map_err(|source| MigrationError::Snapshot {
                        queue: queue.clone(),
                        source,
                    })?;
            room_for_copy(&queue, &nodes, bytes)?;
        }
        drop(live);
        report.target = Some(plan.target);
        for step in plan.steps {
            last_step = step.to_string();
            on_event(MigrationEvent::Step {
                phase: plan.phase,
                step: step.clone(),
            });
            let outcome = run_step(broker, vhost, &step, on_event)
                .await
                .map_err(|source| MigrationError::Step {
                    queue: queue.clone(),
                    phase: plan.phase,
                    step: step.to_string(),
                    source,
                })?;
            report.steps += 1;
            match outcome {
                StepOutcome::Moved(n) => report.moved += n,
                StepOutcome::Done => {}
                StepOutcome::Kept { queue, messages } => {
                    on_event(MigrationEvent::Kept { queue, messages });
                    tokio::time::sleep(KEPT_PAUSE).await;
                    break;
                }
            }
        }
    }
    Err(MigrationError::Stuck {
        queue,
        rounds: MAX_ROUNDS,
        step: last_step,
    })
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Done,
    /// A drain moved this many messages.
    Moved(u64),
    /// A drained queue still held messages and was not deleted.
    Kept {
        queue: String,
        messages: u64,
    },
}

/// Runs one step of a migration.
pub async fn run_step<B: MigrationBroker>(
    broker: &B,
    vhost: &str,
    step: &MigrationStep,
    on_event: &mut (dyn FnMut(MigrationEvent) + Send),
) -> Result<StepOutcome, BrokerError> {
    match step {
        MigrationStep::Broker(action) => broker
            .execute(vhost, action)
            .await
            .map(|_| StepOutcome::Done),
        MigrationStep::Drain {
            from,
            into,
            feeders,
        } => {
            let mut progress = |p: DrainProgress| on_event(MigrationEvent::Progress(p));
            broker
                .drain(vhost, from, into, feeders, &mut progress)
                .await
                .map(StepOutcome::Moved)
        }
        MigrationStep::DeleteDrained { queues } => {
            // Together: each waits out the same settle.
            let deletes: Vec<_> = queues
                .iter()
                .map(|queue| broker.delete_drained(vhost, queue))
                .collect();
            let outcomes = join_all(deletes).await;
            let mut result = StepOutcome::Done;
            for (queue, outcome) in queues.iter().zip(outcomes) {
                if let ActionOutcome::Kept(depth) = outcome? {
                    result = StepOutcome::Kept {
                        queue: queue.clone(),
                        messages: depth.messages,
                    };
                }
            }
            Ok(result)
        }
    }
}
