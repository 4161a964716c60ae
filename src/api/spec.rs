//! `MessagePipeline` v1alpha1: what the user writes.
//!
//! Doc comments here become the CRD's descriptions (`kubectl explain messagepipeline.spec`).
//! Constraints the schema can state are attributes here; [`super::validate`] checks the same
//! bounds in Rust (from the same constants) so `msgpipe render`/`apply` refuse what the API
//! server would.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::{Duration, duration_pattern};
use super::status::MessagePipelineStatus;

/// Most deliveries a message may get before it is dead-lettered.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Backoff multiplier bounds.
pub const MULTIPLIER_MIN: f64 = 1.0;
pub const MULTIPLIER_MAX: f64 = 10.0;
/// Longest RabbitMQ name (queues, exchanges, routing keys, vhosts), in bytes.
pub const RABBIT_NAME_MAX_BYTES: usize = 255;
/// Longest client retry interval (one day).
pub const RETRY_INTERVAL_MAX_SECONDS: u32 = 86_400;

/// CEL rule shared by every RabbitMQ object name the user may set.
const NOT_RESERVED_RULE: &str = "!self.startsWith('amq.')";
/// CEL rule: no control characters (what `char::is_control` refuses), like the operator.
const NO_CONTROL_RULE: &str = r"!self.matches('[\\x00-\\x1f\\x7f-\\x9f]')";
/// Longest queue name: `<queue>.retry`, the retry exchange, must fit in 255 bytes too.
pub const QUEUE_NAME_MAX_BYTES: usize = RABBIT_NAME_MAX_BYTES - ".retry".len();

/// CEL: milliseconds of the duration string `$field` (Kubernetes' `findAll`/`find`/`sum`;
/// CEL's own `duration()` knows no `d` unit). Only ever evaluated behind a
/// `matches(DURATION_PATTERN)` guard, so `int()` never sees more than 10 digits and the sum
/// stays far inside int64.
macro_rules! millis {
    ($($field:literal),+) => {
        concat!(
            $($field,)+
            ".findAll('[0-9]+(ms|s|m|h|d)').map(p, int(p.find('[0-9]+')) * (p.endsWith('ms') ? 1 : p.endsWith('s') ? 1000 : p.endsWith('m') ? 60000 : p.endsWith('h') ? 3600000 : 86400000)).sum()"
        )
    };
}

/// CEL: `$field` is absent, refused by the pattern already (that error suffices), or a
/// message TTL RabbitMQ accepts: 1ms to 2^32-1 ms.
macro_rules! ttl_rule {
    ($field:literal) => {
        concat!(
            "!has(self.",
            $field,
            ") || !self.",
            $field,
            ".matches('",
            duration_pattern!(),
            "') || (",
            millis!("self.", $field),
            " >= 1 && ",
            millis!("self.", $field),
            " <= 4294967295)"
        )
    };
}

/// Message of the TTL rules.
const TTL_MESSAGE: &str =
    "must be between 1ms and 4294967295ms (about 49.7 days): RabbitMQ's longest message TTL";

