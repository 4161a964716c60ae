//! The objects a pipeline owns: ConfigMap `<name>-client`, PrometheusRule `<name>-alerts` and
//! AlertmanagerConfig `<name>-notify`.
//! Each is read first and written (server-side apply, owner reference to the pipeline) only
//! when it differs, so a converged pipeline costs reads and no writes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use msgpipe_client::config::{CONFIG_FILE_NAME, PipelineConfig};
use serde_json::Value;

use super::{FIELD_MANAGER, KubeError};
use crate::api::MessagePipeline;
use crate::plan::DesiredState;

/// What became of the pipeline's alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertsOutcome {
    /// The PrometheusRule matches the spec; `wrote` says whether it had to be written.
    Applied { wrote: bool },
    /// `alerts.enabled: false`; `deleted` says whether an old rule was removed.
    Disabled { deleted: bool },
    /// monitoring.coreos.com/v1 PrometheusRule is not served by this cluster.
    CrdMissing,
}

/// The PrometheusRule API, or None when its CRD is not installed (API discovery, which
/// every authenticated client may read).
pub async fn prometheus_rule_api(client: &Client) -> Result<Option<ApiResource>, KubeError> {
    discover(client, "v1", "PrometheusRule", "prometheusrules").await
}

/// The AlertmanagerConfig API (monitoring.coreos.com/v1alpha1), or None when its CRD is not
/// installed.
pub async fn alertmanager_config_api(client: &Client) -> Result<Option<ApiResource>, KubeError> {
    discover(
        client,
        "v1alpha1",
        "AlertmanagerConfig",
        "alertmanagerconfigs",
    )
    .await
}

async fn discover(
    client: &Client,
    version: &str,
    kind: &str,
    plural: &str,
) -> Result<Option<ApiResource>, KubeError> {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", version, kind);
    let group_version = format!("monitoring.coreos.com/{version}");
    match client.list_api_group_resources(&group_version).await {
        Ok(list) if list.resources.iter().any(|r| r.name == plural) => {
            Ok(Some(ApiResource::from_gvk_with_plural(&gvk, plural)))
        }
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(source) => Err(KubeError::Api {
            operation: format!("discover the {group_version} API"),
            source,
        }),
    }
}

fn owner_reference(pipeline: &MessagePipeline) -> Option<OwnerReference> {
    pipeline.controller_owner_ref(&())
}

/// Whether `existing` already carries everything msgpipe would set.
fn is_current(
    existing_labels: &BTreeMap<String, String>,
    existing_owners: &[OwnerReference],
    desired_labels: &BTreeMap<String, String>,
    owner: Option<&OwnerReference>,
) -> bool {
    desired_labels
        .iter()
        .all(|(k, v)| existing_labels.get(k) == Some(v))
        && owner.is_none_or(|o| existing_owners.iter().any(|e| e.uid == o.uid))
}

/// ConfigMap `<name>-client` as it is now, if it exists.
pub async fn read_client_config(
    client: &Client,
    desired: &DesiredState,
) -> Result<Option<ConfigMap>, KubeError> {
    let namespace = &desired.pipeline.namespace;
    let name = desired.config_map.name_any();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get_opt(&name)
        .await
        .map_err(KubeError::api(format!("read ConfigMap {namespace}/{name}")))
}

/// The retry queues a client ConfigMap announces (none when it is absent or unreadable:
/// clients of such a ConfigMap know of no tier).
pub fn announced_retry_queues(config_map: Option<&ConfigMap>) -> BTreeSet<String> {
    config_map
        .and_then(|c| c.data.as_ref())
        .and_then(|data| data.get(CONFIG_FILE_NAME))
        .and_then(|json| serde_json::from_str::<PipelineConfig>(json).ok())
        .map(|config| config.retry.tiers.into_iter().map(|t| t.queue).collect())
        .unwrap_or_default()
}

