//! Pipelines that name a platform-owned MessageBroker (`spec.broker.brokerRef`), on the mocked
//! API with the chart's RBAC enforced (every call outside it gets a real server's 403) and the
//! in-memory broker: an admitted namespace converges with the broker's credentials from the
//! operator's own namespace; a namespace the broker does not admit, or a vhost it does not
//! grant, is refused with a condition naming the rule, and nothing reaches the broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::controller::Action;
use msgpipe::api::MessagePipeline;
use msgpipe::broker::MemoryBroker;
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, error_policy, reconcile,
};
use msgpipe::k8s::BrokerAccess;
use msgpipe::k8s::rbac::BrokerModes;
use serde_json::json;

use super::fake_api::{Call, FakeApi};
use super::{NS, PIPELINE, notes_object};

const OPERATOR_NS: &str = "msgpipe-system";
const BROKER: &str = "/apis/msgpipe.io/v1alpha1/messagebrokers/shared";
const BROKER_SECRET: &str = "/api/v1/namespaces/msgpipe-system/secrets/rabbitmq-admin";
const NAMESPACE: &str = "/api/v1/namespaces/notes-app";
const PASSWORD: &str = "Pl4tform-Owned-Pw";

struct Tenant {
    api: FakeApi,
    broker: Arc<MemoryBroker>,
    ctx: Arc<Context<MemoryBroker>>,
    /// Every broker write, in order.
    writes: Arc<Mutex<Vec<String>>>,
    /// The endpoints the operator opened, as `user@host/vhost`.
    opened: Arc<Mutex<Vec<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Tenant {
    /// The notes pipeline in namespace notes-app (labelled `tenant`), naming MessageBroker
    /// `shared`, which admits namespaces labelled `msgpipe.io/tenant=true` into the vhost of
    /// their own name; the operator accepts `modes`.
    fn new(tenant_label: &str, modes: BrokerModes) -> Self {
        let api = FakeApi::default();
        api.set_crd(true);
        api.enforce_rbac(modes, OPERATOR_NS);
        let mut pipeline = notes_object(NS, "Retain");
        pipeline["spec"]["broker"] = json!({"brokerRef": {"name": "shared"}});
        api.put(PIPELINE, pipeline);
        api.put(
            BROKER,
            json!({
                "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker",
                "metadata": {"name": "shared", "generation": 1},
                "spec": {
                    "uri": "amqp://rabbit.invalid:5672",
                    "secretRef": {"name": "rabbitmq-admin"},
                    "tenants": {
                        "namespaceSelector": {"matchLabels": {"msgpipe.io/tenant": "true"}},
                        "vhost": "{{namespace}}",
                        "sharedVhosts": ["events"]
                    }
                }
            }),
        );
        api.put(
            BROKER_SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "rabbitmq-admin", "namespace": OPERATOR_NS},
                "stringData": {"username": "msgpipe", "password": PASSWORD}
            }),
        );
        api.put(
            NAMESPACE,
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NS, "labels": {"msgpipe.io/tenant": tenant_label}}
            }),
        );
        let broker = Arc::new(
            MemoryBroker::new("amqp://msgpipe@rabbit.invalid:5672")
                .with_vhost(NS, 4)
                .with_vhost("events", 4)
                .with_vhost("other-team", 4),
        );
        let writes = Arc::new(Mutex::new(Vec::new()));
        let to_writes = writes.clone();
        broker.on_write(move |vhost, action| {
            to_writes
                .lock()
                .expect("writes")
                .push(format!("{vhost}: {action}"));
        });
        let opened = Arc::new(Mutex::new(Vec::new()));
        let (shared, to_opened) = (broker.clone(), opened.clone());
        let brokers = BrokerPool::with_connector(
            Duration::from_secs(5),
            BROKER_CONCURRENCY,
            Box::new(move |endpoint, _| {
                to_opened.lock().expect("opened").push(format!(
                    "{}/{}",
                    endpoint,
                    endpoint.uri_vhost()
                ));
                Ok(shared.clone())
            }),
        );
        let (client, server) = api.client();
        let config = OperatorConfig {
            brokers: BrokerAccess {
                secret_refs: modes.secret_refs,
                message_brokers: modes.message_brokers,
                operator_namespace: OPERATOR_NS.into(),
                cache: Default::default(),
            },
            ..OperatorConfig::default()
        };
        let ctx = Arc::new(Context::with_brokers(
            client,
            Arc::new(Metrics::default()),
            config,
            brokers,
        ));
        Self {
            api,
            broker,
            ctx,
            writes,
            opened,
            _server: server,
        }
    }

    async fn reconcile(&self) -> (Result<Action, String>, Vec<Call>) {
        let object = self.api.get(PIPELINE).expect("pipeline stored");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        let result = reconcile(pipeline.clone(), self.ctx.clone())
            .await
            .map_err(|error| {
                let action = error_policy(pipeline, &error, self.ctx.clone());
                format!("{error} -> {action:?}")
            });
        (result, self.api.take_calls())
    }

    /// The first reconcile (the finalizer, then the converge in the same pass); every call
    /// made.
    async fn first_sync(&self) -> (Result<Action, String>, Vec<Call>) {
        self.reconcile().await
    }

    fn set_vhost(&self, vhost: &str) {
        let mut object = self.api.get(PIPELINE).expect("pipeline");
        object["spec"]["broker"]["vhost"] = json!(vhost);
        self.api.put(PIPELINE, object);
    }

    fn condition(&self, kind: &str) -> (String, String, String) {
        let pipeline = self.api.get(PIPELINE).expect("pipeline");
        let c = pipeline["status"]["conditions"]
            .as_array()
            .and_then(|list| list.iter().find(|c| c["type"] == kind))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} condition in {pipeline}"));
        let text = |field: &str| c[field].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    fn writes(&self) -> Vec<String> {
        self.writes.lock().expect("writes").clone()
    }
}

