//! `MessagePipeline` status: what the operator observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types the operator sets.
pub mod condition {
    /// Everything the spec asks for exists and matches.
    pub const READY: &str = "Ready";
    /// Broker objects (exchanges, queues, bindings, policies) match the spec.
    pub const BROKER_READY: &str = "BrokerReady";
    /// The PrometheusRule matches the spec (or alerts are disabled).
    pub const ALERTS_READY: &str = "AlertsReady";
}

/// Observed state of a MessagePipeline.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePipelineStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, BrokerReady and AlertsReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Messages in the work queue (ready + unacknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_messages: Option<u64>,
    /// Consumers attached to the work queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u64>,
    /// Messages in the dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_messages: Option<u64>,
    /// Number of retry queues (one per distinct backoff delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_tiers: Option<u32>,
    /// Messages waiting in each retry queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_queues: Vec<RetryQueueStatus>,
    /// The AlertmanagerConfig msgpipe keeps for `spec.alerts.notify` (`<name>-notify`), so
    /// that it is removed when `notify` goes away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager_config: Option<String>,
    /// The queue migration under way (a `spec.queue.type` change), or why it cannot start;
    /// absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// With `managementPolicy: Observe`: what differs between the broker and the spec, field
    /// by field, and what Full would do about it (at most 32; the BrokerReady message gives
    /// the total). Empty under Full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Difference>,
    /// When the broker was last read and reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
}

/// One difference between the broker and the spec, as `managementPolicy: Observe` reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Difference {
    /// The broker object, e.g. `queue orders`, `policy msgpipe.orders`, `binding orders -> orders (key "orders")`.
    pub object: String,
    /// The setting that differs, e.g. `arguments.x-dead-letter-exchange`,
    /// `definition.dead-letter-exchange`, or `exists`.
    pub field: String,
    /// The live value (JSON text), absent when the object or setting is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
    /// The value the spec asks for (JSON text), absent when the spec wants it gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// What Full would do: `would create policy msgpipe.orders`, `needs a migration`, ...
    pub action: String,
}

/// Live count of one retry queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryQueueStatus {
    /// Queue name (`<queue>.retry.<k>.<delay>`).
    pub name: String,
    /// Delay of this tier.
    pub delay: String,
    /// Messages waiting out their delay.
    pub messages: u64,
}

/// Progress of a queue migration run by the operator (docs/migration.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Holding, Draining, Replacing or Returning while it runs (the stages of
    /// docs/migration.md); Refused when it cannot start (the message says why), Failed when
    /// a step failed (it is started again, resuming from the broker's state).
    pub phase: String,
    /// The step under way, as `msgpipe migrate --dry-run` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The queues' type before the migration (classic or quorum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The type the queues are migrating to.
    pub to: String,
    /// Messages moved so far, both ways (into the holding queues and back).
    #[serde(default)]
    pub moved: u64,
    /// Ready messages left in the queue being drained now.
    #[serde(default)]
    pub remaining: u64,
    /// How messages move: shovel (RabbitMQ's dynamic shovel) or confirm (msgpipe's
    /// confirm-then-ack mover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover: Option<String>,
    /// When this operator started (or resumed) the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// One line on where it stands, or why it is refused or failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