/// A MessagePipeline declares one work queue on RabbitMQ and everything that keeps its
/// messages from being lost: retry queues with exponential backoff, a dead-letter exchange
/// and queue, Prometheus alerts, and a ConfigMap of client settings.
// Several printcolumns share `type_ = "integer"`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "msgpipe.io",
    version = "v1alpha1",
    kind = "MessagePipeline",
    plural = "messagepipelines",
    shortname = "mpipe",
    namespaced,
    status = "MessagePipelineStatus",
    doc = "A MessagePipeline declares a RabbitMQ work queue with retry tiers, a dead-letter queue, alerts and client settings; msgpipe keeps them true to the spec.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Queue",
        type_ = "integer",
        json_path = ".status.queueMessages",
        description = "Messages in the work queue"
    ),
    printcolumn(
        name = "DLQ",
        type_ = "integer",
        json_path = ".status.deadLetterMessages",
        description = "Messages in the dead-letter queue"
    ),
    printcolumn(
        name = "Retry Tiers",
        type_ = "integer",
        json_path = ".status.retryTiers",
        description = "Number of retry queues"
    ),
    printcolumn(
        name = "Migration",
        type_ = "string",
        json_path = ".status.migration.phase",
        description = "Phase of the queue migration under way (empty when none)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.queue.name) || !has(self.deadLetter.queue) || self.deadLetter.queue != self.queue.name",
        "message": "must differ from queue.name: each queue of a pipeline needs its own name",
        "fieldPath": ".deadLetter.queue"
    },
    {
        "rule": "!has(self.queue.exchange) || !has(self.deadLetter.exchange) || self.deadLetter.exchange != self.queue.exchange",
        "message": "must differ from queue.exchange: each exchange of a pipeline needs its own name",
        "fieldPath": ".deadLetter.exchange"
    },
    {
        "rule": "!has(self.queue.name) || !has(self.queue.exchange) || (self.queue.exchange != self.queue.name + '.retry' && (has(self.deadLetter.exchange) || self.queue.exchange != self.queue.name + '.dlx'))",
        "message": "is the name of another exchange of this pipeline (the retry exchange <queue>.retry, or the default dead-letter exchange <queue>.dlx)",
        "fieldPath": ".queue.exchange"
    },
    {
        "rule": "!has(self.queue.name) || !has(self.deadLetter.exchange) || (self.deadLetter.exchange != self.queue.name + '.retry' && (has(self.queue.exchange) || self.deadLetter.exchange != self.queue.name + '.work'))",
        "message": "is the name of another exchange of this pipeline (the retry exchange <queue>.retry, or the default work exchange <queue>.work)",
        "fieldPath": ".deadLetter.exchange"
    }
]))]
pub struct MessagePipelineSpec {
    /// Which RabbitMQ broker to provision on.
    pub broker: BrokerSpec,
    /// The work queue consumers read from, and the exchange publishers write to.
    #[serde(default)]
    pub queue: QueueSpec,
    /// How often, and after which delays, a failed message is retried.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Where messages go once every attempt has failed.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// Prometheus alerts on the dead-letter queue and the work queue (a PrometheusRule).
    #[serde(default)]
    pub alerts: AlertsSpec,
    /// Feature flags for clients, published in the `<name>-client` ConfigMap.
    #[serde(default)]
    pub client_flags: ClientFlags,
    /// What happens on the broker when this object is deleted. Retain (default) leaves every
    /// queue and exchange; Delete removes them, except queues that still hold messages.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Full (default) creates and changes broker objects, the ConfigMap and the alerts.
    /// Observe only reads the broker and reports in `status.differences` what differs from
    /// this spec and what Full would do; it writes nothing (docs/adoption.md).
    #[serde(default)]
    pub management_policy: ManagementPolicy,
}

/// Connection to the broker: a MessageBroker the platform team shares (`brokerRef`), or a
/// Secret of this namespace (`secretRef`); exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretRef) != has(self.brokerRef)",
    "message": "set exactly one of secretRef (a Secret of this namespace) and brokerRef (a MessageBroker)"
}]))]
pub struct BrokerSpec {
    /// Secret in the same namespace with key `uri` (amqp[s]://user:pass@host:port/vhost,
    /// required), and optionally `managementUri` (http[s]://host:15672) and `ca.crt`. The
    /// operator may be installed without permission to read tenant Secrets (chart value
    /// `brokers.secretRefs: false`): then only `brokerRef` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// A cluster-scoped MessageBroker that admits this namespace. The vhost defaults to the
    /// one the broker grants this namespace; `vhost` may name another it grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_ref: Option<BrokerRef>,
    /// Virtual host to use; overrides the vhost in the Secret's uri (with `brokerRef`: one the
    /// broker grants this namespace). Default: the uri's vhost, else "/" (with `brokerRef`:
    /// the namespace's own vhost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES))]
    pub vhost: Option<String>,
}

/// Reference to a cluster-scoped MessageBroker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BrokerRef {
    /// Name of the MessageBroker.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Reference to a Secret in the pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The work queue and its exchange.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue name. Default: metadata.name. At most 249 bytes (the retry exchange
    /// `<queue>.retry` is a RabbitMQ name too); may not start with "amq.".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [
        {"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"},
        {"rule": NO_CONTROL_RULE, "message": "must not contain control characters"},
        {"rule": "bytes(self).size() <= 249", "message": "must be at most 249 bytes: the retry exchange <queue>.retry must fit RabbitMQ's 255"},
    ]))]
    pub name: Option<String>,
    /// Queue type: quorum (default; replicated, at-least-once dead-lettering) or classic;
    /// the DLQ and the retry queues take it too. A change on a live pipeline is a
    /// migration: the operator moves the queues to the new type without losing a message
    /// (progress in status.migration; docs/migration.md). A change made while a migration
    /// runs waits: that one finishes, then the next starts.
    #[serde(default, rename = "type")]
    pub queue_type: QueueType,
    /// Work exchange (direct) publishers send to. Default: "<queue>.work".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [
        {"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"},
        {"rule": NO_CONTROL_RULE, "message": "must not contain control characters"},
    ]))]
    pub exchange: Option<String>,
    /// Routing key binding the work exchange to the queue. Default: the queue name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = RABBIT_NAME_MAX_BYTES))]
    pub routing_key: Option<String>,
    /// Most messages the queue holds; past it, publishes are refused (publishers see a nack)
    /// rather than old messages dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<u64>,
}

