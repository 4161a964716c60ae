//! DeadLetterReplay: the operator runs each replay once, the way `msgpipe dlq replay` does
//! ([`DeadLetterQueue::replay_with`]: same selection, rate, copy-then-ack protocol), with
//! the object's uid as replay id, and keeps its progress in status.
//!
//! A run goes pass after pass over the DLQ until a pass replays nothing (or the limit is
//! reached): a pass only reads the dead letters present when it starts. Every
//! `check_interval` it re-reads the object (`spec.suspend`, deletion), counts the copies back
//! in the DLQ (the kill switch) and writes the counts to status. Durable state is the uid
//! (stamped on every copy, so a resumed run skips copies that came back) and status
//! (`selected`, `replayed`, `failedAgain`, `startTime`): a new runner, after a restart or
//! on a new leader, recounts what is left and goes on. At-least-once: a runner killed between
//! a copy's confirm and the ack of its dead letter leaves that one message in both queues
//! (it keeps its message id); nothing is ever acked before its copy is confirmed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::Metrics;
use crate::api::reason::one_line;
use crate::api::replay::{ReplaySelectionSpec, replay_condition};
use crate::api::{
    DeadLetterReplay, DeadLetterReplayStatus, MessagePipeline, Reason, ReplayEvent, ReplayPhase,
};
use crate::dlq::{
    DeadLetterQueue, DlqError, FailureWatch, Flow, ReplayControl, ReplayOutcome, ReplayRun,
    ReplaySelection, ReplayTarget, StopWhen, Trip,
};
use crate::k8s::{KubeError, write_replay_status};
use crate::plan::{self, PipelineNames};

/// Why a run could not go on; the runner tries again with backoff (the phase stays).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Dlq(#[from] DlqError),
}

/// How replays run.
#[derive(Clone, Debug)]
pub struct ReplaySettings {
    /// Status, suspend and kill switch are looked at this often during a pass.
    pub check_interval: Duration,
    /// Bound on every single broker call.
    pub broker_timeout: Duration,
    /// Which broker references pipelines may use (as the pipeline controller).
    pub brokers: crate::k8s::BrokerAccess,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(2),
            broker_timeout: crate::broker::DEFAULT_CALL_TIMEOUT,
            brokers: crate::k8s::BrokerAccess::default(),
        }
    }
}

/// What every replay run shares.
pub struct ReplayContext {
    pub client: Client,
    reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: ReplaySettings,
    /// Runs in progress in this process, by uid.
    runners: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl ReplayContext {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: ReplaySettings,
        identity: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: "msgpipe".into(),
            instance: Some(identity.to_string()),
        };
        Self {
            reporter,
            client,
            metrics,
            settings,
            runners: Mutex::new(HashMap::new()),
        }
    }

    async fn event(&self, replay: &DeadLetterReplay, kind: EventType, reason: Reason, note: &str) {
        let event = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(one_line(note)),
            action: "Replay".into(),
            secondary: None,
        };
        // A recorder per event: folding would turn "started" after "suspended" into a patch
        // of an older series, and the two notes differ.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(error) = recorder.publish(&event, &replay.object_ref(&())).await {
            warn!(replay = %replay.name_any(), %error, "cannot publish event");
        }
    }

    /// Stops every run of this process (leadership lost, shutdown).
    pub fn abort_all(&self) {
        if let Ok(mut runners) = self.runners.lock() {
            for (_, runner) in runners.drain() {
                runner.abort();
            }
        }
    }
}

/// The library's selection for a replay spec; a bad field is an error naming it.
pub fn selection_of(spec: &ReplaySelectionSpec) -> Result<ReplaySelection, String> {
    let error_matches = spec
        .error_matches
        .as_deref()
        .map(|re| {
            regex::Regex::new(re).map_err(|e| {
                one_line(&format!(
                    "spec.selection.errorMatches {re:?}: not a regular expression: {e}"
                ))
            })
        })
        .transpose()?;
    Ok(ReplaySelection {
        ids: (!spec.message_ids.is_empty()).then(|| spec.message_ids.iter().cloned().collect()),
        reason: spec.reason.clone(),
        error_matches,
        failed_before: spec.failed_before.as_ref().map(|t| t.0),
        failed_after: spec.failed_after.as_ref().map(|t| t.0),
        limit: None,
        replay_id: None,
    })
}