fn brokers_only() -> BrokerModes {
    BrokerModes {
        secret_refs: false,
        message_brokers: true,
    }
}

/// Paths of the Secrets a call list read (any namespace).
fn secret_reads(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.path.contains("/secrets"))
        .map(Call::line)
        .collect()
}

#[tokio::test]
async fn an_admitted_namespace_converges_through_the_broker_with_credentials_from_the_operators_namespace()
 {
    let t = Tenant::new("true", brokers_only());
    let (result, calls) = t.first_sync().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(
        t.condition("Ready").0,
        "True",
        "{:?}",
        t.condition("BrokerReady")
    );
    assert_eq!(t.condition("BrokerReady").1, "Converged");
    // The namespace's own vhost, with the broker's user; the password never shown.
    let opened = t.opened.lock().expect("opened").clone();
    assert_eq!(opened, ["amqp://msgpipe@rabbit.invalid:5672/notes-app"]);
    assert!(t.writes().iter().all(|w| w.starts_with("notes-app: ")));
    assert!(!t.writes().is_empty());
    assert!(
        t.broker
            .vhost(NS)
            .expect("vhost")
            .queues
            .contains_key("notes_queue")
    );
    // Secrets were read in the operator's namespace only.
    assert_eq!(secret_reads(&calls), [format!("GET {BROKER_SECRET}")]);
    assert_eq!(
        t.api.denied(),
        Vec::<String>::new(),
        "every call within the chart's RBAC"
    );
    let status = t.api.get(PIPELINE).expect("pipeline")["status"].to_string();
    assert!(!status.contains(PASSWORD), "{status}");
}

#[tokio::test]
async fn a_namespace_the_broker_does_not_admit_is_refused_and_nothing_reaches_the_broker() {
    let t = Tenant::new("false", brokers_only());
    let (result, calls) = t.first_sync().await;
    assert!(result.is_err(), "{result:?}");
    let (status, reason, message) = t.condition("BrokerReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "BrokerNotAdmitted")
    );
    assert_eq!(
        message,
        "namespace notes-app is not admitted by MessageBroker shared: its labels do not match spec.tenants.namespaceSelector"
    );
    assert_eq!(t.condition("Ready").0, "False");
    assert_eq!(
        t.writes(),
        Vec::<String>::new(),
        "nothing written to the broker"
    );
    assert!(
        t.opened.lock().expect("opened").is_empty(),
        "never connected"
    );
    assert_eq!(
        secret_reads(&calls),
        Vec::<String>::new(),
        "a refused pipeline never causes a read of the broker's Secret"
    );
    let warning = calls
        .iter()
        .filter(|c| c.is_event())
        .find(|c| c.body["type"] == "Warning")
        .expect("a Warning event");
    assert_eq!(warning.body["reason"], "BrokerNotAdmitted");
}

