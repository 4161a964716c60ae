//! Which broker a pipeline uses: a Secret of its own namespace (`spec.broker.secretRef`), or a
//! cluster-scoped MessageBroker that admits its namespace (`spec.broker.brokerRef`), whose
//! credentials the operator reads from its own namespace only. Admission itself is the pure
//! [`MessageBrokerSpec::admit`]; this module reads the objects it needs.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::KubeError;
use super::secret::{broker_endpoint, secret_text};
use crate::api::broker::{SECRET_PASSWORD_KEY, SECRET_USERNAME_KEY};
use crate::api::{MessageBroker, MessageBrokerSpec, MessagePipeline};
use crate::broker::{BrokerEndpoint, SECRET_CA_KEY};

/// Which broker references this operator accepts, as installed (chart values
/// `brokers.secretRefs` and `brokers.messageBrokers`), and its own namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAccess {
    /// Pipelines may name a Secret of their own namespace (the operator reads tenant Secrets).
    pub secret_refs: bool,
    /// Pipelines may name a MessageBroker (the operator reads MessageBrokers, Namespaces, and
    /// Secrets of its own namespace).
    pub message_brokers: bool,
    /// Where MessageBrokers' Secrets live.
    pub operator_namespace: String,
    /// The controller's MessageBrokers, once it watches them: read instead of a GET per
    /// reconcile. Empty (the CLI, one-off reconciles): a GET.
    pub cache: BrokerCache,
}

impl Default for BrokerAccess {
    fn default() -> Self {
        Self {
            secret_refs: true,
            message_brokers: true,
            operator_namespace: "msgpipe-system".into(),
            cache: BrokerCache::default(),
        }
    }
}

/// How long a reconcile waits for the controller's first list of MessageBrokers before it
/// reads the one it needs with a GET.
const CACHE_PATIENCE: Duration = Duration::from_secs(5);

/// The controller's reflector store of MessageBrokers, shared by every clone of a
/// [`BrokerAccess`]. Not configuration: any two compare equal.
#[derive(Clone, Default)]
pub struct BrokerCache(Arc<RwLock<Option<Store<MessageBroker>>>>);

impl BrokerCache {
    /// From now on, MessageBrokers are read from `store` (the controller's reflector).
    pub fn set(&self, store: Store<MessageBroker>) {
        if let Ok(mut cached) = self.0.write() {
            *cached = Some(store);
        }
    }

    /// The MessageBroker `name` from the store: `None` when there is no store or it has not
    /// listed yet (the caller reads it from the API), `Some(None)` when it does not exist.
    async fn get(&self, name: &str) -> Option<Option<MessageBroker>> {
        let store = self.0.read().ok()?.clone()?;
        match tokio::time::timeout(CACHE_PATIENCE, store.wait_until_ready()).await {
            Ok(Ok(())) => Some(store.get(&ObjectRef::new(name)).map(|b| (*b).clone())),
            _ => None,
        }
    }
}

impl std::fmt::Debug for BrokerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.read().is_ok_and(|s| s.is_some());
        write!(f, "BrokerCache({})", if set { "watched" } else { "none" })
    }
}

impl PartialEq for BrokerCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for BrokerCache {}

/// The broker a pipeline uses, and the vhost it gets unless `spec.broker.vhost` says otherwise.
#[derive(Clone, Debug)]
pub struct ResolvedBroker {
    pub endpoint: BrokerEndpoint,
    /// `secretRef`: the uri's vhost. `brokerRef`: the vhost the broker granted.
    pub vhost: String,
    /// The vhost may be created when missing (a MessageBroker with `createVhosts`, for the
    /// namespace's own vhost).
    pub create_vhost: bool,
}

/// Reads what `pipeline`'s broker reference needs and admits it, or says why not. Nothing is
/// read that the reference does not need: a `brokerRef` pipeline never causes a read of a
/// tenant Secret, and a refused one never a read of the broker's Secret.
pub async fn resolve_broker(
    client: &Client,
    access: &BrokerAccess,
    pipeline: &MessagePipeline,
) -> Result<ResolvedBroker, KubeError> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let spec = &pipeline.spec.broker;
    match (&spec.secret_ref, &spec.broker_ref) {
        (Some(secret), _) if access.secret_refs => {
            let endpoint = broker_endpoint(client, &namespace, &secret.name).await?;
            Ok(ResolvedBroker {
                vhost: endpoint.uri_vhost(),
                endpoint,
                create_vhost: false,
            })
        }
        (Some(_), _) => Err(KubeError::BrokerModeDisabled {
            field: "spec.broker.secretRef",
            why: "this operator is installed without access to tenant Secrets (chart value brokers.secretRefs=false); name a MessageBroker with spec.broker.brokerRef".into(),
        }),
        (None, Some(broker_ref)) if access.message_brokers => {
            let broker = match access.cache.get(&broker_ref.name).await {
                Some(cached) => cached,
                None => Api::<MessageBroker>::all(client.clone())
                    .get_opt(&broker_ref.name)
                    .await
                    .map_err(KubeError::api(format!(
                        "read MessageBroker {}",
                        broker_ref.name
                    )))?,
            }
            .ok_or_else(|| KubeError::BrokerMissing {
                name: broker_ref.name.clone(),
            })?;
            let labels = namespace_labels(client, &namespace).await?;
            let grant = broker.spec.admit(
                &broker_ref.name,
                &namespace,
                &labels,
                spec.vhost.as_deref(),
            )?;
            let endpoint = message_broker_endpoint(
                client,
                &access.operator_namespace,
                &broker.spec,
                &grant.vhost,
            )
            .await?;
            Ok(ResolvedBroker {
                endpoint,
                create_vhost: grant.own && broker.spec.tenants.create_vhosts,
                vhost: grant.vhost,
            })
        }
        (None, Some(_)) => Err(KubeError::BrokerModeDisabled {
            field: "spec.broker.brokerRef",
            why: "this operator is installed with MessageBrokers switched off (chart value brokers.messageBrokers=false); name a Secret with spec.broker.secretRef".into(),
        }),
        (None, None) => Err(KubeError::BrokerModeDisabled {
            field: "spec.broker",
            why: "set exactly one of secretRef and brokerRef".into(),
        }),
    }
}

