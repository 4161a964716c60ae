//! The planner: a pure function from a MessagePipeline to everything that should exist for
//! it — broker topology, PrometheusRule, AlertmanagerConfig, client ConfigMap. No IO, no
//! clients; the broker and kube edges compare this with what is live and act on the difference.

pub mod alerts;
pub mod client_config;
pub mod names;
pub mod notify;
pub mod ownership;
pub mod tiers;
pub mod topology;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::ConfigMap;
use msgpipe_client::PipelineConfig;
use serde::Serialize;

use crate::api::MessagePipeline;
use crate::api::validate::{FieldError, InvalidSpec, validate};
pub use alerts::PrometheusRule;
pub use names::PipelineNames;
pub use notify::AlertmanagerConfig;
pub use tiers::RetryTier;
pub use topology::DesiredTopology;

/// Namespace used when a manifest has none (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Vhost used when neither the spec nor the broker URI names one.
pub const DEFAULT_VHOST: &str = "/";
/// Label put on every object msgpipe writes.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "msgpipe");
/// Label naming the pipeline an object belongs to.
pub const PIPELINE_LABEL: &str = "msgpipe.io/pipeline";

/// Namespace and name of a pipeline; displays as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PipelineRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PipelineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything that should exist for one pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    pub pipeline: PipelineRef,
    pub names: PipelineNames,
    pub retry_tiers: Vec<RetryTier>,
    pub topology: DesiredTopology,
    /// None when `spec.alerts.enabled` is false.
    pub prometheus_rule: Option<PrometheusRule>,
    /// None when `spec.alerts.notify` is empty (or alerts are disabled).
    pub alertmanager_config: Option<AlertmanagerConfig>,
    pub client_config: PipelineConfig,
    pub config_map: ConfigMap,
    /// Queues and exchanges msgpipe did not create (annotation `msgpipe.io/adopted`): never
    /// deleted or retired.
    pub adopted: ownership::Adopted,
}

/// Plans a pipeline. `uri_vhost` is the vhost of the broker URI, if known; `spec.broker.vhost`
/// overrides it and `/` is the fallback.
pub fn plan(
    pipeline: &MessagePipeline,
    uri_vhost: Option<&str>,
) -> Result<DesiredState, InvalidSpec> {
    validate(pipeline)?;
    let spec = &pipeline.spec;
    let pipeline_ref = PipelineRef {
        namespace: pipeline
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        name: pipeline.metadata.name.clone().unwrap_or_default(),
    };
    let vhost = spec
        .broker
        .vhost
        .as_deref()
        .or(uri_vhost)
        .unwrap_or(DEFAULT_VHOST);
    let retry_tiers = tiers::retry_tiers(&spec.retry);
    let names = PipelineNames::resolve(pipeline, &retry_tiers)?;
    let topology = topology::desired_topology(spec, vhost, &names, &retry_tiers);
    let prometheus_rule = alerts::prometheus_rule(
        &pipeline_ref,
        &spec.alerts,
        vhost,
        &names,
        !retry_tiers.is_empty(),
    );
    let alertmanager_config = notify::alertmanager_config(&pipeline_ref, &spec.alerts);
    let client_config =
        client_config::pipeline_config(&pipeline_ref, spec, vhost, &names, &retry_tiers);
    let config_map = client_config::client_config_map(&pipeline_ref, &client_config)
        .map_err(|e| FieldError::new("spec", format!("cannot encode pipeline.json: {e}")))?;
    Ok(DesiredState {
        pipeline: pipeline_ref,
        names,
        retry_tiers,
        topology,
        prometheus_rule,
        alertmanager_config,
        client_config,
        config_map,
        adopted: ownership::Adopted::of(pipeline),
    })
}

/// Labels on every Kubernetes object msgpipe writes for a pipeline.
pub fn managed_labels(pipeline: &PipelineRef) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            MANAGED_BY_LABEL.0.to_string(),
            MANAGED_BY_LABEL.1.to_string(),
        ),
        (PIPELINE_LABEL.to_string(), pipeline.name.clone()),
    ])
}

#[cfg(test)]
mod tests;