/// The kill switch of a replay spec.
pub fn stop_rule(replay: &DeadLetterReplay) -> Option<StopWhen> {
    replay.spec.stop_when.as_ref().map(|stop| StopWhen {
        percent: stop.failed_again_percent,
        window: stop.window.as_std(),
        min_sample: stop
            .min_sample
            .unwrap_or(crate::dlq::stop::DEFAULT_MIN_SAMPLE),
    })
}

/// The `Finished` condition for `phase`, keeping `lastTransitionTime` while its status holds.
fn finished_condition(
    previous: &[Condition],
    phase: ReplayPhase,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let (status, reason) = match phase {
        ReplayPhase::Completed => ("True", Reason::ReplayCompleted),
        ReplayPhase::Stopped => ("True", Reason::ReplayStopped),
        ReplayPhase::Failed => ("True", Reason::ReplayFailed),
        ReplayPhase::Suspended => ("False", Reason::ReplaySuspended),
        ReplayPhase::Pending | ReplayPhase::Running => ("False", Reason::ReplayStarted),
    };
    let since = previous
        .iter()
        .find(|c| c.type_ == replay_condition::FINISHED && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: replay_condition::FINISHED.into(),
        status: status.into(),
        reason: reason.into(),
        message: one_line(message),
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// One replay object being run: where it is, and how far it got.
struct Run<'a> {
    ctx: &'a ReplayContext,
    api: Api<DeadLetterReplay>,
    replay: DeadLetterReplay,
    name: String,
    namespace: String,
    uid: String,
    status: DeadLetterReplayStatus,
}

impl Run<'_> {
    fn phase(&self) -> ReplayPhase {
        self.status.phase.unwrap_or_default()
    }

    /// Moves to the phase after `event`, writes status, and publishes an event when the phase
    /// changed.
    async fn transition(&mut self, event: ReplayEvent, note: &str) -> Result<(), KubeError> {
        let before = self.phase();
        let after = before.next(event);
        self.status.phase = Some(after);
        if after.is_final() && self.status.finish_time.is_none() {
            self.status.finish_time = Some(Time(Timestamp::now()));
        }
        self.status.conditions = vec![finished_condition(
            &self.status.conditions,
            after,
            note,
            self.replay.meta().generation,
        )];
        self.write().await?;
        if after != before || event == ReplayEvent::Start {
            let (kind, reason) = match after {
                ReplayPhase::Completed => (EventType::Normal, Reason::ReplayCompleted),
                ReplayPhase::Stopped => (EventType::Warning, Reason::ReplayStopped),
                ReplayPhase::Failed => (EventType::Warning, Reason::ReplayFailed),
                ReplayPhase::Suspended => (EventType::Normal, Reason::ReplaySuspended),
                ReplayPhase::Pending | ReplayPhase::Running => {
                    (EventType::Normal, Reason::ReplayStarted)
                }
            };
            self.ctx.event(&self.replay, kind, reason, note).await;
        }
        info!(replay = %format!("{}/{}", self.namespace, self.name), phase = after.as_str(), "{}", one_line(note));
        Ok(())
    }

    async fn write(&mut self) -> Result<(), KubeError> {
        self.status.observed_generation = self.replay.meta().generation;
        self.status.replay_id = Some(self.uid.clone());
        self.ctx.metrics.kube_write("status", "applied");
        write_replay_status(&self.api, &self.name, &self.status).await
    }

    async fn fail(&mut self, message: String) -> Result<ReplayPhase, ReplayError> {
        self.transition(ReplayEvent::Fail, &message).await?;
        Ok(self.phase())
    }
}

