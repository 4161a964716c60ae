//! The operator's real controller (`run_controller`: watchers, reflector stores, reconcile)
//! against the mocked API server listing and watching like a real one, with the in-memory
//! broker: nothing reaches the pipeline but watch events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use msgpipe::broker::MemoryBroker;
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, run_controller,
};
use msgpipe::k8s::BrokerAccess;
use msgpipe::k8s::rbac::BrokerModes;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::fake_api::{Call, FakeApi};
use super::{NS, PIPELINE, SECRET, notes_object};

const VHOST: &str = "watched";
const OPERATOR_NS: &str = "msgpipe-system";
const WITHIN: Duration = Duration::from_secs(30);

/// Runs the controller over every namespace, with an in-memory broker, until the sender
/// fires or is dropped.
fn start(api: &FakeApi, brokers: BrokerAccess) -> (oneshot::Sender<()>, Arc<MemoryBroker>) {
    let (stop, broker, _) = start_measured(api, brokers);
    (stop, broker)
}

/// [`start`], with the controller's metrics.
fn start_measured(
    api: &FakeApi,
    brokers: BrokerAccess,
) -> (oneshot::Sender<()>, Arc<MemoryBroker>, Arc<Metrics>) {
    let broker = Arc::new(
        MemoryBroker::new("amqp://app@rabbit.invalid:5672")
            .with_vhost(VHOST, 4)
            .with_vhost(NS, 4),
    );
    let shared = broker.clone();
    let pool = BrokerPool::with_connector(
        Duration::from_secs(5),
        BROKER_CONCURRENCY,
        Box::new(move |_, _| Ok(shared.clone())),
    );
    let (client, _server) = api.client();
    let config = OperatorConfig {
        brokers,
        ..OperatorConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::with_brokers(client, metrics.clone(), config, pool));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run_controller(ctx, None, async move {
        let _ = stopped.await;
    }));
    (stop, broker, metrics)
}

/// The pipeline as a user creates it: no resourceVersion, uid or finalizer yet.
fn new_pipeline(broker: Value) -> Value {
    let mut object = notes_object(VHOST, "Retain");
    object["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    object["spec"]["broker"] = broker;
    object["spec"]["broker"]["vhost"] = json!(VHOST);
    object
}

fn ready(api: &FakeApi) -> bool {
    api.get(PIPELINE).is_some_and(|o| {
        o["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < WITHIN,
            "timed out after {WITHIN:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn watches(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.query.contains("watch=true"))
        .map(|c| c.path.clone())
        .collect()
}

#[tokio::test]
async fn a_created_pipeline_becomes_ready_through_watch_events_and_a_delete_releases_it() {
    let api = FakeApi::default();
    api.set_crd(true);
    api.put(
        SECRET,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq-admin", "namespace": NS},
               "stringData": {"uri": format!("amqp://app:pw@rabbit.invalid:5672/{VHOST}")}}),
    );
    let (_stop, broker) = start(&api, BrokerAccess::default());
    // The controller lists (in pages) and then watches; the pipeline comes as a watch event.
    wait_until("the pipeline watch", || {
        watches(&api.0.lock().expect("state").calls)
            .contains(&"/apis/msgpipe.io/v1alpha1/messagepipelines".to_string())
    })
    .await;
    api.put(
        PIPELINE,
        new_pipeline(json!({"secretRef": {"name": "rabbitmq-admin"}})),
    );
    wait_until("Ready=True", || ready(&api)).await;
    let calls = api.take_calls();
    let list = calls
        .iter()
        .find(|c| c.path == "/apis/msgpipe.io/v1alpha1/messagepipelines")
        .expect("a pipeline list");
    assert!(list.query.contains("limit=500"), "{}", list.query);
    let watched = watches(&calls);
    for collection in [
        "/apis/msgpipe.io/v1alpha1/messagepipelines",
        "/api/v1/configmaps",
        "/api/v1/secrets",
        "/apis/msgpipe.io/v1alpha1/messagebrokers",
    ] {
        assert!(
            watched.contains(&collection.to_string()),
            "{collection} not watched: {watched:?}"
        );
    }
    // The finalizer is added, and only its echo (a MODIFIED event) brings the pass that
    // writes the broker and the status.
    let lines: Vec<String> = calls.iter().map(Call::line).collect();
    let finalizer = lines
        .iter()
        .position(|l| *l == format!("PATCH {PIPELINE}"))
        .expect("finalizer patch");
    let status = lines
        .iter()
        .position(|l| *l == format!("PATCH {PIPELINE}/status"))
        .expect("status write");
    assert!(finalizer < status, "{lines:#?}");
    assert!(
        broker.vhost(VHOST).is_some_and(|v| !v.queues.is_empty()),
        "queues declared"
    );
    assert_eq!(
        api.get(PIPELINE).expect("pipeline")["metadata"]["finalizers"],
        json!(["msgpipe.io/cleanup"])
    );
    // `kubectl delete`: a deletionTimestamp event; the controller releases the finalizer and
    // the server removes the object.
    api.delete(PIPELINE);
    wait_until("the pipeline removed", || api.get(PIPELINE).is_none()).await;
}

const CLIENT_CONFIG: &str = "/api/v1/namespaces/notes-app/configmaps/notes-client";

/// The pipeline's Secret, the controller started once its pipeline watch is open, then the
/// pipeline created and Ready.
async fn with_ready_pipeline(api: &FakeApi) -> (oneshot::Sender<()>, Arc<Metrics>) {
    api.set_crd(true);
    api.put(
        SECRET,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq-admin", "namespace": NS},
               "stringData": {"uri": format!("amqp://app:pw@rabbit.invalid:5672/{VHOST}")}}),
    );
    let (stop, _broker, metrics) = start_measured(api, BrokerAccess::default());
    wait_until("the pipeline watch", || {
        watches(&api.0.lock().expect("state").calls)
            .contains(&"/apis/msgpipe.io/v1alpha1/messagepipelines".to_string())
    })
    .await;
    api.put(
        PIPELINE,
        new_pipeline(json!({"secretRef": {"name": "rabbitmq-admin"}})),
    );
    wait_until("Ready=True", || ready(api)).await;
    (stop, metrics)
}