/// The labels of `namespace` (read, never cached: a label change admits or refuses at the
/// next reconcile).
async fn namespace_labels(
    client: &Client,
    namespace: &str,
) -> Result<BTreeMap<String, String>, KubeError> {
    let meta = Api::<Namespace>::all(client.clone())
        .get_metadata(namespace)
        .await
        .map_err(KubeError::api(format!("read Namespace {namespace}")))?;
    Ok(meta.metadata.labels.unwrap_or_default())
}

/// The endpoint of a MessageBroker for `vhost`, with the credentials of its Secret (in the
/// operator's namespace).
pub async fn message_broker_endpoint(
    client: &Client,
    operator_namespace: &str,
    broker: &MessageBrokerSpec,
    vhost: &str,
) -> Result<BrokerEndpoint, KubeError> {
    let name = &broker.secret_ref.name;
    let secret = Api::<Secret>::namespaced(client.clone(), operator_namespace)
        .get_opt(name)
        .await
        .map_err(KubeError::api(format!(
            "read Secret {operator_namespace}/{name}"
        )))?
        .ok_or_else(|| KubeError::SecretMissing {
            namespace: operator_namespace.into(),
            name: name.clone(),
        })?;
    let invalid = |reason: String| KubeError::SecretInvalid {
        namespace: operator_namespace.into(),
        name: name.clone(),
        reason,
    };
    let data = secret_text(secret).map_err(invalid)?;
    endpoint_with_credentials(broker, &data, vhost).map_err(invalid)
}

/// `broker.uri` with the Secret's `username` and `password` and `vhost` as its path. An
/// error names a key or field, never a value.
pub fn endpoint_with_credentials(
    broker: &MessageBrokerSpec,
    data: &BTreeMap<String, String>,
    vhost: &str,
) -> Result<BrokerEndpoint, String> {
    let key = |k: &str| {
        data.get(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("the Secret has no key {k:?}"))
    };
    let (username, password) = (key(SECRET_USERNAME_KEY)?, key(SECRET_PASSWORD_KEY)?);
    let mut uri = url::Url::parse(broker.uri.trim())
        .map_err(|e| format!("spec.uri of the MessageBroker is not a URI: {e}"))?;
    uri.set_username(username)
        .and_then(|()| uri.set_password(Some(password)))
        .map_err(|()| "spec.uri of the MessageBroker has no host".to_string())?;
    uri.set_path(&utf8_percent_encode(vhost, NON_ALPHANUMERIC).to_string());
    BrokerEndpoint::new(
        uri.as_str(),
        broker.management_uri.as_deref(),
        data.get(SECRET_CA_KEY).cloned(),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretRef;

    fn broker(uri: &str) -> MessageBrokerSpec {
        MessageBrokerSpec {
            uri: uri.into(),
            management_uri: None,
            secret_ref: SecretRef {
                name: "admin".into(),
            },
            tenants: Default::default(),
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn credentials_and_the_granted_vhost_go_into_the_uri() {
        let endpoint = endpoint_with_credentials(
            &broker("amqp://rabbit.platform:5672"),
            &data(&[("username", "msgpipe"), ("password", "p@ss/w:rd")]),
            "team/a",
        )
        .expect("endpoint");
        assert_eq!(endpoint.uri_vhost(), "team/a");
        assert_eq!(endpoint.username(), "msgpipe");
        assert_eq!(endpoint.to_string(), "amqp://msgpipe@rabbit.platform:5672");
        assert!(!format!("{endpoint:?}").contains("p@ss"));
        let root = endpoint_with_credentials(
            &broker("amqp://rabbit.platform:5672/ignored"),
            &data(&[("username", "u"), ("password", "p")]),
            "/",
        )
        .expect("endpoint");
        assert_eq!(root.uri_vhost(), "/");
    }

    #[test]
    fn a_missing_key_is_named_and_no_value_is_shown() {
        let error = endpoint_with_credentials(
            &broker("amqp://rabbit.platform:5672"),
            &data(&[("username", "msgpipe")]),
            "a",
        )
        .expect_err("no password");
        assert_eq!(error, "the Secret has no key \"password\"");
    }
}