/// RabbitMQ queue type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// Retry policy: attempt k (k = 1 .. maxAttempts-1) waits
/// min(initialDelay * multiplier^(k-1), maxDelay) before the next delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Deliveries before a message is dead-lettered; 1 means no retry.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = MAX_ATTEMPTS_LIMIT))]
    pub max_attempts: u32,
    /// Exponential backoff between attempts.
    #[serde(default)]
    pub backoff: BackoffSpec,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: BackoffSpec::default(),
        }
    }
}

fn default_max_attempts() -> u32 {
    5
}

/// Exponential backoff. Each distinct delay gets its own retry queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": ttl_rule!("initialDelay"), "message": TTL_MESSAGE, "fieldPath": ".initialDelay"},
    {"rule": ttl_rule!("maxDelay"), "message": TTL_MESSAGE, "fieldPath": ".maxDelay"},
    {
        "rule": concat!(
            "!has(self.initialDelay) || !has(self.maxDelay) || !self.initialDelay.matches('", duration_pattern!(),
            "') || !self.maxDelay.matches('", duration_pattern!(), "') || ",
            millis!("self.maxDelay"), " >= ", millis!("self.initialDelay")
        ),
        "message": "maxDelay must be >= initialDelay",
        "fieldPath": ".maxDelay"
    }
]))]
pub struct BackoffSpec {
    /// Delay before the second attempt (e.g. 500ms, 1s). At least 1ms.
    #[serde(default = "default_initial_delay")]
    pub initial_delay: Duration,
    /// Factor applied to the delay after each failed attempt (1 to 10; 1 = constant delay).
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = MULTIPLIER_MIN, max = MULTIPLIER_MAX))]
    pub multiplier: f64,
    /// Upper bound for any delay; attempts whose delay is capped share the last retry queue.
    #[serde(default = "default_max_delay")]
    pub max_delay: Duration,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial_delay: default_initial_delay(),
            multiplier: default_multiplier(),
            max_delay: default_max_delay(),
        }
    }
}

fn default_initial_delay() -> Duration {
    Duration::from_secs(1)
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_max_delay() -> Duration {
    Duration::from_secs(60)
}

/// The dead-letter exchange and queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": ttl_rule!("retention"), "message": TTL_MESSAGE, "fieldPath": ".retention"}
]))]
pub struct DeadLetterSpec {
    /// Dead-letter exchange (fanout: everything sent to it lands in the DLQ). Default: "<queue>.dlx".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [
        {"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"},
        {"rule": NO_CONTROL_RULE, "message": "must not contain control characters"},
    ]))]
    pub exchange: Option<String>,
    /// Dead-letter queue. Default: "<queue>.dlq".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [
        {"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"},
        {"rule": NO_CONTROL_RULE, "message": "must not contain control characters"},
    ]))]
    pub queue: Option<String>,
    /// How long a dead letter is kept before RabbitMQ discards it (e.g. 14d). Default: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    /// Most dead letters kept; past it, new dead letters are refused rather than old ones dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<u64>,
}