#[tokio::test]
async fn another_tenants_vhost_is_refused_and_a_shared_one_granted() {
    let t = Tenant::new("true", brokers_only());
    t.set_vhost("other-team");
    let (result, _) = t.first_sync().await;
    assert!(result.is_err(), "{result:?}");
    let (status, reason, message) = t.condition("BrokerReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "VhostNotGranted")
    );
    assert!(
        message.contains("vhost \"other-team\" is not granted to namespace notes-app by MessageBroker shared (granted: \"notes-app\", \"events\")"),
        "{message}"
    );
    assert_eq!(t.writes(), Vec::<String>::new());

    t.set_vhost("events");
    let (result, _) = t.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(t.condition("BrokerReady").1, "Converged");
    assert!(t.writes().iter().all(|w| w.starts_with("events: ")));
    assert!(
        t.broker
            .vhost("other-team")
            .expect("vhost")
            .queues
            .is_empty()
    );
}

#[tokio::test]
async fn a_secret_ref_is_refused_when_the_operator_may_not_read_tenant_secrets() {
    let t = Tenant::new("true", brokers_only());
    let mut object = t.api.get(PIPELINE).expect("pipeline");
    object["spec"]["broker"] = json!({"secretRef": {"name": "rabbitmq-admin"}});
    t.api.put(PIPELINE, object);
    let (result, calls) = t.first_sync().await;
    assert!(result.is_err(), "{result:?}");
    let (_, reason, message) = t.condition("BrokerReady");
    assert_eq!(reason, "BrokerModeDisabled");
    assert!(
        message.starts_with("spec.broker.secretRef is not accepted"),
        "{message}"
    );
    assert_eq!(
        secret_reads(&calls),
        Vec::<String>::new(),
        "no tenant Secret read"
    );
    assert_eq!(t.writes(), Vec::<String>::new());
    assert_eq!(t.api.denied(), Vec::<String>::new());
}

#[tokio::test]
async fn the_mock_refuses_a_tenant_secret_read_in_brokers_only_mode_as_rbac_would() {
    // The guard the tests above rely on: under the brokers-only RBAC a read of a tenant
    // Secret is a 403, while the operator's own namespace is readable.
    let api = FakeApi::default();
    api.enforce_rbac(brokers_only(), OPERATOR_NS);
    let (client, _server) = api.client();
    let tenant: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), NS);
    let error = tenant.get("anything").await.expect_err("forbidden");
    assert!(
        matches!(&error, kube::Error::Api(s) if s.code == 403),
        "{error:?}"
    );
    let own: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, OPERATOR_NS);
    let error = own.get("absent").await.expect_err("not found");
    assert!(
        matches!(&error, kube::Error::Api(s) if s.code == 404),
        "{error:?}"
    );
    assert_eq!(
        api.denied(),
        [format!("GET /api/v1/namespaces/{NS}/secrets/anything")]
    );
}

#[tokio::test]
async fn a_broker_that_creates_vhosts_makes_the_namespaces_own_vhost_on_first_use_only() {
    let t = Tenant::new("true", brokers_only());
    let mut broker = t.api.get(BROKER).expect("broker");
    broker["spec"]["tenants"]["vhost"] = json!("team-{{namespace}}");
    broker["spec"]["tenants"]["createVhosts"] = json!(true);
    t.api.put(BROKER, broker.clone());
    assert!(t.broker.vhost("team-notes-app").is_none());
    let (result, _) = t.first_sync().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    let created = t.broker.vhost("team-notes-app").expect("vhost created");
    assert!(created.queues.contains_key("notes_queue"));

    // Without createVhosts a missing vhost is reported, never created.
    let t = Tenant::new("true", brokers_only());
    broker["spec"]["tenants"]["createVhosts"] = json!(false);
    t.api.put(BROKER, broker);
    let (result, _) = t.first_sync().await;
    assert!(result.is_err());
    assert_eq!(t.condition("BrokerReady").1, "VhostNotFound");
    assert!(t.broker.vhost("team-notes-app").is_none());
}