/// Runs `replay` until it is final or suspended (Ok, with that phase), or until something
/// that may pass fails (Err: try again later; status keeps the progress).
pub async fn run_replay(
    ctx: &ReplayContext,
    replay: DeadLetterReplay,
) -> Result<ReplayPhase, ReplayError> {
    let namespace = replay.namespace().unwrap_or_default();
    let name = replay.name_any();
    let mut run = Run {
        ctx,
        api: Api::namespaced(ctx.client.clone(), &namespace),
        uid: replay
            .uid()
            .unwrap_or_else(|| format!("{namespace}/{name}")),
        status: replay.status.clone().unwrap_or_default(),
        replay,
        name,
        namespace,
    };
    if run.phase().is_final() {
        return Ok(run.phase());
    }
    if run.replay.spec.suspend {
        if run.phase() != ReplayPhase::Suspended {
            run.transition(ReplayEvent::Suspend, "suspended (spec.suspend: true)")
                .await?;
        }
        return Ok(run.phase());
    }
    let selection = match selection_of(&run.replay.spec.selection) {
        Ok(selection) => selection,
        Err(message) => return run.fail(message).await,
    };
    let pipelines: Api<MessagePipeline> = Api::namespaced(ctx.client.clone(), &run.namespace);
    let pipeline_name = run.replay.spec.pipeline_ref.name.clone();
    let pipeline = pipelines
        .get_opt(&pipeline_name)
        .await
        .map_err(KubeError::api(format!(
            "read MessagePipeline {}/{pipeline_name}",
            run.namespace
        )))?;
    let Some(pipeline) = pipeline else {
        let message = format!(
            "spec.pipelineRef.name: MessagePipeline {}/{pipeline_name} does not exist",
            run.namespace
        );
        return run.fail(message).await;
    };
    let resolved =
        crate::k8s::resolve_broker(&ctx.client, &ctx.settings.brokers, &pipeline).await?;
    let endpoint = resolved.endpoint;
    let state = match plan::plan(&pipeline, Some(&resolved.vhost)) {
        Ok(state) => state,
        Err(invalid) => {
            let message = format!(
                "MessagePipeline {}/{pipeline_name} is invalid: {invalid}",
                run.namespace
            );
            return run.fail(message).await;
        }
    };
    let dlq = DeadLetterQueue::open(
        &endpoint,
        &state.topology.vhost,
        &state.names.dead_letter_queue,
        ctx.settings.broker_timeout,
    )
    .await?;
    let result = replay_passes(&mut run, &dlq, selection, &state.names).await;
    dlq.close().await;
    result
}

/// Selected dead letters still in the DLQ (a dry run: nothing moves).
async fn pending(
    dlq: &DeadLetterQueue,
    selection: &ReplaySelection,
    names: &PipelineNames,
    replay_id: &str,
) -> Result<u64, DlqError> {
    let run = ReplayRun {
        selection: selection.clone(),
        rate: None,
        replay_id: replay_id.to_string(),
        dry_run: true,
    };
    match dlq.replay(&run, names, |_, _| {}).await {
        Ok(outcome) => Ok(outcome.replayed as u64),
        Err(DlqError::IdsNotFound { replayed, .. }) => Ok(replayed as u64),
        Err(other) => Err(other),
    }
}

/// Recounts where the replay stands, opens the tap, and marks it Running. Copies a killed
/// runner made after its last status write are known from what the selection no longer
/// matches in the DLQ; counted without the limit, which would hide them.
async fn begin(
    run: &mut Run<'_>,
    dlq: &DeadLetterQueue,
    selection: &ReplaySelection,
    names: &PipelineNames,
) -> Result<FailureWatch, ReplayError> {
    let ctx = run.ctx;
    let uid = run.uid.clone();
    let limit = run.replay.spec.selection.limit;
    let mut matching = selection.clone();
    matching.limit = None;
    let matching_now = pending(dlq, &matching, names, &uid).await?;
    // The tap first, then the count: a copy arriving in between is counted twice rather
    // than missed.
    let tap = dlq.tap(&names.dead_letter_exchange).await?;
    let back = dlq.count_replay_copies(&uid).await?;
    let resumed = run.status.selected.is_some();
    let matched = *run.status.matched.get_or_insert(matching_now);
    let selected = *run
        .status
        .selected
        .get_or_insert(limit.map_or(matching_now, |l| l.min(matching_now)));
    run.status.replayed = run
        .status
        .replayed
        .max(matched.saturating_sub(matching_now));
    let pending_now = selected.saturating_sub(run.status.replayed);
    run.status.remaining = Some(pending_now);
    let mut watch = FailureWatch::new(
        stop_rule(&run.replay),
        &uid,
        ctx.settings.check_interval,
        back,
        Some(tap),
    );
    // Copies back before this run are the baseline of the kill switch, not new failures.
    record_back(run, &mut watch, back);
    run.status.start_time.get_or_insert(Time(Timestamp::now()));
    let note = format!(
        "{} replay of {selected} dead letters from {} to queue {}{}: {} replayed so far, {pending_now} left (replay id {uid})",
        if resumed { "resumed the" } else { "started a" },
        names.dead_letter_queue,
        names.queue,
        run.replay
            .spec
            .rate
            .map(|r| format!(" at {r}/s"))
            .unwrap_or_default(),
        run.status.replayed,
    );
    run.transition(ReplayEvent::Start, &note).await?;
    Ok(watch)
}

