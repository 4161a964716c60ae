//! Adoption: from what runs on a vhost to MessagePipelines (`msgpipe import`).
//!
//! The planner in reverse, and as pure: [`import`] reads a [`VhostInventory`] (one read of
//! the vhost, made by the broker edge) and decides which queues are work queues, which are
//! their retry tiers and dead-letter queues, and what spec describes each work queue. What
//! it cannot express is never guessed silently: every pipeline carries [`Finding`]s, and the
//! ones of kind [`FindingKind::Unexpressed`] are printed as warnings too. Each pipeline is
//! planned and diffed against the same read with the reconciler's own diff, so the notes say
//! exactly what `msgpipe apply` of it would do.
//!
//! ```
//! use msgpipe::adopt::{ImportOptions, import};
//! use msgpipe::broker::inventory::{InventoryQueue, VhostInventory};
//!
//! let vhost = VhostInventory::new("/", "4.3.6")
//!     .exchange("orders", "direct")
//!     .queue("orders", InventoryQueue::quorum())
//!     .bind("orders", "orders", "orders");
//! let imported = import(&vhost, &ImportOptions::default());
//! assert_eq!(imported.pipelines[0].pipeline.spec.queue.exchange.as_deref(), Some("orders"));
//! ```

mod backoff;
mod document;
mod pipeline;
mod recognise;
#[cfg(test)]
mod tests;

use regex::Regex;
use serde::Serialize;

pub use backoff::{FittedBackoff, fit};
pub use document::{import_json, import_yaml};

use crate::api::MessagePipeline;
use crate::broker::inventory::VhostInventory;

/// Secret name put in `spec.broker.secretRef` when none is given.
pub const DEFAULT_SECRET_REF: &str = "rabbitmq-admin";

/// What an import produces besides the recognition itself.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// `metadata.namespace` of every pipeline.
    pub namespace: String,
    /// `spec.broker.secretRef.name` of every pipeline (unless `broker_ref` is set).
    pub secret_ref: String,
    /// `spec.broker.brokerRef.name` of every pipeline instead of a Secret: a platform-owned
    /// MessageBroker.
    pub broker_ref: Option<String>,
    /// Only work queues whose name this matches (unanchored, like grep).
    pub queue_filter: Option<Regex>,
    /// `alerts.enabled` of every pipeline (off by default: an import should not page anyone
    /// before the thresholds are chosen).
    pub alerts: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            namespace: crate::plan::DEFAULT_NAMESPACE.into(),
            secret_ref: DEFAULT_SECRET_REF.into(),
            broker_ref: None,
            queue_filter: None,
            alerts: false,
        }
    }
}

/// The result of importing one vhost.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Import {
    pub vhost: String,
    pub server_version: String,
    pub pipelines: Vec<ImportedPipeline>,
    /// Queues that are neither a work queue, nor a tier or DLQ of one, and why.
    pub skipped: Vec<Finding>,
}

/// One recognised work queue and the pipeline that describes it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportedPipeline {
    /// The work queue's name on the broker.
    pub queue: String,
    pub pipeline: MessagePipeline,
    /// Queues of the vhost this pipeline takes as its retry tiers (legacy names included).
    pub retry_queues: Vec<String>,
    pub dead_letter_queue: Option<String>,
    /// The work queue's type, messages (ready + unacknowledged) and consumers as read.
    pub queue_type: String,
    pub messages: u64,
    pub consumers: u64,
    pub findings: Vec<Finding>,
}

impl ImportedPipeline {
    /// The findings that say what the pipeline cannot express (printed as warnings).
    pub fn unexpressed(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.kind == FindingKind::Unexpressed)
    }
}

/// Something an import says about a queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub kind: FindingKind,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FindingKind {
    /// Where a field came from, how a value was mapped.
    Recognised,
    /// What the spec cannot say, or what adopting it changes or leaves behind.
    Unexpressed,
    /// What `msgpipe apply` of the pipeline would do on the vhost as it was read.
    Adoption,
}

impl Finding {
    pub fn recognised(text: impl Into<String>) -> Self {
        Self {
            kind: FindingKind::Recognised,
            text: text.into(),
        }
    }

    pub fn unexpressed(text: impl Into<String>) -> Self {
        Self {
            kind: FindingKind::Unexpressed,
            text: text.into(),
        }
    }

    pub fn adoption(text: impl Into<String>) -> Self {
        Self {
            kind: FindingKind::Adoption,
            text: text.into(),
        }
    }
}

/// Recognises the work queues of `inventory` and describes each as a MessagePipeline.
pub fn import(inventory: &VhostInventory, options: &ImportOptions) -> Import {
    recognise::Recognition::new(inventory).import(options)
}
