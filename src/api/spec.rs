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

use super::duration::Duration;
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
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
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
}

/// Connection to the broker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Secret in the same namespace with key `uri` (amqp[s]://user:pass@host:port/vhost,
    /// required), and optionally `managementUri` (http[s]://host:15672) and `ca.crt`.
    pub secret_ref: SecretRef,
    /// Virtual host to use; overrides the vhost in the Secret's uri. Default: the uri's vhost, else "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES))]
    pub vhost: Option<String>,
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
    /// Queue name. Default: metadata.name. At most 255 bytes; may not start with "amq.".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [{"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"}]))]
    pub name: Option<String>,
    /// Queue type: quorum (default; replicated, at-least-once dead-lettering) or classic.
    /// Cannot change once the queue exists.
    #[serde(default, rename = "type")]
    pub queue_type: QueueType,
    /// Work exchange (direct) publishers send to. Default: "<queue>.work".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [{"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"}]))]
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
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.initialDelay) || !has(self.maxDelay) || self.initialDelay.contains('d') || self.maxDelay.contains('d') || duration(self.maxDelay) >= duration(self.initialDelay)",
    "message": "maxDelay must be >= initialDelay"
}]))]
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
pub struct DeadLetterSpec {
    /// Dead-letter exchange (fanout: everything sent to it lands in the DLQ). Default: "<queue>.dlx".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [{"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"}]))]
    pub exchange: Option<String>,
    /// Dead-letter queue. Default: "<queue>.dlq".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES), extend("x-kubernetes-validations" = [{"rule": NOT_RESERVED_RULE, "message": "names starting with amq. are reserved by RabbitMQ"}]))]
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
