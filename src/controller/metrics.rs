//! The operator's own metrics, served on `/metrics` (OpenMetrics text).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// success, error, invalid_spec
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// exchange, queue, binding, policy (broker); configmap, prometheusrule, status (kube)
    pub kind: String,
    /// created, updated, bound, unbound, deleted, applied, ...
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    /// true, false
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    /// The DeadLetterReplay's namespace (not `namespace`: Prometheus' scrape puts the
    /// operator pod's own namespace there).
    pub msgpipe_namespace: String,
    /// The DeadLetterReplay's name.
    pub msgpipe_replay: String,
    /// replayed (a copy confirmed in the work queue, its dead letter removed), failed_again
    /// (a copy seen back in the DLQ).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// One step of a reconcile, [`Phase`].
    pub phase: String,
}

/// The steps of a reconcile whose time is recorded (`msgpipe_reconcile_phase_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Adding the cleanup finalizer to a new pipeline.
    Finalizer,
    /// Reading the broker reference (Secret, MessageBroker) and the current ConfigMap.
    Read,
    /// From joining the vhost's batch to its result (the batch's snapshot and writes).
    Broker,
    /// The PrometheusRule and AlertmanagerConfig (beside the broker pass).
    Alerts,
    /// Writing the client ConfigMap.
    ConfigMap,
    /// Writing the status.
    Status,
    /// Publishing events (after the status).
    Events,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Finalizer,
        Phase::Read,
        Phase::Broker,
        Phase::Alerts,
        Phase::ConfigMap,
        Phase::Status,
        Phase::Events,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Finalizer => "finalizer",
            Phase::Read => "read",
            Phase::Broker => "broker",
            Phase::Alerts => "alerts",
            Phase::ConfigMap => "configmap",
            Phase::Status => "status",
            Phase::Events => "events",
        }
    }
}

/// Counters and gauges of the controller, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    duration: Histogram,
    phases: Family<PhaseLabels, Histogram>,
    broker_writes: Family<WriteLabels, Counter>,
    kube_writes: Family<WriteLabels, Counter>,
    drift_repairs: Counter,
    pipelines: Family<ReadyLabels, Gauge>,
    replay_messages: Family<ReplayLabels, Counter>,
    /// Each pipeline's Ready state and how many are Ready (kept as they change, so a fleet
    /// of thousands is not counted again on every reconcile).
    ready_by_pipeline: Mutex<(HashMap<String, bool>, usize)>,
    reconcile_count: AtomicU64,
    kube_write_count: AtomicU64,
    broker_write_count: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("msgpipe");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(phase_histogram);
        registry.register(
            "reconcile_phase_seconds",
            "Time spent in each step of a reconcile (finalizer, read, broker, alerts, configmap, status, events)",
            phases.clone(),
        );
        let broker_writes = Family::<WriteLabels, Counter>::default();
        let kube_writes = Family::<WriteLabels, Counter>::default();
        let drift_repairs = Counter::default();
        let pipelines = Family::<ReadyLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "broker_writes",
            "Writes made to RabbitMQ, by object kind and verb",
            broker_writes.clone(),
        );
        registry.register(
            "kube_writes",
            "Writes made to the Kubernetes API, by object kind and verb",
            kube_writes.clone(),
        );
        registry.register(
            "drift_repairs",
            "Broker objects restored or corrected although the spec had not changed",
            drift_repairs.clone(),
        );
        registry.register(
            "pipelines",
            "MessagePipelines this operator reconciles, by Ready state",
            pipelines.clone(),
        );
        let replay_messages = Family::<ReplayLabels, Counter>::default();
        registry.register(
            "replay_messages",
            "Dead letters of DeadLetterReplays, by outcome: replayed, failed_again",
            replay_messages.clone(),
        );
        Self {
            registry,
            reconciles,
            replay_messages,
            duration,
            phases,
            broker_writes,
            kube_writes,
            drift_repairs,
            pipelines,
            ready_by_pipeline: Mutex::new((HashMap::new(), 0)),
            reconcile_count: AtomicU64::new(0),
            kube_write_count: AtomicU64::new(0),
            broker_write_count: AtomicU64::new(0),
        }
    }
}