#[tokio::test]
async fn the_echo_of_its_own_config_map_write_does_not_reconcile_a_pipeline_again() {
    let api = FakeApi::default();
    let (_stop, metrics) = with_ready_pipeline(&api).await;
    // The ConfigMap's ADDED event (and the finalizer's and the status's MODIFIED events) have
    // come back by now; none of them is a reason for a second pass.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        api.get(CLIENT_CONFIG).is_some(),
        "the ConfigMap was written"
    );
    assert_eq!(
        metrics.reconciles_total(),
        1,
        "one reconcile of the new pipeline"
    );
    let status_writes = api
        .take_calls()
        .iter()
        .filter(|c| c.line() == format!("PATCH {PIPELINE}/status"))
        .count();
    assert_eq!(status_writes, 1);
}

#[tokio::test]
async fn someone_elses_edit_or_deletion_of_the_config_map_is_repaired_at_once() {
    let api = FakeApi::default();
    let (_stop, metrics) = with_ready_pipeline(&api).await;
    let written = api.get(CLIENT_CONFIG).expect("the ConfigMap");
    // `kubectl edit`: the data changed by hand.
    let mut edited = written.clone();
    edited["data"]["pipeline.json"] = json!("{}");
    edited["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    api.put(CLIENT_CONFIG, edited);
    wait_until("the ConfigMap restored", || {
        api.get(CLIENT_CONFIG)
            .is_some_and(|c| c["data"] == written["data"])
    })
    .await;
    // `kubectl delete configmap`.
    api.delete(CLIENT_CONFIG);
    wait_until("the ConfigMap recreated", || {
        api.get(CLIENT_CONFIG)
            .is_some_and(|c| c["data"] == written["data"])
    })
    .await;
    assert!(
        metrics.reconciles_total() >= 3,
        "each change brought a pass"
    );
}

#[tokio::test]
async fn brokers_only_controller_lists_and_watches_secrets_in_its_own_namespace_only() {
    let api = FakeApi::default();
    api.set_crd(true);
    let modes = BrokerModes {
        secret_refs: false,
        message_brokers: true,
    };
    api.enforce_rbac(modes, OPERATOR_NS);
    api.put(
        "/apis/msgpipe.io/v1alpha1/messagebrokers/shared",
        json!({"apiVersion": "msgpipe.io/v1alpha1", "kind": "MessageBroker",
               "metadata": {"name": "shared", "generation": 1},
               "spec": {"uri": "amqp://rabbit.invalid:5672", "secretRef": {"name": "rabbitmq-admin"},
                        "tenants": {"namespaceSelector": {"matchLabels": {"msgpipe.io/tenant": "true"}},
                                    "vhost": "{{namespace}}", "sharedVhosts": [VHOST]}}}),
    );
    api.put(
        &format!("/api/v1/namespaces/{OPERATOR_NS}/secrets/rabbitmq-admin"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq-admin", "namespace": OPERATOR_NS},
               "stringData": {"username": "msgpipe", "password": "Pl4tform-Owned-Pw"}}),
    );
    api.put(
        &format!("/api/v1/namespaces/{NS}"),
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NS, "labels": {"msgpipe.io/tenant": "true"}}}),
    );
    // A tenant Secret the operator must never see.
    api.put(
        SECRET,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "rabbitmq-admin", "namespace": NS},
               "stringData": {"uri": "amqp://app:pw@rabbit.invalid:5672/x"}}),
    );
    let access = BrokerAccess {
        secret_refs: false,
        message_brokers: true,
        operator_namespace: OPERATOR_NS.into(),
        cache: Default::default(),
    };
    let (_stop, _broker) = start(&api, access);
    api.put(
        PIPELINE,
        new_pipeline(json!({"brokerRef": {"name": "shared"}})),
    );
    wait_until("Ready=True", || ready(&api)).await;
    let calls = api.take_calls();
    let own = format!("/api/v1/namespaces/{OPERATOR_NS}/secrets");
    let secret_calls: Vec<String> = calls
        .iter()
        .filter(|c| c.path.contains("/secrets"))
        .map(|c| format!("{} {}?{}", c.method, c.path, c.query))
        .collect();
    assert!(
        secret_calls.iter().all(|c| c.contains(&own)),
        "{secret_calls:#?}"
    );
    assert!(
        watches(&calls).contains(&own),
        "the own namespace's Secrets are watched: {secret_calls:#?}"
    );
    assert_eq!(api.denied(), Vec::<String>::new());
    // The MessageBroker comes from the controller's watch, not a GET per reconcile.
    assert!(
        calls.iter().any(|c| c.path.ends_with("/messagebrokers")),
        "MessageBrokers watched"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.path.ends_with("/messagebrokers/shared")),
        "{:#?}",
        calls.iter().map(Call::line).collect::<Vec<_>>()
    );
}

