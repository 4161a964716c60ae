//! `DeadLetterReplay` v1alpha1: a replay of a pipeline's dead letters, declared as an object so
//! that it can go through review (GitOps) and runs from the cluster with its progress in status.
//!
//! The operator runs it once, the way `msgpipe dlq replay` does (same selection, rate, copy
//! protocol and replay id), under the id `metadata.uid`: a resumed run (operator restart,
//! new leader, `suspend` set back to false) skips the copies it already made.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;

/// Most copies per second a replay may ask for.
pub const REPLAY_RATE_MAX: u32 = 100_000;

/// A DeadLetterReplay sends selected dead letters of a MessagePipeline back to its work queue,
/// once, at a bounded rate, and stops by itself when too many of them fail again.
// Several printcolumns share `type_ = "integer"`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "msgpipe.io",
    version = "v1alpha1",
    kind = "DeadLetterReplay",
    plural = "deadletterreplays",
    shortname = "dlr",
    namespaced,
    status = "DeadLetterReplayStatus",
    doc = "A DeadLetterReplay sends selected dead letters of a MessagePipeline back to its work queue, once, rate-limited, with a kill switch; progress is in status.",
    printcolumn(
        name = "Pipeline",
        type_ = "string",
        json_path = ".spec.pipelineRef.name"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Replayed",
        type_ = "integer",
        json_path = ".status.replayed",
        description = "Dead letters copied back to the work queue"
    ),
    printcolumn(
        name = "Remaining",
        type_ = "integer",
        json_path = ".status.remaining",
        description = "Selected dead letters not replayed yet"
    ),
    printcolumn(
        name = "FailedAgain",
        type_ = "integer",
        json_path = ".status.failedAgain",
        description = "Copies of this replay back in the DLQ"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplaySpec {
    /// The MessagePipeline (same namespace) whose dead-letter queue is replayed. Cannot change.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf", "message": "cannot change: create another DeadLetterReplay"
    }]))]
    pub pipeline_ref: PipelineRef,
    /// Which dead letters to replay (all of them when empty). Only dead letters present when
    /// a run starts are considered. Cannot change.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf", "message": "cannot change: create another DeadLetterReplay"
    }]))]
    pub selection: ReplaySelectionSpec,
    /// At most this many copies per second (default: as fast as the broker confirms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = REPLAY_RATE_MAX))]
    pub rate: Option<u32>,
    /// Kill switch: stop when too many replayed messages are dead-lettered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when: Option<StopWhenSpec>,
    /// true pauses the replay after the copy in flight; false resumes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// A MessagePipeline in the replay's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PipelineRef {
    /// Name of the MessagePipeline.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which dead letters a replay takes; every field given must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySelectionSpec {
    /// Only this reason (permanent, max-attempts, rejected, expired, maxlen, delivery_limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Only dead letters whose last error matches this regular expression (Rust regex syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_matches: Option<String>,
    /// Only dead letters that last failed after this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_after: Option<Time>,
    /// Only dead letters that last failed before this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_before: Option<Time>,
    /// Only dead letters with these message ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_ids: Vec<String>,
    /// Replay at most this many (the first selected, from the head of the DLQ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub limit: Option<u64>,
}

/// Stop when more than `failedAgainPercent` % of the copies made in the last `window` came
/// back to the DLQ, once at least `minSample` copies were made in that window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StopWhenSpec {
    /// Percentage of copies dead-lettered again above which the replay stops (0 < p <= 100).
    #[schemars(range(min = 0.01, max = 100.0))]
    pub failed_again_percent: f64,
    /// Window the ratio is measured over, e.g. 5m.
    pub window: Duration,
    /// Copies made in the window before the ratio counts (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_sample: Option<u64>,
}

/// Where a replay stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplayPhase {
    /// Not started yet.
    #[default]
    Pending,
    /// Copying dead letters back.
    Running,
    /// `spec.suspend` is true; resumes where it stopped.
    Suspended,
    /// Every selected dead letter was replayed.
    Completed,
    /// The kill switch stopped it; the rest are in the DLQ.
    Stopped,
    /// It cannot run (see the Finished condition).
    Failed,
}

/// What happened to a replay, for [`ReplayPhase::next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayEvent {
    /// A run begins (spec.suspend is false).
    Start,
    /// spec.suspend is true.
    Suspend,
    /// One pass over the DLQ ended without a halt: `replayed` copies in it; `limit_reached`
    /// when spec.selection.limit copies were made in all.
    PassEnded { replayed: u64, limit_reached: bool },
    /// The kill switch tripped.
    KillSwitch,
    /// The replay cannot run (invalid selection, pipeline missing).
    Fail,
}

impl ReplayPhase {
    /// Completed, Stopped and Failed are final: the replay never runs again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ReplayPhase::Completed | ReplayPhase::Stopped | ReplayPhase::Failed
        )
    }

    /// The phase after `event`. A final phase never changes; a pass that replayed nothing
    /// means nothing selected is left.
    pub fn next(self, event: ReplayEvent) -> ReplayPhase {
        if self.is_final() {
            return self;
        }
        match event {
            ReplayEvent::Start => ReplayPhase::Running,
            ReplayEvent::Suspend => ReplayPhase::Suspended,
            ReplayEvent::PassEnded {
                replayed,
                limit_reached,
            } if replayed == 0 || limit_reached => ReplayPhase::Completed,
            ReplayEvent::PassEnded { .. } => ReplayPhase::Running,
            ReplayEvent::KillSwitch => ReplayPhase::Stopped,
            ReplayEvent::Fail => ReplayPhase::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplayPhase::Pending => "Pending",
            ReplayPhase::Running => "Running",
            ReplayPhase::Suspended => "Suspended",
            ReplayPhase::Completed => "Completed",
            ReplayPhase::Stopped => "Stopped",
            ReplayPhase::Failed => "Failed",
        }
    }
}