/// Prometheus alerting (written as a prometheus-operator PrometheusRule `<name>-alerts`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertsSpec {
    /// Write the PrometheusRule at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Labels on the PrometheusRule object itself, so Prometheus's ruleSelector picks it up
    /// (e.g. release: kube-prometheus-stack).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rule_labels: BTreeMap<String, String>,
    /// Labels on every alert, for Alertmanager routing (e.g. team: notes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Dead-letter queue holds more than `threshold` messages for `for`.
    #[serde(default)]
    pub dlq_depth: DepthAlert,
    /// Dead-letter queue still growing over `for`. Enabled when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_growth: Option<WindowAlert>,
    /// Work queue holds more than `threshold` messages for `for`. Enabled when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<BacklogAlert>,
    /// Work queue has messages but no consumer for `for`. Enabled when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_consumer: Option<WindowAlert>,
    /// The dead-letter queue's metric is absent for `for`: scraping broke and every other
    /// alert is blind. Enabled when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_missing: Option<WindowAlert>,
    /// Link put in every alert's runbook_url annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub runbook_url: Option<String>,
    /// Metric family scraped from RabbitMQ: perObject (rabbitmq_queue_*, from /metrics/per-object)
    /// or detailed (rabbitmq_detailed_queue_*, from /metrics/detailed).
    #[serde(default)]
    pub metrics: MetricsFlavor,
    /// Extra label matchers added to every expression (e.g. rabbitmq_cluster: prod).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Work-queue deliveries keep failing into the retry tiers. Enabled when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_storm: Option<super::notify::RetryStormAlert>,
    /// Who is told when these alerts fire: Slack, PagerDuty or email receivers, written as a
    /// prometheus-operator AlertmanagerConfig `<name>-notify`. Secrets are referenced, never copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub notify: Vec<super::notify::NotifyReceiver>,
}

impl Default for AlertsSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            rule_labels: BTreeMap::new(),
            labels: BTreeMap::new(),
            dlq_depth: DepthAlert::default(),
            dlq_growth: None,
            backlog: None,
            no_consumer: None,
            metrics_missing: None,
            runbook_url: None,
            metrics: MetricsFlavor::default(),
            selector: BTreeMap::new(),
            retry_storm: None,
            notify: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Fires when a queue holds more than `threshold` messages for `for`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct DepthAlert {
    /// Message count that must be exceeded.
    #[serde(default = "default_threshold")]
    pub threshold: u64,
    /// How long the condition must hold before the alert fires.
    #[serde(default = "default_alert_for", rename = "for")]
    pub for_: Duration,
    /// Value of the alert's severity label.
    #[serde(default = "default_severity")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$"))]
    pub severity: String,
}

impl Default for DepthAlert {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
            for_: default_alert_for(),
            severity: default_severity(),
        }
    }
}

/// Fires when the work queue holds more than `threshold` messages for `for`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BacklogAlert {
    /// Message count that must be exceeded.
    #[serde(default = "default_backlog_threshold")]
    pub threshold: u64,
    /// How long the condition must hold before the alert fires.
    #[serde(default = "default_backlog_for", rename = "for")]
    pub for_: Duration,
    /// Value of the alert's severity label.
    #[serde(default = "default_warning")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$"))]
    pub severity: String,
}

fn default_backlog_threshold() -> u64 {
    10_000
}

fn default_backlog_for() -> Duration {
    Duration::from_secs(600)
}

/// Fires when a condition holds for `for`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct WindowAlert {
    /// How long the condition must hold before the alert fires.
    #[serde(default = "default_alert_for", rename = "for")]
    pub for_: Duration,
    /// Value of the alert's severity label.
    #[serde(default = "default_warning")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$"))]
    pub severity: String,
}

fn default_threshold() -> u64 {
    100
}

fn default_alert_for() -> Duration {
    Duration::from_secs(300)
}

fn default_severity() -> String {
    "critical".into()
}

fn default_warning() -> String {
    "warning".into()
}

/// Which RabbitMQ metric names the alerts use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MetricsFlavor {
    #[default]
    PerObject,
    Detailed,
}

/// Client feature flags, after the seed article's `features` block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientFlags {
    /// Clients resend messages saved in their local outbox.
    #[serde(default = "default_true")]
    pub retry_pending: bool,
    /// Seconds between resend rounds of the local outbox.
    #[serde(default = "default_retry_interval")]
    #[schemars(range(min = 1, max = RETRY_INTERVAL_MAX_SECONDS))]
    pub retry_interval_seconds: u32,
}

impl Default for ClientFlags {
    fn default() -> Self {
        Self {
            retry_pending: true,
            retry_interval_seconds: default_retry_interval(),
        }
    }
}

fn default_retry_interval() -> u32 {
    120
}