async fn replay_passes(
    run: &mut Run<'_>,
    dlq: &DeadLetterQueue,
    mut selection: ReplaySelection,
    names: &PipelineNames,
) -> Result<ReplayPhase, ReplayError> {
    let uid = run.uid.clone();
    selection.replay_id = Some(uid.clone());
    let limit = run.replay.spec.selection.limit;
    let rate = run.replay.spec.rate;
    let mut watch = begin(run, dlq, &selection, names).await?;
    loop {
        let mut pass = selection.clone();
        pass.limit = remaining_limit(limit, run.status.replayed);
        let replay_run = ReplayRun {
            selection: pass,
            rate: rate.map(f64::from),
            replay_id: uid.clone(),
            dry_run: false,
        };
        let before = run.status.replayed;
        let mut control = RunnerControl {
            run: &mut *run,
            watch: &mut watch,
            before,
            suspended: false,
            gone: false,
            trip: None,
        };
        let result = dlq.replay_with(&replay_run, names, &mut control).await;
        let (suspended, gone, trip) = (control.suspended, control.gone, control.trip);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(DlqError::IdsNotFound { replayed, .. }) => ReplayOutcome {
                depth: 0,
                examined: 0,
                replayed,
                skipped: 0,
                remaining: 0,
                halted: false,
            },
            Err(error) => {
                let _ = run.write().await;
                return Err(error.into());
            }
        };
        run.status.replayed = before + outcome.replayed as u64;
        if gone {
            // Deleted (or replaced by a new object of the same name): nothing to report to.
            info!(replay = %run.name, replayed = run.status.replayed, "replay deleted; stopped");
            return Ok(run.phase());
        }
        let limit_reached = limit.is_some_and(|l| run.status.replayed >= l);
        let (event, note) = if let Some(trip) = trip {
            (
                ReplayEvent::KillSwitch,
                format!("stopped by the kill switch (stopWhen): {trip}"),
            )
        } else if suspended {
            (
                ReplayEvent::Suspend,
                "suspended (spec.suspend: true)".to_string(),
            )
        } else {
            let ended = ReplayEvent::PassEnded {
                replayed: outcome.replayed as u64,
                limit_reached,
            };
            (ended, String::new())
        };
        if run.phase().next(event) == ReplayPhase::Running {
            continue;
        }
        return finish(run, dlq, names, &mut watch, event, note).await;
    }
}

/// What `spec.selection.limit` still allows after `replayed` copies.
fn remaining_limit(limit: Option<u64>, replayed: u64) -> Option<usize> {
    limit.map(|l| usize::try_from(l.saturating_sub(replayed)).unwrap_or(usize::MAX))
}

