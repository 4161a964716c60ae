//! `MessageBroker` v1alpha1 (cluster-scoped): a broker that the platform team owns and hands
//! out to tenant namespaces, the way cert-manager's ClusterIssuer hands out a CA. The
//! credentials stay in one Secret in the operator's own namespace; a pipeline names the broker
//! (`spec.broker.brokerRef`) and is admitted by rule: its namespace must match the broker's
//! namespace selector, and it may use only the vhosts the broker grants that namespace.
//!
//! Admission ([`MessageBrokerSpec::admit`]) is a pure function of the broker's spec, the
//! namespace's name and labels and the vhost the pipeline asks for, so every rule is tested
//! here with plain values.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::{RABBIT_NAME_MAX_BYTES, SecretRef};

/// The placeholder a vhost template replaces with the pipeline's namespace.
pub const NAMESPACE_PLACEHOLDER: &str = "{{namespace}}";
/// Default vhost template: each namespace gets the vhost of its own name.
pub const DEFAULT_VHOST_TEMPLATE: &str = NAMESPACE_PLACEHOLDER;
/// Keys of a MessageBroker's Secret.
pub const SECRET_USERNAME_KEY: &str = "username";
pub const SECRET_PASSWORD_KEY: &str = "password";

/// A RabbitMQ broker owned by the platform team and shared by tenant namespaces, each
/// confined to the vhosts the broker grants it.
// Several printcolumns share `type_ = "string"`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "msgpipe.io",
    version = "v1alpha1",
    kind = "MessageBroker",
    plural = "messagebrokers",
    shortname = "mbroker",
    status = "MessageBrokerStatus",
    doc = "A RabbitMQ broker shared by tenant namespaces: endpoints, and credentials in a Secret of the operator's own namespace; pipelines name it with spec.broker.brokerRef and get the vhosts it grants their namespace.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "URI", type_ = "string", json_path = ".spec.uri"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MessageBrokerSpec {
    /// AMQP endpoint, without credentials: amqp://host:5672 or amqps://host:5671. The path,
    /// if any, is ignored: the vhost comes from `tenants`.
    #[schemars(length(min = 1, max = 2048), extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('amqp://') || self.startsWith('amqps://')", "message": "must be an amqp:// or amqps:// URI"},
        {"rule": "!self.contains('@')", "message": "must not carry credentials: they belong in the Secret"},
    ]))]
    pub uri: String,
    /// Management API, http[s]://host:port. Default: the AMQP host on 15672 (15671 with TLS
    /// for amqps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('http://') || self.startsWith('https://')", "message": "must be an http:// or https:// URI"},
        {"rule": "!self.contains('@')", "message": "must not carry credentials: they belong in the Secret"},
    ]))]
    pub management_uri: Option<String>,
    /// Secret in the operator's own namespace with keys `username` and `password` (and
    /// `ca.crt`, a PEM CA for amqps/https, when the broker's certificate is not signed by a
    /// public CA). Tenants never read it.
    pub secret_ref: SecretRef,
    /// Which namespaces may use this broker, and which vhosts each one gets.
    #[serde(default)]
    pub tenants: TenantsSpec,
}

/// Which namespaces may use a broker, and the vhosts they get.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantsSpec {
    /// Namespaces whose labels match may use the broker. Required: `{}` admits every
    /// namespace, which a platform team should choose on purpose.
    pub namespace_selector: Option<NamespaceSelector>,
    /// The vhost each admitted namespace gets, with `{{namespace}}` replaced by its name.
    /// Default: `{{namespace}}` (every namespace its own vhost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = RABBIT_NAME_MAX_BYTES))]
    pub vhost: Option<String>,
    /// Vhosts every admitted namespace may use besides its own (shared vhosts). A pipeline
    /// picks one with `spec.broker.vhost`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_vhosts: Vec<String>,
    /// Create a namespace's vhost (from `vhost`) when it does not exist yet, and grant the
    /// broker's user all permissions on it. Default false: the platform creates vhosts.
    #[serde(default)]
    pub create_vhosts: bool,
}

/// A label selector over namespaces, with the meaning of Kubernetes' `LabelSelector`: every
/// `matchLabels` entry and every expression must hold; an empty selector matches everything.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One requirement of a [`NamespaceSelector`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Values for In and NotIn; must be empty for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl NamespaceSelector {
    /// Whether a namespace with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|requirement| {
                let value = labels.get(&requirement.key);
                match requirement.operator {
                    SelectorOperator::In => value.is_some_and(|v| requirement.values.contains(v)),
                    SelectorOperator::NotIn => {
                        value.is_none_or(|v| !requirement.values.contains(v))
                    }
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Why a pipeline may not use a broker. Each names the rule, so the condition tells the
/// tenant what to ask the platform team for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "MessageBroker {broker} admits no namespace: spec.tenants.namespaceSelector is not set"
    )]
    NoSelector { broker: String },
    #[error(
        "namespace {namespace} is not admitted by MessageBroker {broker}: its labels do not match spec.tenants.namespaceSelector"
    )]
    NamespaceNotAdmitted { broker: String, namespace: String },
    #[error(
        "vhost {vhost:?} is not granted to namespace {namespace} by MessageBroker {broker} (granted: {granted})"
    )]
    VhostNotGranted {
        broker: String,
        namespace: String,
        vhost: String,
        granted: String,
    },
}