/// Condition types of a DeadLetterReplay.
pub mod replay_condition {
    /// True once the replay is over (Completed, Stopped or Failed); the reason says which.
    pub const FINISHED: &str = "Finished";
}

/// Observed state of a DeadLetterReplay.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplayStatus {
    /// Pending, Running, Suspended, Completed, Stopped or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ReplayPhase>,
    /// Id stamped on every copy (`x-msgpipe-replay-id`): the object's uid. A resumed run skips
    /// dead letters carrying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<String>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Dead letters the selection took when the replay started (at most `limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<u64>,
    /// Dead letters the selection matched when the replay started, before `limit`: a resumed
    /// run compares it with what still matches to know how many were replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<u64>,
    /// Dead letters copied back to the work queue (confirmed, then removed from the DLQ).
    #[serde(default)]
    pub replayed: u64,
    /// Selected dead letters still in the DLQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Copies of this replay that are back in the DLQ (dead-lettered again).
    #[serde(default)]
    pub failed_again: u64,
    /// When the replay first started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it reached Completed, Stopped or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// Finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplayEvent::*;
    use ReplayPhase::*;

    #[test]
    fn a_replay_runs_pass_after_pass_until_one_replays_nothing() {
        let running = Pending.next(Start);
        assert_eq!(running, Running);
        let more = PassEnded {
            replayed: 40,
            limit_reached: false,
        };
        assert_eq!(running.next(more), Running);
        let empty = PassEnded {
            replayed: 0,
            limit_reached: false,
        };
        assert_eq!(running.next(empty), Completed);
        let limit = PassEnded {
            replayed: 3,
            limit_reached: true,
        };
        assert_eq!(running.next(limit), Completed);
    }

    #[test]
    fn suspend_pauses_and_start_resumes_but_final_phases_never_change() {
        assert_eq!(Running.next(Suspend), Suspended);
        assert_eq!(Pending.next(Suspend), Suspended);
        assert_eq!(Suspended.next(Start), Running);
        assert_eq!(Running.next(KillSwitch), Stopped);
        assert_eq!(Pending.next(Fail), Failed);
        for done in [Completed, Stopped, Failed] {
            assert!(done.is_final());
            for event in [Start, Suspend, KillSwitch, Fail] {
                assert_eq!(done.next(event), done, "{done:?} after {event:?}");
            }
        }
        assert!(!Suspended.is_final() && !Running.is_final() && !Pending.is_final());
    }

    #[test]
    fn the_spec_reads_as_users_write_it() {
        let yaml = "pipelineRef: {name: notes}\nselection: {reason: max-attempts, errorMatches: timeout, limit: 500}\nrate: 200\nstopWhen: {failedAgainPercent: 10, window: 5m}\n";
        let spec: DeadLetterReplaySpec = serde_saphyr::from_str(yaml).expect("spec");
        assert_eq!(spec.pipeline_ref.name, "notes");
        assert_eq!(spec.selection.limit, Some(500));
        assert_eq!(spec.rate, Some(200));
        let stop = spec.stop_when.expect("stopWhen");
        assert_eq!(stop.failed_again_percent, 10.0);
        assert_eq!(stop.window.as_millis(), 300_000);
        assert!(!spec.suspend);
    }

    /// The CRD's rules as the API server evaluates them (kube-cel): `pipelineRef` and
    /// `selection` cannot change on update; `suspend` and `rate` can.
    #[test]
    fn the_pipeline_and_the_selection_cannot_change_but_suspend_can() {
        use kube::CustomResourceExt;
        use serde_json::json;
        let crd = DeadLetterReplay::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema");
        let schema = serde_json::to_value(schema).expect("json");
        let object = |spec: serde_json::Value| {
            json!({"apiVersion": "msgpipe.io/v1alpha1", "kind": "DeadLetterReplay",
                   "metadata": {"name": "r", "namespace": "a"}, "spec": spec})
        };
        let old = object(json!({"pipelineRef": {"name": "notes"}, "selection": {"limit": 10}}));
        let check = |new: &serde_json::Value| {
            kube_cel::Validator::new()
                .validate(&schema, new, Some(&old))
                .map_err(|errors| errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        };
        let suspended = object(
            json!({"pipelineRef": {"name": "notes"}, "selection": {"limit": 10}, "suspend": true, "rate": 5}),
        );
        assert_eq!(check(&suspended), Ok(()));
        for changed in [
            json!({"pipelineRef": {"name": "orders"}, "selection": {"limit": 10}}),
            json!({"pipelineRef": {"name": "notes"}, "selection": {"limit": 11}}),
        ] {
            let errors = check(&object(changed)).expect_err("refused");
            assert!(
                errors.iter().any(|e| e.contains("cannot change")),
                "{errors:?}"
            );
        }
    }
}