/// Final counts, then the phase change. `remaining` is what the selection took minus what
/// was replayed (none once Completed); re-reading the DLQ right after a pass could miss the
/// dead letters the broker is still putting back.
async fn finish(
    run: &mut Run<'_>,
    dlq: &DeadLetterQueue,
    names: &PipelineNames,
    watch: &mut FailureWatch,
    event: ReplayEvent,
    note: String,
) -> Result<ReplayPhase, ReplayError> {
    let selected = run.status.selected.unwrap_or_default();
    let remaining = match run.phase().next(event) {
        ReplayPhase::Completed => 0,
        _ => selected.saturating_sub(run.status.replayed),
    };
    run.status.remaining = Some(remaining);
    // The last copies back, through the tap (a fresh read of the DLQ could miss the dead
    // letters the broker is still putting back after the pass).
    watch.check(dlq).await?;
    let back = watch.back;
    record_back(run, watch, back);
    let note = if note.is_empty() {
        format!(
            "replayed {} of {selected} selected dead letters to queue {}; {} failed again",
            run.status.replayed, names.queue, run.status.failed_again,
        )
    } else {
        format!(
            "{note}; replayed {}, {remaining} left in {}, {} failed again",
            run.status.replayed, names.dead_letter_queue, run.status.failed_again
        )
    };
    run.transition(event, &note).await?;
    Ok(run.phase())
}

fn record_back(run: &mut Run<'_>, watch: &mut FailureWatch, back: u64) {
    watch.back = back;
    if back > run.status.failed_again {
        run.ctx.metrics.replay_messages(
            &run.namespace,
            &run.name,
            "failed_again",
            back - run.status.failed_again,
        );
    }
    run.status.failed_again = back;
}

/// The operator's side of one pass: progress to status, suspend, kill switch.
struct RunnerControl<'a, 'r> {
    run: &'a mut Run<'r>,
    watch: &'a mut FailureWatch,
    /// Replayed before this pass.
    before: u64,
    suspended: bool,
    /// The object was deleted or replaced.
    gone: bool,
    trip: Option<Trip>,
}

impl RunnerControl<'_, '_> {
    /// Re-reads the object: suspended, deleted, or gone.
    async fn still_wanted(&mut self) -> bool {
        match self.run.api.get_opt(&self.run.name).await {
            Ok(Some(latest)) => {
                if latest.uid().as_deref() != Some(self.run.uid.as_str())
                    || latest.meta().deletion_timestamp.is_some()
                {
                    self.gone = true;
                    return false;
                }
                self.suspended = latest.spec.suspend;
                self.run.replay.metadata.generation = latest.meta().generation;
                !self.suspended
            }
            Ok(None) => {
                self.gone = true;
                false
            }
            Err(error) => {
                // A blind spell of the API does not stop a replay; the next check retries.
                debug!(replay = %self.run.name, error = %crate::k8s::plain(&error), "cannot re-read the replay");
                true
            }
        }
    }
}

impl ReplayControl for RunnerControl<'_, '_> {
    async fn before_copy(&mut self, dlq: &DeadLetterQueue, progress: &ReplayOutcome) -> Flow {
        if !self.watch.due(Instant::now()) {
            return Flow::Continue;
        }
        self.watch.start_interval(Instant::now());
        self.run.status.replayed = self.before + progress.replayed as u64;
        let selected = self.run.status.selected.unwrap_or_default();
        self.run.status.remaining = Some(selected.saturating_sub(self.run.status.replayed));
        if !self.still_wanted().await {
            return Flow::Halt;
        }
        match self.watch.check(dlq).await {
            Ok(trip) => {
                let back = self.watch.back;
                record_back(&mut *self.run, &mut *self.watch, back);
                self.trip = trip;
            }
            Err(error) => {
                warn!(replay = %self.run.name, %error, "cannot count the copies back in the DLQ");
            }
        }
        if let Err(error) = self.run.write().await {
            warn!(replay = %self.run.name, %error, "cannot write the replay's progress");
        }
        if self.trip.is_some() {
            Flow::Halt
        } else {
            Flow::Continue
        }
    }

    fn replayed(&mut self, _: &crate::dlq::DeadLetter, _: &ReplayTarget) {
        self.watch.replayed(Instant::now());
        self.run
            .ctx
            .metrics
            .replay_messages(&self.run.namespace, &self.run.name, "replayed", 1);
    }
}