/// Makes ConfigMap `<name>-client` (now `existing`, from [`read_client_config`]) hold the
/// planned `pipeline.json`; returns whether it wrote.
pub async fn apply_client_config(
    client: &Client,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    existing: Option<&ConfigMap>,
) -> Result<bool, KubeError> {
    let mut config_map = desired.config_map.clone();
    let namespace = desired.pipeline.namespace.clone();
    let name = config_map.name_any();
    let owner = owner_reference(pipeline);
    if let Some(existing) = existing
        && existing.data == config_map.data
        && is_current(
            existing.labels(),
            existing.owner_references(),
            config_map.labels(),
            owner.as_ref(),
        )
    {
        return Ok(false);
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    config_map.metadata.owner_references = owner.map(|o| vec![o]);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(KubeError::api(format!(
        "apply ConfigMap {namespace}/{name}"
    )))?;
    Ok(true)
}

/// Makes PrometheusRule `<name>-alerts` match the plan (or removes ours when alerts are off).
pub async fn apply_prometheus_rule(
    client: &Client,
    rule_api: Option<&ApiResource>,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
) -> Result<AlertsOutcome, KubeError> {
    let wanted = match &desired.prometheus_rule {
        Some(rule) => Some(Wanted::of(&rule.spec, &rule.metadata, rule)?),
        None => None,
    };
    let name = format!("{}-alerts", desired.pipeline.name);
    apply_owned(
        client,
        rule_api,
        pipeline,
        desired,
        "PrometheusRule",
        &name,
        wanted,
    )
    .await
}

/// Makes AlertmanagerConfig `<name>-notify` match `spec.alerts.notify` (or removes ours when
/// `notify` is gone).
pub async fn apply_alertmanager_config(
    client: &Client,
    config_api: Option<&ApiResource>,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
) -> Result<AlertsOutcome, KubeError> {
    let wanted = match &desired.alertmanager_config {
        Some(config) => Some(Wanted::of(&config.spec, &config.metadata, config)?),
        None => None,
    };
    let name = format!("{}-notify", desired.pipeline.name);
    apply_owned(
        client,
        config_api,
        pipeline,
        desired,
        "AlertmanagerConfig",
        &name,
        wanted,
    )
    .await
}

/// What msgpipe writes for one owned object: its spec and labels (compared with the live
/// object) and the whole object (applied).
struct Wanted {
    spec: Value,
    labels: BTreeMap<String, String>,
    object: Value,
}

impl Wanted {
    fn of(
        spec: &impl serde::Serialize,
        metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        object: &impl serde::Serialize,
    ) -> Result<Self, KubeError> {
        let encode = |e: serde_json::Error| KubeError::Api {
            operation: "encode an owned object".into(),
            source: kube::Error::SerdeError(e),
        };
        Ok(Self {
            spec: serde_json::to_value(spec).map_err(encode)?,
            labels: metadata.labels.clone().unwrap_or_default(),
            object: serde_json::to_value(object).map_err(encode)?,
        })
    }
}

/// Reads the owned object `name` and server-side applies it when it differs from `wanted`,
/// or deletes it (only when it is ours) when nothing is wanted.
async fn apply_owned(
    client: &Client,
    resource: Option<&ApiResource>,
    pipeline: &MessagePipeline,
    desired: &DesiredState,
    kind: &str,
    name: &str,
    wanted: Option<Wanted>,
) -> Result<AlertsOutcome, KubeError> {
    let Some(resource) = resource else {
        return Ok(match wanted {
            Some(_) => AlertsOutcome::CrdMissing,
            None => AlertsOutcome::Disabled { deleted: false },
        });
    };
    let namespace = desired.pipeline.namespace.clone();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, resource);
    let existing = api
        .get_opt(name)
        .await
        .map_err(KubeError::api(format!("read {kind} {namespace}/{name}")))?;
    let owner = owner_reference(pipeline);
    let Some(wanted) = wanted else {
        let ours = existing.as_ref().is_some_and(|e| {
            owner
                .as_ref()
                .is_some_and(|o| e.owner_references().iter().any(|r| r.uid == o.uid))
        });
        if ours {
            api.delete(name, &DeleteParams::default())
                .await
                .map_err(KubeError::api(format!("delete {kind} {namespace}/{name}")))?;
        }
        return Ok(AlertsOutcome::Disabled { deleted: ours });
    };
    if let Some(existing) = &existing
        && existing.data.get("spec") == Some(&wanted.spec)
        && is_current(
            existing.labels(),
            existing.owner_references(),
            &wanted.labels,
            owner.as_ref(),
        )
    {
        return Ok(AlertsOutcome::Applied { wrote: false });
    }
    let mut object = wanted.object;
    if let Some(owner) = owner {
        object["metadata"]["ownerReferences"] = serde_json::json!([owner]);
    }
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .map_err(KubeError::api(format!("apply {kind} {namespace}/{name}")))?;
    Ok(AlertsOutcome::Applied { wrote: true })
}
