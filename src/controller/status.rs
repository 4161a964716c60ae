//! The pipeline's status, decided in one place from what a reconcile observed. Pure: the
//! controller writes the result only when it differs from what is stored.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::reason::one_line;
use crate::api::{MessagePipelineStatus, MigrationStatus, Reason, RetryQueueStatus, condition};
use crate::broker::LiveCounts;
use crate::plan::DesiredState;

/// One condition's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: Reason,
    /// One line of at most 1 KiB.
    pub message: String,
}

impl Verdict {
    pub fn ok(reason: Reason, message: impl AsRef<str>) -> Self {
        Self {
            ok: true,
            reason,
            message: one_line(message.as_ref()),
        }
    }

    pub fn failed(reason: Reason, message: impl AsRef<str>) -> Self {
        Self {
            ok: false,
            reason,
            message: one_line(message.as_ref()),
        }
    }
}

/// What one reconcile found out.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub generation: Option<i64>,
    pub broker: Verdict,
    pub alerts: Verdict,
    /// Live counts, when the broker could be read.
    pub counts: Option<LiveCounts>,
    /// The AlertmanagerConfig msgpipe now keeps (None: none, or not looked at).
    pub alertmanager_config: Option<String>,
    /// The queue migration under way, refused or failed (None: none).
    pub migration: Option<MigrationStatus>,
}

impl Observation {
    /// An invalid spec: nothing was touched.
    pub fn invalid_spec(generation: Option<i64>, message: &str) -> Self {
        let not_touched = format!("not reconciled: {message}");
        Self {
            generation,
            broker: Verdict::failed(Reason::InvalidSpec, &not_touched),
            alerts: Verdict::failed(Reason::InvalidSpec, not_touched),
            counts: None,
            alertmanager_config: None,
            migration: None,
        }
    }

    fn ready(&self) -> Verdict {
        match (self.broker.ok, self.alerts.ok) {
            (true, true) if self.broker.reason == Reason::Observing => self.broker.clone(),
            (true, true) => Verdict::ok(
                Reason::Converged,
                "broker objects, alerts and client config match the spec",
            ),
            (false, _) => Verdict::failed(self.broker.reason, &self.broker.message),
            (true, false) => Verdict::failed(self.alerts.reason, &self.alerts.message),
        }
    }
}

/// The status to store after `observation`, or None when the stored one already says it all.
/// A condition keeps its lastTransitionTime unless its status flips; `lastSyncTime` moves
/// only together with another change, so a converged pipeline causes no write at all.
pub fn next_status(
    stored: Option<&MessagePipelineStatus>,
    observation: &Observation,
    desired: Option<&DesiredState>,
    now: &Time,
) -> Option<MessagePipelineStatus> {
    let stored_conditions = stored.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = [
        (condition::READY, observation.ready()),
        (condition::BROKER_READY, observation.broker.clone()),
        (condition::ALERTS_READY, observation.alerts.clone()),
    ]
    .into_iter()
    .map(|(kind, verdict)| {
        build_condition(
            kind,
            &verdict,
            observation.generation,
            stored_conditions,
            now,
        )
    })
    .collect();
    let mut next = MessagePipelineStatus {
        observed_generation: observation.generation,
        conditions,
        last_sync_time: stored.and_then(|s| s.last_sync_time.clone()),
        // An invalid spec touches nothing: what msgpipe kept stays on record.
        alertmanager_config: if observation.alerts.reason == Reason::InvalidSpec {
            stored.and_then(|s| s.alertmanager_config.clone())
        } else {
            observation.alertmanager_config.clone()
        },
        migration: if observation.broker.reason == Reason::InvalidSpec {
            stored.and_then(|s| s.migration.clone())
        } else {
            observation.migration.clone()
        },
        ..MessagePipelineStatus::default()
    };
    match (&observation.counts, desired) {
        (Some(counts), Some(desired)) => {
            next.queue_messages = counts.queue_messages;
            next.consumers = counts.consumers;
            next.dead_letter_messages = counts.dead_letter_messages;
            next.retry_tiers = u32::try_from(desired.retry_tiers.len()).ok();
            next.retry_queues = desired
                .retry_tiers
                .iter()
                .zip(&counts.retry_queues)
                .map(|(tier, (name, messages))| RetryQueueStatus {
                    name: name.clone(),
                    delay: tier.delay.to_string(),
                    messages: *messages,
                })
                .collect();
        }
        // The broker could not be read: keep the last known numbers rather than blank them.
        _ => {
            if let Some(stored) = stored {
                next.queue_messages = stored.queue_messages;
                next.consumers = stored.consumers;
                next.dead_letter_messages = stored.dead_letter_messages;
                next.retry_queues = stored.retry_queues.clone();
            }
            next.retry_tiers = desired
                .and_then(|d| u32::try_from(d.retry_tiers.len()).ok())
                .or(stored.and_then(|s| s.retry_tiers));
        }
    }
    if stored == Some(&next) {
        return None;
    }
    next.last_sync_time = Some(now.clone());
    Some(next)
}

