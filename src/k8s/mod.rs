//! The Kubernetes edge: the broker Secret a pipeline names, the objects it owns (the client
//! ConfigMap and the PrometheusRule), and its status. Decisions about *what* to write are
//! made by the planner and [`crate::controller::status`]; this module only reads and writes.
//!
//! (Named `k8s` rather than `kube` so it never shadows the `kube` crate.)

mod broker;
mod owned;
pub mod rbac;
mod secret;

pub use broker::{
    BrokerAccess, ResolvedBroker, endpoint_with_credentials, message_broker_endpoint,
    resolve_broker,
};
pub use owned::{
    AlertsOutcome, alertmanager_config_api, announced_retry_queues, apply_alertmanager_config,
    apply_client_config, apply_prometheus_rule, prometheus_rule_api, read_client_config,
};
pub use secret::{broker_endpoint, secret_text};

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::{
    DeadLetterReplay, DeadLetterReplayStatus, MessagePipeline, MessagePipelineStatus,
};

/// Field manager of every server-side apply msgpipe makes.
pub const FIELD_MANAGER: &str = "msgpipe";

/// A failed Kubernetes read or write, naming the object and the step.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("broker Secret {namespace}/{name} does not exist")]
    SecretMissing { namespace: String, name: String },
    #[error("broker Secret {namespace}/{name} is invalid: {reason}")]
    SecretInvalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("MessageBroker {name} (spec.broker.brokerRef) does not exist")]
    BrokerMissing { name: String },
    #[error(transparent)]
    BrokerRefused(#[from] crate::api::broker::Refusal),
    #[error("{field} is not accepted: {why}")]
    BrokerModeDisabled { field: &'static str, why: String },
    #[error("cannot {operation}: {}", plain(source))]
    Api {
        operation: String,
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    pub(crate) fn api(operation: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let operation = operation.into();
        move |source| KubeError::Api { operation, source }
    }
}

/// A Kubernetes client error in words: the API server's own message, reason and code, never
/// the `Debug` dump kube's `Display` of an API error includes.
pub fn plain(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "forbidden: {} (the operator's ServiceAccount lacks this permission; grant it in the chart's RBAC)",
            or_reason(&status.message, "no message")
        ),
        kube::Error::Api(status) => format!(
            "{} ({}, HTTP {})",
            or_reason(&status.message, "no message"),
            or_reason(&status.reason, "no reason"),
            status.code
        ),
        other => other.to_string(),
    }
}

fn or_reason<'a>(text: &'a str, fallback: &'a str) -> &'a str {
    if text.trim().is_empty() {
        fallback
    } else {
        text
    }
}

/// Writes the pipeline's status with server-side apply: fields msgpipe stops setting (e.g.
/// retry queues of a removed tier) disappear instead of lingering as a merge patch would leave them.
pub async fn write_status(
    api: &Api<MessagePipeline>,
    pipeline: &MessagePipeline,
    status: &MessagePipelineStatus,
) -> Result<(), KubeError> {
    let name = pipeline.name_any();
    let patch = json!({
        "apiVersion": "msgpipe.io/v1alpha1",
        "kind": "MessagePipeline",
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(KubeError::api(format!(
        "write the status of MessagePipeline {}/{name}",
        pipeline.namespace().unwrap_or_default()
    )))?;
    Ok(())
}

/// Writes a DeadLetterReplay's status with server-side apply (the status subresource).
pub async fn write_replay_status(
    api: &Api<DeadLetterReplay>,
    name: &str,
    status: &DeadLetterReplayStatus,
) -> Result<(), KubeError> {
    let patch = json!({
        "apiVersion": "msgpipe.io/v1alpha1",
        "kind": "DeadLetterReplay",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(KubeError::api(format!(
        "write the status of DeadLetterReplay {}/{name}",
        api.namespace().unwrap_or_default()
    )))?;
    Ok(())
}