/// 1 ms to ~16 s.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// One step of a reconcile took `took`.
    pub fn phase(&self, phase: Phase, took: Duration) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.name().into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn reconciled(&self, result: &str, took: Duration) {
        self.reconcile_count.fetch_add(1, Ordering::Relaxed);
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn broker_write(&self, kind: &str, verb: &str) {
        self.broker_write_count.fetch_add(1, Ordering::Relaxed);
        self.broker_writes
            .get_or_create(&WriteLabels {
                kind: kind.into(),
                verb: verb.into(),
            })
            .inc();
    }

    pub fn kube_write(&self, kind: &str, verb: &str) {
        self.kube_write_count.fetch_add(1, Ordering::Relaxed);
        self.kube_writes
            .get_or_create(&WriteLabels {
                kind: kind.into(),
                verb: verb.into(),
            })
            .inc();
    }

    pub fn drift_repaired(&self, objects: u64) {
        self.drift_repairs.inc_by(objects);
    }

    /// `count` dead letters of the replay `namespace/replay` had `outcome` (replayed,
    /// failed_again).
    pub fn replay_messages(&self, namespace: &str, replay: &str, outcome: &str, count: u64) {
        self.replay_messages
            .get_or_create(&ReplayLabels {
                msgpipe_namespace: namespace.into(),
                msgpipe_replay: replay.into(),
                outcome: outcome.into(),
            })
            .inc_by(count);
    }

    /// Total writes to Kubernetes so far (all kinds).
    pub fn kube_writes_total(&self) -> u64 {
        self.kube_write_count.load(Ordering::Relaxed)
    }

    /// Total writes to brokers so far (all kinds).
    pub fn broker_writes_total(&self) -> u64 {
        self.broker_write_count.load(Ordering::Relaxed)
    }

    /// Reconciles finished so far (every result).
    pub fn reconciles_total(&self) -> u64 {
        self.reconcile_count.load(Ordering::Relaxed)
    }

    /// (Ready, not Ready) pipelines, as `msgpipe_pipelines{ready}` reports them.
    pub fn ready_pipelines(&self) -> (usize, usize) {
        self.ready_by_pipeline
            .lock()
            .map_or((0, 0), |states| (states.1, states.0.len() - states.1))
    }

    /// Records a pipeline's Ready state (None: it is gone).
    pub fn set_ready(&self, pipeline: &str, ready: Option<bool>) {
        let Ok(mut guard) = self.ready_by_pipeline.lock() else {
            return;
        };
        let (states, ready_count) = &mut *guard;
        let before = match ready {
            Some(ready) => match states.get_mut(pipeline) {
                Some(state) => Some(std::mem::replace(state, ready)),
                None => {
                    states.insert(pipeline.to_string(), ready);
                    None
                }
            },
            None => states.remove(pipeline),
        };
        if before == Some(true) {
            *ready_count -= 1;
        }
        if ready == Some(true) {
            *ready_count += 1;
        }
        let ready = *ready_count;
        let not_ready = states.len() - ready;
        for (label, value) in [("true", ready), ("false", not_ready)] {
            self.pipelines
                .get_or_create(&ReadyLabels {
                    ready: label.into(),
                })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_ready_states_show_in_the_exposition() {
        let metrics = Metrics::default();
        metrics.broker_write("queue", "created");
        metrics.broker_write("queue", "created");
        metrics.kube_write("status", "applied");
        metrics.set_ready("a/x", Some(true));
        metrics.set_ready("a/y", Some(false));
        metrics.set_ready("a/y", Some(true));
        metrics.set_ready("a/z", Some(false));
        metrics.set_ready("a/z", None);
        metrics.replay_messages("notes-app", "after-incident", "replayed", 40);
        metrics.replay_messages("notes-app", "after-incident", "replayed", 2);
        let text = metrics.encode();
        assert!(
            text.contains(r#"msgpipe_replay_messages_total{msgpipe_namespace="notes-app",msgpipe_replay="after-incident",outcome="replayed"} 42"#),
            "{text}"
        );
        assert!(
            text.contains(r#"msgpipe_broker_writes_total{kind="queue",verb="created"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"msgpipe_pipelines{ready="true"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"msgpipe_pipelines{ready="false"} 0"#),
            "{text}"
        );
        assert_eq!(metrics.broker_writes_total(), 2);
        assert_eq!(metrics.kube_writes_total(), 1);
        assert_eq!(metrics.ready_pipelines(), (2, 0));
        // A Ready pipeline that goes away or turns not Ready leaves the count.
        metrics.set_ready("a/x", None);
        metrics.set_ready("a/y", Some(false));
        metrics.set_ready("a/y", Some(false));
        assert_eq!(metrics.ready_pipelines(), (0, 1));
        assert!(
            metrics
                .encode()
                .contains(r#"msgpipe_pipelines{ready="false"} 1"#),
            "{}",
            metrics.encode()
        );
        metrics.reconciled("ok", Duration::from_millis(3));
        metrics.reconciled("error", Duration::from_millis(3));
        assert_eq!(metrics.reconciles_total(), 2);
    }
}