/// Reconcile of a DeadLetterReplay: start its runner unless it is final or already running
/// here; the runner does the rest.
pub async fn reconcile_replay(
    replay: Arc<DeadLetterReplay>,
    ctx: Arc<ReplayContext>,
) -> Result<Action, KubeError> {
    let phase = replay
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default();
    if phase.is_final() {
        return Ok(Action::await_change());
    }
    let Some(uid) = replay.uid() else {
        return Ok(Action::await_change());
    };
    let Ok(mut runners) = ctx.runners.lock() else {
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    runners.retain(|_, runner| !runner.is_finished());
    if runners.contains_key(&uid) {
        // A run that is ending (suspend) may miss a resume: look again soon.
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let task_ctx = ctx.clone();
    let object = (*replay).clone();
    let task = tokio::spawn(async move { run_with_retries(task_ctx, object).await });
    runners.insert(uid, task.abort_handle());
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Runs a replay, retrying what may pass (broker down, API errors) with capped backoff.
async fn run_with_retries(ctx: Arc<ReplayContext>, mut replay: DeadLetterReplay) {
    let api: Api<DeadLetterReplay> =
        Api::namespaced(ctx.client.clone(), &replay.namespace().unwrap_or_default());
    for attempt in 1u32.. {
        match run_replay(&ctx, replay.clone()).await {
            Ok(_) => return,
            Err(error) => {
                warn!(replay = %replay.name_any(), %error, "replay interrupted; retrying");
                ctx.event(
                    &replay,
                    EventType::Warning,
                    Reason::ReplayFailed,
                    &format!("interrupted, will resume: {error}"),
                )
                .await;
                tokio::time::sleep(super::backoff_delay(attempt)).await;
                match api.get_opt(&replay.name_any()).await {
                    Ok(Some(latest)) if latest.uid() == replay.uid() => replay = latest,
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
        }
    }
}

fn replay_error_policy(_: Arc<DeadLetterReplay>, _: &KubeError, _: Arc<ReplayContext>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

/// Runs the DeadLetterReplay controller over `namespace` (None: all) until `shutdown`;
/// aborts the runs it started when it stops (a new leader resumes them).
pub async fn run_replay_controller(
    ctx: Arc<ReplayContext>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<DeadLetterReplay> = super::scoped(&ctx.client, namespace.as_deref());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile_replay, replay_error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "replay controller event");
            }
        })
        .await;
    ctx.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finished_condition_keeps_its_transition_time_while_its_status_holds() {
        let running = finished_condition(&[], ReplayPhase::Running, "started", Some(1));
        assert_eq!(
            (running.status.as_str(), running.reason.as_str()),
            ("False", "ReplayStarted")
        );
        let mut earlier = running.clone();
        earlier.last_transition_time = Time("2026-12-01T00:00:00Z".parse().expect("time"));
        let suspended = finished_condition(
            &[earlier.clone()],
            ReplayPhase::Suspended,
            "paused",
            Some(2),
        );
        assert_eq!(suspended.reason, "ReplaySuspended");
        assert_eq!(
            suspended.last_transition_time, earlier.last_transition_time,
            "still False"
        );
        let stopped = finished_condition(
            &[earlier.clone()],
            ReplayPhase::Stopped,
            "kill\nswitch",
            Some(2),
        );
        assert_eq!(
            (stopped.status.as_str(), stopped.reason.as_str()),
            ("True", "ReplayStopped")
        );
        assert_ne!(
            stopped.last_transition_time, earlier.last_transition_time,
            "flipped to True"
        );
        assert_eq!(stopped.message, "kill switch", "one line");
        assert_eq!(stopped.observed_generation, Some(2));
    }

    #[test]
    fn selection_errors_name_the_field_and_the_limit_shrinks_with_progress() {
        let spec = ReplaySelectionSpec {
            error_matches: Some("(".into()),
            ..ReplaySelectionSpec::default()
        };
        let error = selection_of(&spec).expect_err("bad regex");
        assert!(
            error.starts_with("spec.selection.errorMatches \"(\": not a regular expression"),
            "{error}"
        );
        assert!(!error.contains('\n'));
        assert_eq!(remaining_limit(Some(10), 4), Some(6));
        assert_eq!(remaining_limit(Some(10), 12), Some(0));
        assert_eq!(remaining_limit(None, 12), None);
    }
}