/// The platform rotates the MessageBroker's password on a real RabbitMQ while an application
/// publishes through the pipeline: until the Secret follows, the operator reports the refused
/// credentials (and touches nothing); once it does, the next reconcile converges on a new
/// connection with the new password. The application, on its own credentials, loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_message_brokers_password_reconnects_the_operator_and_loses_no_message() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::support::{self, TestVhost};

    let vhost = TestVhost::new("broker-rotation");
    let user = format!("msgpipe-rotation-{}", std::process::id());
    let set_password = |password: &str| {
        support::mgmt(
            "PUT",
            &format!("/users/{}", support::encode(&user)),
            Some(json!({"password": password, "tags": "administrator"})),
        );
    };
    set_password("first-Pw-1");
    support::mgmt(
        "PUT",
        &format!(
            "/permissions/{}/{}",
            support::encode(&vhost.name),
            support::encode(&user)
        ),
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    );

    let api = FakeApi::default();
    api.set_crd(true);
    api.enforce_rbac(brokers_only(), OPERATOR_NS);
    let mut pipeline = notes_object(&vhost.name, "Retain");
    pipeline["spec"]["broker"] =
        json!({"brokerRef": {"name": "shared"}, "vhost": vhost.name.clone()});
    api.put(PIPELINE, pipeline);
    api.put(
        BROKER,
        json!({
            "apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker",
            "metadata": {"name": "shared", "generation": 1},
            "spec": {
                "uri": format!("amqp://127.0.0.1:{}", support::shared_port()),
                "managementUri": support::mgmt_url().trim_end_matches("/api"),
                "secretRef": {"name": "rabbitmq-admin"},
                "tenants": {"namespaceSelector": {}, "sharedVhosts": [vhost.name.clone()]}
            }
        }),
    );
    let secret = |password: &str| {
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "rabbitmq-admin", "namespace": OPERATOR_NS},
            "stringData": {"username": user.clone(), "password": password}
        })
    };
    api.put(BROKER_SECRET, secret("first-Pw-1"));
    api.put(
        NAMESPACE,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    );
    let (client, _server) = api.client();
    let config = OperatorConfig {
        broker_timeout: Duration::from_secs(10),
        brokers: BrokerAccess {
            secret_refs: false,
            message_brokers: true,
            operator_namespace: OPERATOR_NS.into(),
            cache: Default::default(),
        },
        ..OperatorConfig::default()
    };
    let ctx = Arc::new(Context::new(client, Arc::new(Metrics::default()), config));
    let reconcile_once = || {
        let object = api.get(PIPELINE).expect("pipeline");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        let ctx = ctx.clone();
        async move { reconcile(pipeline, ctx).await.map_err(|e| e.to_string()) }
    };
    assert!(reconcile_once().await.is_ok(), "first converge");
    let condition = |kind: &str| {
        let object = api.get(PIPELINE).expect("pipeline");
        object["status"]["conditions"]
            .as_array()
            .and_then(|list| list.iter().find(|c| c["type"] == kind))
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .unwrap_or_default()
    };
    assert_eq!(
        condition("BrokerReady"),
        ("True".into(), "Converged".into())
    );

    // The application publishes throughout, on its own credentials.
    let (connection, channel) = support::amqp_channel(&vhost.name).await;
    let (stop, published) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let publisher = {
        let (stop, published) = (stop.clone(), published.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                support::publish(&channel, "notes", "notes", b"note").await;
                published.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    set_password("second-Pw-2");
    let refused = reconcile_once().await;
    assert!(refused.is_err(), "old password: {refused:?}");
    assert_eq!(condition("BrokerReady").1, "BrokerAuthenticationFailed");
    let status = api.get(PIPELINE).expect("pipeline")["status"].to_string();
    assert!(!status.contains("first-Pw-1") && !status.contains("second-Pw-2"));

    api.put(BROKER_SECRET, secret("second-Pw-2"));
    // The pool keeps a broker that failed "down" for a while; the rotation is a new endpoint.
    let converged = reconcile_once().await;
    assert!(converged.is_ok(), "new password: {converged:?}");
    assert_eq!(
        condition("BrokerReady"),
        ("True".into(), "Converged".into())
    );
    assert_eq!(api.denied(), Vec::<String>::new());

    stop.store(true, Ordering::Relaxed);
    publisher.await.expect("publisher");
    let published = published.load(Ordering::Relaxed);
    assert!(
        published > 10,
        "the application published during the rotation"
    );
    let (_, check) = support::amqp_channel(&vhost.name).await;
    let depth = support::depth(&check, "notes_queue").await;
    assert_eq!(
        u64::from(depth),
        published,
        "every confirmed message is in the queue"
    );
    let _ = connection.close(200, "done".into()).await;
    let _ = support::http(
        "DELETE",
        &format!("{}/users/{}", support::mgmt_url(), support::encode(&user)),
        None,
        true,
    );
}