pub(crate) fn build_condition(
    kind: &str,
    verdict: &Verdict,
    generation: Option<i64>,
    stored: &[Condition],
    now: &Time,
) -> Condition {
    let status = if verdict.ok { "True" } else { "False" };
    let previous = stored.iter().find(|c| c.type_ == kind);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: kind.into(),
        status: status.into(),
        reason: verdict.reason.into(),
        message: verdict.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::load::parse_pipelines;
    use crate::plan::plan;

    fn notes() -> DesiredState {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/notes-pipeline.yaml"
        ))
        .expect("example");
        let pipelines = parse_pipelines(&text).expect("parses");
        plan(&pipelines[0], None).expect("plans")
    }

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + seconds).expect("time"))
    }

    fn converged(counts: LiveCounts) -> Observation {
        Observation {
            generation: Some(3),
            broker: Verdict::ok(Reason::Converged, "ok"),
            alerts: Verdict::ok(Reason::Converged, "ok"),
            counts: Some(counts),
            alertmanager_config: None,
            migration: None,
        }
    }

    fn counts(dlq: u64) -> LiveCounts {
        LiveCounts {
            queue_messages: Some(7),
            consumers: Some(2),
            dead_letter_messages: Some(dlq),
            retry_queues: (1..=4)
                .map(|k| (format!("notes_queue.retry.{k}"), k))
                .collect(),
        }
    }

    #[test]
    fn first_sync_sets_every_condition_counts_and_sync_time() {
        let desired = notes();
        let status = next_status(None, &converged(counts(0)), Some(&desired), &at(0))
            .expect("a first status is written");
        assert_eq!(status.observed_generation, Some(3));
        let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "BrokerReady", "AlertsReady"]);
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.status == "True" && c.observed_generation == Some(3))
        );
        assert_eq!(status.retry_tiers, Some(4));
        assert_eq!(status.retry_queues[3].delay, "8s");
        assert_eq!(status.retry_queues[3].messages, 4);
        assert_eq!(status.dead_letter_messages, Some(0));
        assert_eq!(status.last_sync_time, Some(at(0)));
    }

    #[test]
    fn an_unchanged_observation_writes_nothing() {
        let desired = notes();
        let first =
            next_status(None, &converged(counts(0)), Some(&desired), &at(0)).expect("first");
        assert_eq!(
            next_status(
                Some(&first),
                &converged(counts(0)),
                Some(&desired),
                &at(300)
            ),
            None
        );
    }

    #[test]
    fn changed_counts_are_written_without_moving_transition_times() {
        let desired = notes();
        let first =
            next_status(None, &converged(counts(0)), Some(&desired), &at(0)).expect("first");
        let next = next_status(
            Some(&first),
            &converged(counts(5)),
            Some(&desired),
            &at(300),
        )
        .expect("new DLQ count is written");
        assert_eq!(next.dead_letter_messages, Some(5));
        assert_eq!(next.last_sync_time, Some(at(300)));
        assert!(
            next.conditions
                .iter()
                .all(|c| c.last_transition_time == at(0))
        );
    }

    #[test]
    fn a_flip_moves_only_the_flipped_conditions_and_keeps_known_counts() {
        let desired = notes();
        let first =
            next_status(None, &converged(counts(2)), Some(&desired), &at(0)).expect("first");
        let broken = Observation {
            broker: Verdict::failed(
                Reason::BrokerUnreachable,
                "broker amqp://u@h:5672 is unreachable",
            ),
            counts: None,
            ..converged(counts(2))
        };
        let next = next_status(Some(&first), &broken, Some(&desired), &at(60)).expect("flip");
        let by_type = |t: &str| {
            next.conditions
                .iter()
                .find(|c| c.type_ == t)
                .expect("condition")
                .clone()
        };
        assert_eq!(by_type("Ready").status, "False");
        assert_eq!(by_type("Ready").reason, Reason::BrokerUnreachable);
        assert_eq!(by_type("Ready").last_transition_time, at(60));
        assert_eq!(by_type("BrokerReady").last_transition_time, at(60));
        assert_eq!(by_type("AlertsReady").last_transition_time, at(0));
        assert_eq!(
            next.dead_letter_messages,
            Some(2),
            "last known count is kept"
        );
    }

    #[test]
    fn invalid_spec_is_not_ready_for_every_condition() {
        let status = next_status(
            None,
            &Observation::invalid_spec(Some(1), "spec.retry.maxAttempts: must be >= 1"),
            None,
            &at(0),
        )
        .expect("written");
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.status == "False" && c.reason == Reason::InvalidSpec)
        );
        assert!(
            status.conditions[0]
                .message
                .contains("spec.retry.maxAttempts")
        );
        assert_eq!(status.queue_messages, None);
    }
}
