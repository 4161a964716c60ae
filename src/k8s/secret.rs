//! Reading a pipeline's broker Secret (keys `uri`, `managementUri`, `ca.crt`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::KubeError;
use crate::broker::BrokerEndpoint;

/// The broker a Secret points at. Its contents never appear in an error: only key names do.
pub async fn broker_endpoint(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<BrokerEndpoint, KubeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(KubeError::api(format!("read Secret {namespace}/{name}")))?
        .ok_or_else(|| KubeError::SecretMissing {
            namespace: namespace.into(),
            name: name.into(),
        })?;
    let invalid = |reason: String| KubeError::SecretInvalid {
        namespace: namespace.into(),
        name: name.into(),
        reason,
    };
    let data = secret_text(secret).map_err(invalid)?;
    BrokerEndpoint::from_secret_data(&data, None, None).map_err(|e| invalid(e.to_string()))
}

/// A Secret's `data` (decoded) and `stringData` as text. An error names the key, never a value.
pub fn secret_text(secret: Secret) -> Result<BTreeMap<String, String>, String> {
    let mut data = BTreeMap::new();
    for (key, bytes) in secret.data.unwrap_or_default() {
        let text =
            String::from_utf8(bytes.0).map_err(|_| format!("data.{key} is not UTF-8 text"))?;
        data.insert(key, text);
    }
    data.extend(secret.string_data.unwrap_or_default());
    Ok(data)
}