/// What deleting the MessagePipeline does on the broker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// How much of the pipeline msgpipe manages (Crossplane's management policies, in two steps).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ManagementPolicy {
    /// Create, change and (with `deletionPolicy: Delete`) delete what msgpipe owns.
    #[default]
    Full,
    /// Read and report only: no broker write, no ConfigMap, PrometheusRule or
    /// AlertmanagerConfig.
    Observe,
}

/// The CRD's CEL rules evaluated as the API server would (Kubernetes' CEL libraries, schema
/// defaults applied first), with `kube-cel`, and checked against the operator's own checks:
/// admission refuses what the operator would, and never what it accepts.
#[cfg(test)]
mod admission_tests {
    use kube::CustomResourceExt;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::DURATION_PATTERN;
    use crate::api::load::pipeline_from_value;

    fn schema() -> Value {
        let crd = MessagePipeline::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema");
        serde_json::to_value(schema).expect("json")
    }

    /// A pipeline as `kubectl apply` sends it: `spec` merged over a minimal valid one.
    fn object(spec: Value) -> Value {
        let mut base = json!({"broker": {"secretRef": {"name": "s"}}});
        merge(&mut base, spec);
        json!({"apiVersion": "msgpipe.io/v1alpha1", "kind": "MessagePipeline",
               "metadata": {"name": "notes", "namespace": "a"}, "spec": base})
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(into), Value::Object(from)) => {
                for (key, value) in from {
                    merge(into.entry(key).or_insert(Value::Null), value);
                }
            }
            (into, from) => *into = from,
        }
    }

    /// Every CEL rule failure (or evaluation error) for `object`, updating `old` if given.
    fn cel(object: &Value, old: Option<&Value>) -> Vec<String> {
        match kube_cel::Validator::new().validate(&schema(), object, old) {
            Ok(()) => vec![],
            Err(errors) => errors
                .iter()
                .map(|e| format!("{:?} {}", e.kind, e))
                .collect(),
        }
    }

    /// Whether msgpipe itself accepts the object (parse, validate, plan).
    fn operator_accepts(object: &Value) -> bool {
        pipeline_from_value(object.clone())
            .ok()
            .is_some_and(|p| crate::plan::plan(&p, None).is_ok())
    }

    /// Every schema node with its JSON path, depth first.
    fn nodes<'a>(
        node: &'a kube_cel::CompiledSchema,
        path: String,
        out: &mut Vec<(String, &'a kube_cel::CompiledSchema)>,
    ) {
        out.push((path.clone(), node));
        for (name, child) in &node.properties {
            nodes(child, format!("{path}.{name}"), out);
        }
        if let Some(items) = &node.items {
            nodes(items, format!("{path}[]"), out);
        }
        if let Some(values) = &node.additional_properties {
            nodes(values, format!("{path}.*"), out);
        }
    }

    /// Every rule of the CRD compiles, and none is estimated over the API server's cost
    /// budget (every string a rule reads has a maxLength).
    #[test]
    fn every_rule_compiles_within_the_cost_budget() {
        let compiled = kube_cel::compile_schema(&schema());
        let mut all = Vec::new();
        nodes(&compiled, String::new(), &mut all);
        let mut rules = 0;
        for (path, node) in all {
            let errors: Vec<String> = node
                .compilation_errors()
                .iter()
                .map(|e| format!("{e:?}"))
                .collect();
            assert!(errors.is_empty(), "{path}: {errors:#?}");
            for result in node.validations.iter().flatten() {
                rules += 1;
                let warnings = kube_cel::estimate_rule_cost(&result.rule.rule, node);
                assert!(
                    warnings
                        .iter()
                        .all(|w| w.kind != kube_cel::WarningKind::CostExceeded),
                    "{path}: {warnings:?}"
                );
            }
        }
        // amq. and control characters on 4 names, 249 bytes, 3 backoff, 1 retention, 4 spec,
        // one channel per notify receiver, one broker reference.
        assert_eq!(rules, 4 * 2 + 1 + 3 + 1 + 4 + 1 + 1);
        assert!(cel(&object(json!({})), None).is_empty());
    }

    #[test]
    fn a_pipeline_names_exactly_one_of_a_secret_and_a_message_broker() {
        let with_broker = |broker: Value| {
            let mut pipeline = object(json!({}));
            pipeline["spec"]["broker"] = broker;
            pipeline
        };
        let broker_ref = with_broker(json!({"brokerRef": {"name": "shared"}}));
        assert!(cel(&broker_ref, None).is_empty());
        assert!(operator_accepts(&broker_ref));
        for wrong in [
            json!({"brokerRef": {"name": "shared"}, "secretRef": {"name": "s"}}),
            json!({"vhost": "a"}),
        ] {
            let object = with_broker(wrong);
            let errors = cel(&object, None);
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("set exactly one of secretRef")),
                "{errors:?}"
            );
            assert!(!operator_accepts(&object), "msgpipe refuses it too");
        }
    }

    #[test]
    fn ttls_are_admitted_up_to_rabbitmqs_limit_and_refused_beyond_it() {
        let cases = [
            ("49d", true),
            ("50d", false),
            ("4294967295ms", true),
            ("4294967296ms", false),
            ("1193h2m47s295ms", true),
            ("1193h2m47s296ms", false),
            ("1ms", true),
            ("0s", false),
            ("9999999999d9999999999d", false),
        ];
        for (retention, admitted) in cases {
            let pipeline = object(json!({"deadLetter": {"retention": retention}}));
            let errors = cel(&pipeline, None);
            assert_eq!(
                errors.is_empty(),
                admitted,
                "retention {retention}: {errors:?}"
            );
            assert_eq!(
                operator_accepts(&pipeline),
                admitted,
                "retention {retention}"
            );
            if !admitted {
                assert!(
                    errors[0].starts_with(
                        "ValidationFailure spec.deadLetter.retention: must be between 1ms"
                    ),
                    "{errors:?}"
                );
            }
            let pipeline = object(
                json!({"retry": {"backoff": {"initialDelay": retention, "maxDelay": "50d"}}}),
            );
            let errors = cel(&pipeline, None);
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("spec.retry.backoff.maxDelay: must be between")),
                "maxDelay 50d: {errors:?}"
            );
            assert_eq!(
                errors
                    .iter()
                    .any(|e| e.contains("spec.retry.backoff.initialDelay")),
                !admitted,
                "initialDelay {retention}: {errors:?}"
            );
        }
    }

    #[test]
    fn max_delay_below_initial_delay_is_refused_in_days_too() {
        for (initial, max, admitted) in [
            ("2d", "1d", false),
            ("1d", "25h", true),
            ("1500ms", "1s", false),
            ("1s", "1s", true),
            ("90s", "1m30s", true),
        ] {
            let pipeline =
                object(json!({"retry": {"backoff": {"initialDelay": initial, "maxDelay": max}}}));
            let errors = cel(&pipeline, None);
            assert_eq!(errors.is_empty(), admitted, "{initial}..{max}: {errors:?}");
            assert_eq!(operator_accepts(&pipeline), admitted, "{initial}..{max}");
            if !admitted {
                assert_eq!(
                    errors,
                    [
                        "ValidationFailure spec.retry.backoff.maxDelay: maxDelay must be >= initialDelay"
                    ]
                );
            }
        }
    }

    /// What the pattern refuses yields the pattern's error only: every CEL rule on a
    /// duration is guarded by the same pattern, so none fails or errors on top of it (no
    /// "type conversion error from 'string' to 'google.protobuf.Duration'").
    #[test]
    fn durations_the_pattern_refuses_raise_no_cel_error() {
        let pattern = regex::Regex::new(DURATION_PATTERN).expect("pattern");
        for bad in [
            "99999999999999999999d",
            "1x",
            "1.5s",
            "-1s",
            "abc",
            "12345678901ms",
            "5",
        ] {
            assert!(!pattern.is_match(bad), "{bad}");
            assert!(bad.parse::<crate::api::Duration>().is_err(), "{bad}");
            for spec in [
                json!({"deadLetter": {"retention": bad}}),
                json!({"retry": {"backoff": {"initialDelay": bad}}}),
                json!({"retry": {"backoff": {"maxDelay": bad}}}),
                json!({"retry": {"backoff": {"initialDelay": bad, "maxDelay": bad}}}),
            ] {
                let errors = cel(&object(spec.clone()), None);
                assert!(errors.is_empty(), "{spec}: {errors:?}");
            }
        }
        // The check above could fail: an unguarded rule does error on such a value.
        let unguarded = json!({"type": "object", "properties": {"d": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": "duration(self.d) > duration('0s')"}]});
        let errors = kube_cel::Validator::new()
            .validate(&unguarded, &json!({"d": "1x"}), None)
            .expect_err("an unguarded duration() fails on 1x");
        assert_eq!(
            errors[0].kind,
            kube_cel::ErrorKind::EvaluationError,
            "{errors:?}"
        );
    }

    #[test]
    fn a_queue_type_change_is_admitted_the_operator_migrates_it() {
        let quorum = object(json!({"queue": {"type": "quorum"}}));
        let defaulted = object(json!({}));
        let classic = object(json!({"queue": {"type": "classic"}}));
        assert!(cel(&classic, Some(&quorum)).is_empty());
        assert!(cel(&classic, Some(&defaulted)).is_empty());
        assert!(cel(&defaulted, Some(&classic)).is_empty());
        assert!(operator_accepts(&classic) && operator_accepts(&quorum));
        // No transition rule is left anywhere in the schema.
        let text = serde_json::to_string(&schema()).expect("schema");
        assert!(!text.contains("oldSelf"), "a transition rule is left");
    }

    #[test]
    fn names_two_objects_of_a_pipeline_would_share_are_refused() {
        let cases = [
            json!({"queue": {"name": "q"}, "deadLetter": {"queue": "q"}}),
            json!({"queue": {"exchange": "x"}, "deadLetter": {"exchange": "x"}}),
            json!({"queue": {"name": "q", "exchange": "q.retry"}}),
            json!({"queue": {"name": "q", "exchange": "q.dlx"}}),
            json!({"queue": {"name": "q"}, "deadLetter": {"exchange": "q.retry"}}),
            json!({"queue": {"name": "q"}, "deadLetter": {"exchange": "q.work"}}),
        ];
        for spec in cases {
            let pipeline = object(spec.clone());
            let errors = cel(&pipeline, None);
            assert_eq!(errors.len(), 1, "{spec}: {errors:?}");
            assert!(
                errors[0].starts_with("ValidationFailure spec."),
                "{errors:?}"
            );
            assert!(
                !operator_accepts(&pipeline),
                "the operator refuses {spec} too"
            );
        }
        for spec in [
            json!({"queue": {"name": "q", "exchange": "q.dlx"}, "deadLetter": {"exchange": "d"}}),
            json!({"queue": {"name": "q", "exchange": "w"}, "deadLetter": {"exchange": "q.work"}}),
            json!({"queue": {"name": "q"}, "deadLetter": {"queue": "q.dead"}}),
        ] {
            let pipeline = object(spec.clone());
            assert_eq!(cel(&pipeline, None), Vec::<String>::new(), "{spec}");
            assert!(operator_accepts(&pipeline), "{spec}");
        }
    }

    #[test]
    fn queue_names_are_counted_in_bytes_and_leave_room_for_the_retry_exchange() {
        let at =
            |name: String| object(json!({"queue": {"name": name}, "retry": {"maxAttempts": 1}}));
        let longest = at("q".repeat(QUEUE_NAME_MAX_BYTES));
        assert!(cel(&longest, None).is_empty());
        assert!(operator_accepts(&longest));
        for too_long in ["q".repeat(QUEUE_NAME_MAX_BYTES + 1), "é".repeat(125)] {
            let pipeline = at(too_long);
            let errors = cel(&pipeline, None);
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("spec.queue.name: must be at most 249 bytes")),
                "{errors:?}"
            );
            assert!(!operator_accepts(&pipeline));
        }
    }

    #[test]
    fn control_characters_in_names_are_refused() {
        for spec in [
            json!({"queue": {"name": "a\u{7}b"}}),
            json!({"queue": {"exchange": "a\nb"}}),
            json!({"deadLetter": {"queue": "a\u{85}b"}}),
        ] {
            let pipeline = object(spec.clone());
            let errors = cel(&pipeline, None);
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("must not contain control characters")),
                "{spec}: {errors:?}"
            );
            assert!(!operator_accepts(&pipeline), "{spec}");
        }
        assert!(cel(&object(json!({"queue": {"name": "notes é ✓"}})), None).is_empty());
    }

    /// Everything the operator accepts, admission accepts too: the shipped examples.
    #[test]
    fn every_example_is_admitted() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("examples") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for pipeline in crate::api::load::parse_pipelines(&text).expect("parses") {
                let value = serde_json::to_value(&pipeline).expect("json");
                assert_eq!(
                    cel(&value, None),
                    Vec::<String>::new(),
                    "{}",
                    path.display()
                );
                seen += 1;
            }
        }
        assert!(seen >= 3, "examples found: {seen}");
    }
}