/// What a pipeline of an admitted namespace gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The vhost the pipeline uses.
    pub vhost: String,
    /// Whether it is the namespace's own vhost (from the template), which msgpipe may create.
    pub own: bool,
}

impl MessageBrokerSpec {
    /// The vhost a namespace gets from the template.
    pub fn own_vhost(&self, namespace: &str) -> String {
        self.tenants
            .vhost
            .as_deref()
            .unwrap_or(DEFAULT_VHOST_TEMPLATE)
            .replace(NAMESPACE_PLACEHOLDER, namespace)
    }

    /// Admits a pipeline of `namespace` (with `labels`) asking for `vhost` (None: its own), or
    /// says which rule refuses it. `broker` is the MessageBroker's name, for the message.
    pub fn admit(
        &self,
        broker: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        vhost: Option<&str>,
    ) -> Result<Grant, Refusal> {
        let selector =
            self.tenants
                .namespace_selector
                .as_ref()
                .ok_or_else(|| Refusal::NoSelector {
                    broker: broker.into(),
                })?;
        if !selector.matches(labels) {
            return Err(Refusal::NamespaceNotAdmitted {
                broker: broker.into(),
                namespace: namespace.into(),
            });
        }
        let own = self.own_vhost(namespace);
        match vhost {
            None => Ok(Grant {
                vhost: own,
                own: true,
            }),
            Some(asked) if asked == own => Ok(Grant {
                vhost: own,
                own: true,
            }),
            Some(asked) if self.tenants.shared_vhosts.iter().any(|v| v == asked) => Ok(Grant {
                vhost: asked.into(),
                own: false,
            }),
            Some(asked) => Err(Refusal::VhostNotGranted {
                broker: broker.into(),
                namespace: namespace.into(),
                vhost: asked.into(),
                granted: std::iter::once(&own)
                    .chain(&self.tenants.shared_vhosts)
                    .map(|v| format!("{v:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// What the operator last saw of a broker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageBrokerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the broker answered with the Secret's credentials (reason Converged), or why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// RabbitMQ version, e.g. 4.3.6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What the broker can do that msgpipe relies on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<BrokerFeatures>,
}

/// Broker capabilities that change msgpipe's behaviour.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerFeatures {
    /// Quorum queues count `basic.nack(requeue)` toward `delivery-limit` (false on 4.3,
    /// where only reject and channel close count: clients must reject).
    pub nack_counts_toward_delivery_limit: bool,
    /// `apply-to: quorum_queues` policies (3.12+).
    pub quorum_queue_policies: bool,
    /// The `rabbitmq_shovel` plugin is enabled (queue migrations move messages inside the
    /// broker).
    pub shovel: bool,
}

impl BrokerFeatures {
    /// The features of a broker of `version` (`major.minor.patch`) with `plugins` enabled.
    pub fn of(version: &str, plugins: &[String]) -> Self {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        Self {
            nack_counts_toward_delivery_limit: (major, minor) < (4, 3),
            quorum_queue_policies: (major, minor) >= (3, 12),
            shovel: plugins.iter().any(|p| p == "rabbitmq_shovel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn shared(selector: Option<NamespaceSelector>) -> MessageBrokerSpec {
        MessageBrokerSpec {
            uri: "amqps://rabbitmq.platform.svc:5671".into(),
            management_uri: None,
            secret_ref: SecretRef {
                name: "rabbitmq-admin".into(),
            },
            tenants: TenantsSpec {
                namespace_selector: selector,
                vhost: Some("team-{{namespace}}".into()),
                shared_vhosts: vec!["events".into()],
                create_vhosts: false,
            },
        }
    }

    fn tenant_label() -> Option<NamespaceSelector> {
        Some(NamespaceSelector {
            match_labels: labels(&[("msgpipe.io/tenant", "true")]),
            match_expressions: vec![],
        })
    }

    #[test]
    fn an_admitted_namespace_gets_its_own_vhost_from_the_template() {
        let grant = shared(tenant_label())
            .admit(
                "shared",
                "a",
                &labels(&[("msgpipe.io/tenant", "true")]),
                None,
            )
            .expect("admitted");
        assert_eq!(
            grant,
            Grant {
                vhost: "team-a".into(),
                own: true
            }
        );
    }

    #[test]
    fn a_namespace_whose_labels_do_not_match_is_refused_naming_the_rule() {
        let refusal = shared(tenant_label())
            .admit("shared", "b", &labels(&[("msgpipe.io/tenant", "no")]), None)
            .expect_err("refused");
        assert_eq!(
            refusal.to_string(),
            "namespace b is not admitted by MessageBroker shared: its labels do not match spec.tenants.namespaceSelector"
        );
    }

    #[test]
    fn another_tenants_vhost_is_refused_and_shared_vhosts_are_granted() {
        let broker = shared(tenant_label());
        let admitted = labels(&[("msgpipe.io/tenant", "true")]);
        let refusal = broker
            .admit("shared", "a", &admitted, Some("team-b"))
            .expect_err("b's vhost");
        assert!(
            matches!(&refusal, Refusal::VhostNotGranted { vhost, .. } if vhost == "team-b"),
            "{refusal}"
        );
        assert!(
            refusal
                .to_string()
                .contains("(granted: \"team-a\", \"events\")"),
            "{refusal}"
        );
        assert_eq!(
            broker.admit("shared", "a", &admitted, Some("events")),
            Ok(Grant {
                vhost: "events".into(),
                own: false
            })
        );
        assert_eq!(
            broker
                .admit("shared", "a", &admitted, Some("team-a"))
                .map(|g| g.own),
            Ok(true)
        );
    }

    #[test]
    fn a_broker_without_a_selector_admits_nobody_and_an_empty_one_everybody() {
        assert!(matches!(
            shared(None).admit("shared", "a", &labels(&[]), None),
            Err(Refusal::NoSelector { .. })
        ));
        assert!(
            shared(Some(NamespaceSelector::default()))
                .admit("shared", "a", &labels(&[]), None)
                .is_ok()
        );
    }

    #[test]
    fn selector_expressions_have_kubernetes_meaning() {
        let requirement = |operator, values: &[&str]| SelectorRequirement {
            key: "tier".into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let selector = |r| NamespaceSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![r],
        };
        let gold = labels(&[("tier", "gold")]);
        let none = labels(&[]);
        use SelectorOperator::*;
        assert!(selector(requirement(In, &["gold", "silver"])).matches(&gold));
        assert!(!selector(requirement(In, &["silver"])).matches(&gold));
        assert!(!selector(requirement(In, &["gold"])).matches(&none));
        assert!(selector(requirement(NotIn, &["silver"])).matches(&gold));
        assert!(selector(requirement(NotIn, &["gold"])).matches(&none));
        assert!(!selector(requirement(NotIn, &["gold"])).matches(&gold));
        assert!(selector(requirement(Exists, &[])).matches(&gold));
        assert!(!selector(requirement(Exists, &[])).matches(&none));
        assert!(selector(requirement(DoesNotExist, &[])).matches(&none));
        assert!(!selector(requirement(DoesNotExist, &[])).matches(&gold));
    }

    /// The errors the API server's CEL rules give `spec` (kube-cel, as in spec.rs).
    fn admission(spec: serde_json::Value) -> Vec<String> {
        use kube::CustomResourceExt;
        let crd = MessageBroker::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("json");
        let object = serde_json::json!({"apiVersion": "msgpipe.io/v1alpha1",
            "kind": "MessageBroker", "metadata": {"name": "shared"}, "spec": spec});
        match kube_cel::Validator::new().validate(&schema, &object, None) {
            Ok(()) => vec![],
            Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn the_api_server_refuses_credentials_in_a_broker_uri() {
        let good = serde_json::json!({"uri": "amqps://rabbit:5671",
            "managementUri": "https://rabbit:15671", "secretRef": {"name": "admin"}});
        assert!(admission(good.clone()).is_empty());
        let mut leaked = good.clone();
        leaked["uri"] = "amqps://admin:hunter2@rabbit:5671".into();
        let errors = admission(leaked);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("must not carry credentials")),
            "{errors:?}"
        );
        let mut http = good;
        http["uri"] = "http://rabbit:15672".into();
        assert!(!admission(http).is_empty());
    }

    #[test]
    fn the_example_broker_is_admitted_by_the_api_server_and_admits_labelled_namespaces() {
        let text = include_str!("../../examples/brokers/shared-broker.yaml");
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).expect("YAML documents");
        let broker: MessageBroker =
            serde_json::from_value(documents[0].clone()).expect("a MessageBroker");
        assert!(admission(documents[0]["spec"].clone()).is_empty());
        let grant = broker
            .spec
            .admit(
                "shared",
                "orders",
                &labels(&[("msgpipe.io/tenant", "true")]),
                None,
            )
            .expect("admitted");
        assert_eq!(grant.vhost, "orders");
        assert!(broker.spec.tenants.create_vhosts);
    }

    #[test]
    fn features_follow_the_version_and_plugins() {
        let plugins = vec!["rabbitmq_management".to_string()];
        let f = BrokerFeatures::of("4.3.6", &plugins);
        assert!(!f.nack_counts_toward_delivery_limit && f.quorum_queue_policies && !f.shovel);
        let f = BrokerFeatures::of("3.10.8", &["rabbitmq_shovel".to_string()]);
        assert!(f.nack_counts_toward_delivery_limit && !f.quorum_queue_policies && f.shovel);
        assert!(BrokerFeatures::of("4.0.5", &[]).nack_counts_toward_delivery_limit);
    }
}