/// Over real HTTP, as the benchmarks serve it: lists come in pages of `limit` with a
/// `continue` token, metadata-only when asked, and a watch streams writes as they happen,
/// each charged a real server's latency.
#[tokio::test]
async fn over_http_lists_page_and_a_watch_streams_metadata_of_new_writes() {
    use futures_util::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

    msgpipe::broker::install_crypto_provider();
    let api = FakeApi::default();
    api.preload((0..1200).map(|i| {
        let name = format!("s-{i:04}");
        (
            format!("/api/v1/namespaces/team/secrets/{name}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": name, "namespace": "team", "managedFields": [{"manager": "kubectl"}]},
                   "data": {"k": "c2VjcmV0"}}),
        )
    }));
    api.set_latency(super::fake_api::Latency::real_server());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let port = listener.local_addr().expect("port").port();
    tokio::spawn(api.clone().serve(listener));
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let secrets: Api<Secret> = Api::all(client);
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(500);
    let mut pages = 0;
    let version = loop {
        let page = secrets.list_metadata(&params).await.expect("page");
        pages += 1;
        names.extend(
            page.items
                .iter()
                .map(|s| s.metadata.name.clone().unwrap_or_default()),
        );
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break page.metadata.resource_version.expect("list version"),
        }
    };
    assert_eq!((pages, names.len()), (3, 1200));
    assert_eq!(names.first().map(String::as_str), Some("s-0000"));
    assert_eq!(names.last().map(String::as_str), Some("s-1199"));
    let stream = secrets
        .watch_metadata(&WatchParams::default().timeout(10), &version)
        .await
        .expect("watch");
    let mut stream = stream.boxed();
    wait_until("the watch open", || api.open_watches() == 1).await;
    api.put(
        "/api/v1/namespaces/team/secrets/new",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "new", "namespace": "team"}, "data": {"k": "c2VjcmV0"}}),
    );
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("an event within 5 s")
        .expect("a good event")
        .expect("not the end");
    match event {
        WatchEvent::Added(meta) => assert_eq!(meta.metadata.name.as_deref(), Some("new")),
        other => panic!("expected ADDED, got {other:?}"),
    }
}
