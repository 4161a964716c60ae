//! The operator's reconcile against a mocked Kubernetes API (every request checked) and a
//! real RabbitMQ: first reconcile, quiet second reconcile, invalid spec, missing CRD,
//! missing Secret, deletion with Retain and with Delete.

mod brokers;
mod controller;
mod dead_broker;
mod fake_api;
mod isolation;
mod observe;
mod offline;
mod replay;
#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{Call, FakeApi};
use kube::runtime::controller::Action;
use msgpipe::api::MessagePipeline;
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::BrokerApi;
use msgpipe::controller::{Context, Metrics, OperatorConfig, error_policy, reconcile};
use serde_json::{Value, json};
use support::TestVhost;

const NS: &str = "notes-app";
const PIPELINE: &str = "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/notes";
const SECRET: &str = "/api/v1/namespaces/notes-app/secrets/rabbitmq-admin";
const CONFIG_MAP: &str = "/api/v1/namespaces/notes-app/configmaps/notes-client";
const DISCOVERY: &str = "/apis/monitoring.coreos.com/v1";
const RULE: &str =
    "/apis/monitoring.coreos.com/v1/namespaces/notes-app/prometheusrules/notes-alerts";
const ORDERS: &str = "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/orders";

/// The notes example on the test vhost, as the API server would store it.
fn notes_object(vhost: &str, deletion_policy: &str) -> Value {
    let text = std::fs::read_to_string(support::repo_path("examples/notes-pipeline.yaml"))
        .expect("example");
    let pipeline = parse_pipelines(&text).expect("parses").remove(0);
    let mut object = serde_json::to_value(&pipeline).expect("json");
    object["spec"]["broker"]["vhost"] = json!(vhost);
    object["spec"]["deletionPolicy"] = json!(deletion_policy);
    object["metadata"]["uid"] = json!("0b6c3f0e-8a51-4d7e-9a0e-5f2d6c1e9a11");
    object["metadata"]["generation"] = json!(1);
    object["metadata"]["resourceVersion"] = json!("1");
    object
}

fn secret(vhost: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbitmq-admin", "namespace": NS},
        "stringData": {
            "uri": support::amqp_uri(vhost),
            "managementUri": "http://127.0.0.1:15673"
        }
    })
}

struct Harness {
    api: FakeApi,
    ctx: Arc<Context>,
    vhost: TestVhost,
    _server: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn new(prefix: &str, deletion_policy: &str) -> Self {
        let vhost = TestVhost::new(prefix);
        let api = FakeApi::default();
        api.set_crd(true);
        api.put(PIPELINE, notes_object(&vhost.name, deletion_policy));
        api.put(SECRET, secret(&vhost.name));
        let (client, server) = api.client();
        let config = OperatorConfig {
            broker_timeout: Duration::from_secs(10),
            ..OperatorConfig::default()
        };
        let ctx = Arc::new(Context::new(client, Arc::new(Metrics::default()), config));
        Self {
            api,
            ctx,
            vhost,
            _server: server,
        }
    }

    /// `kubectl delete`: the API server sets deletionTimestamp and keeps the object for
    /// its finalizers.
    fn mark_deleted(&self) {
        let mut object = self.api.get(PIPELINE).expect("pipeline");
        object["metadata"]["deletionTimestamp"] = json!("2026-11-29T12:00:00Z");
        self.api.put(PIPELINE, object);
    }

    fn remove(&self, path: &str) {
        self.api.0.lock().expect("state").objects.remove(path);
    }

    /// One reconcile of the stored object, like the controller would run it.
    async fn reconcile(&self) -> (Result<Action, String>, Vec<Call>) {
        self.reconcile_at(PIPELINE).await
    }

    /// One reconcile of the pipeline stored at `path`.
    async fn reconcile_at(&self, path: &str) -> (Result<Action, String>, Vec<Call>) {
        let object = self.api.get(path).expect("pipeline stored");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        let result = reconcile(pipeline.clone(), self.ctx.clone()).await;
        let result = result.map_err(|error| {
            let action = error_policy(pipeline, &error, self.ctx.clone());
            format!("{error} -> {action:?}")
        });
        (result, self.api.take_calls())
    }

    /// The first reconcile of a new pipeline: it adds the finalizer first and goes on in
    /// the same pass; returns the result and the calls after the finalizer's.
    async fn first_sync(&self) -> (Result<Action, String>, Vec<Call>) {
        let (result, mut calls) = self.reconcile().await;
        assert_eq!(
            calls.first().map(Call::line),
            Some(format!("PATCH {PIPELINE}")),
            "first: add the finalizer"
        );
        calls.remove(0);
        (result, calls)
    }

    fn condition(&self, kind: &str) -> (String, String, String) {
        let pipeline = self.api.get(PIPELINE).expect("pipeline");
        let conditions = pipeline["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let c = conditions
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} condition in {pipeline}"));
        (
            c["status"].as_str().unwrap_or_default().into(),
            c["reason"].as_str().unwrap_or_default().into(),
            c["message"].as_str().unwrap_or_default().into(),
        )
    }

    async fn queues(&self) -> Vec<String> {
        self.live().await.queues.keys().cloned().collect()
    }

    async fn live(&self) -> msgpipe::broker::LiveVhost {
        let broker = support::test_broker(&self.vhost.name);
        let live = broker.snapshot(&self.vhost.name).await.expect("snapshot");
        broker.close().await;
        live
    }
}

/// Non-event calls as `METHOD path`.
fn lines(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| !c.is_event())
        .map(Call::line)
        .collect()
}

/// (reason, change) of every change the events report; an event lists the changes of one
/// reason, `; `-separated.
fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.is_event() && c.method == http::Method::POST)
        .flat_map(|c| {
            let reason = c.body["reason"].as_str().unwrap_or_default().to_string();
            let note = c.body["note"].as_str().unwrap_or_default();
            note.split("; ")
                .map(|change| (reason.clone(), change.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn first_reconcile_writes_exactly_the_expected_objects_and_the_second_writes_nothing() {
    let h = Harness::new("op-first", "Retain");
    let (result, calls) = h.first_sync().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(
        lines(&calls),
        [
            format!("GET {SECRET}"),
            format!("GET {CONFIG_MAP}"),
            format!("GET {DISCOVERY}"),
            format!("GET {RULE}"),
            format!("PATCH {RULE}"),
            // After the broker pass: clients learn of the retry tiers once they exist.
            format!("PATCH {CONFIG_MAP}"),
            format!("PATCH {PIPELINE}/status"),
        ]
    );
    // Server-side applies with our field manager, owned by the pipeline.
    for call in calls
        .iter()
        .filter(|c| c.method == http::Method::PATCH && !c.is_event())
    {
        assert!(
            call.query.contains("fieldManager=msgpipe"),
            "{}: {}",
            call.line(),
            call.query
        );
        assert!(call.query.contains("force=true"), "{}", call.line());
    }
    let config_map = h.api.get(CONFIG_MAP).expect("ConfigMap applied");
    assert_eq!(
        config_map["metadata"]["ownerReferences"][0]["kind"],
        "MessagePipeline"
    );
    assert_eq!(
        config_map["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    let pipeline_json: Value = serde_json::from_str(
        config_map["data"]["pipeline.json"]
            .as_str()
            .expect("pipeline.json"),
    )
    .expect("json");
    assert_eq!(pipeline_json["queue"], "notes_queue");
    assert_eq!(pipeline_json["vhost"], h.vhost.name.as_str());
    let rule = h.api.get(RULE).expect("PrometheusRule applied");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let expr = rule["spec"]["groups"][0]["rules"][0]["expr"]
        .as_str()
        .expect("expr");
    assert!(
        expr.contains("notes_queue_dlq") && expr.contains("> 100"),
        "{expr}"
    );

    // The broker has the seed topology; every object got a Normal event.
    let queues = h.queues().await;
    for queue in [
        "notes_queue",
        "notes_queue_dlq",
        "notes_queue.retry.1.1s",
        "notes_queue.retry.4.8s",
    ] {
        assert!(
            queues.contains(&queue.to_string()),
            "{queue} missing from {queues:?}"
        );
    }
    let created = events(&calls);
    assert!(
        created
            .iter()
            .any(|(r, n)| r == "Created" && n == "created queue notes_queue"),
        "{created:?}"
    );
    assert!(
        created.iter().all(|(_, n)| !n.contains("guest:guest")),
        "no credentials in events"
    );
    assert_eq!(h.condition("Ready").0, "True");
    assert_eq!(h.condition("BrokerReady").1, "Converged");
    let status = h.api.get(PIPELINE).expect("pipeline")["status"].clone();
    assert_eq!(status["retryTiers"], 4);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["retryQueues"][3]["delay"], "8s");
    let writes_after_first =
        h.ctx.metrics.kube_writes_total() + h.ctx.metrics.broker_writes_total();

    // Converged: reads only, no write to Kubernetes or the broker, no event.
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(
        lines(&calls),
        [
            format!("GET {SECRET}"),
            format!("GET {CONFIG_MAP}"),
            format!("GET {DISCOVERY}"),
            format!("GET {RULE}")
        ]
    );
    assert!(
        events(&calls).is_empty(),
        "no events when nothing changed: {:?}",
        events(&calls)
    );
    assert_eq!(
        h.ctx.metrics.kube_writes_total() + h.ctx.metrics.broker_writes_total(),
        writes_after_first
    );
}

#[tokio::test]
async fn drift_on_the_broker_is_repaired_and_counted() {
    let h = Harness::new("op-drift", "Retain");
    let (result, _) = h.first_sync().await;
    assert!(result.is_ok(), "{result:?}");
    // Someone deletes the DLX binding: dead letters would be dropped silently. (msgpipe
    // marks its bindings with an argument, so the binding's key is read, not assumed "~".)
    let path = format!(
        "/bindings/{}/e/notes_dlq_exchange/q/notes_queue_dlq",
        support::encode(&h.vhost.name)
    );
    let listed: serde_json::Value =
        serde_json::from_str(&support::mgmt("GET", &path, None)).expect("json");
    let props = listed[0]["properties_key"]
        .as_str()
        .expect("the DLX binding");
    support::mgmt(
        "DELETE",
        &format!("{path}/{}", support::encode(props)),
        None,
    );
    let (result, calls) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let repaired = events(&calls);
    assert!(
        repaired.iter().any(|(r, n)| r == "Bound"
            && n.contains("notes_dlq_exchange")
            && n.contains("drift repaired")),
        "{repaired:?}"
    );
    assert!(
        h.ctx
            .metrics
            .encode()
            .contains("msgpipe_drift_repairs_total 1"),
        "{}",
        h.ctx.metrics.encode()
    );
    assert!(
        lines(&calls).iter().all(|l| l.starts_with("GET")),
        "status unchanged: {:?}",
        lines(&calls)
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_neither_the_secret_nor_the_broker_is_touched() {
    let h = Harness::new("op-invalid", "Retain");
    let mut object = notes_object(&h.vhost.name, "Retain");
    object["metadata"]["finalizers"] = json!(["msgpipe.io/cleanup"]);
    object["spec"]["retry"]["backoff"]["maxDelay"] = json!("500ms");
    h.api.put(PIPELINE, object);
    let (result, calls) = h.reconcile().await;
    let error = result.expect_err("invalid spec is an error");
    assert!(error.contains("spec.retry.backoff.maxDelay"), "{error}");
    assert!(
        error.ends_with("-> Action { requeue_after: None }"),
        "waits for a spec change: {error}"
    );
    assert_eq!(lines(&calls), [format!("PATCH {PIPELINE}/status")]);
    let (status, reason, message) = h.condition("Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("spec.retry.backoff.maxDelay"), "{message}");
    assert!(
        h.queues().await.is_empty(),
        "nothing declared on the broker"
    );
    // Reconciling the same invalid spec again writes nothing more.
    let (_, calls) = h.reconcile().await;
    assert!(lines(&calls).is_empty(), "{:?}", lines(&calls));
}

#[tokio::test]
async fn a_missing_prometheus_rule_crd_reports_alerts_not_ready_while_the_broker_converges() {
    let h = Harness::new("op-nocrd", "Retain");
    h.api.set_crd(false);
    let (result, calls) = h.first_sync().await;
    assert_eq!(
        result,
        Ok(Action::requeue(Duration::from_secs(60))),
        "looks for the CRD again soon"
    );
    assert!(
        !lines(&calls).iter().any(|l| l.contains("prometheusrules")),
        "{:?}",
        lines(&calls)
    );
    assert_eq!(h.condition("AlertsReady").0, "False");
    assert_eq!(h.condition("AlertsReady").1, "PrometheusRuleCRDMissing");
    assert_eq!(h.condition("BrokerReady").0, "True");
    assert!(h.queues().await.contains(&"notes_queue".to_string()));
    // The CRD appears: the next reconcile writes the rule and turns Ready.
    h.api.set_crd(true);
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert!(lines(&calls).contains(&format!("PATCH {RULE}")));
    assert_eq!(h.condition("Ready").0, "True");
}

#[tokio::test]
async fn a_missing_secret_is_broker_not_ready_and_retried_with_backoff() {
    let h = Harness::new("op-nosecret", "Retain");
    h.remove(SECRET);
    let (result, calls) = h.first_sync().await;
    let error = result.expect_err("a missing Secret is retried");
    assert!(
        error.contains("Secret notes-app/rabbitmq-admin does not exist"),
        "{error}"
    );
    assert!(
        error.ends_with("-> Action { requeue_after: Some(5s) }"),
        "{error}"
    );
    assert_eq!(h.condition("BrokerReady").1, "SecretMissing");
    assert_eq!(h.condition("Ready").0, "False");
    assert!(events(&calls).iter().any(|(r, _)| r == "SecretMissing"));
    assert!(h.queues().await.is_empty());
    // Second failure: the backoff doubles.
    let (result, _) = h.reconcile().await;
    assert!(result.expect_err("still missing").ends_with("Some(10s) }"));
}

#[tokio::test]
async fn wrong_credentials_never_reach_status_or_events() {
    let h = Harness::new("op-badauth", "Retain");
    let mut bad = secret(&h.vhost.name);
    bad["stringData"]["uri"] = json!(format!(
        "amqp://guest:Sup3r-Secret-Pw@127.0.0.1:5673/{}",
        support::encode(&h.vhost.name)
    ));
    h.api.put(SECRET, bad);
    let (result, calls) = h.first_sync().await;
    let error = result.expect_err("bad credentials fail");
    assert_eq!(h.condition("BrokerReady").1, "BrokerAuthenticationFailed");
    let everything = format!(
        "{error} {calls:?} {}",
        h.api.get(PIPELINE).expect("pipeline")
    );
    assert!(!everything.contains("Sup3r-Secret-Pw"), "password leaked");
}

#[tokio::test]
async fn deleting_with_retain_releases_the_finalizer_and_leaves_the_broker_alone() {
    let h = Harness::new("op-retain", "Retain");
    assert!(h.first_sync().await.0.is_ok());
    h.mark_deleted();
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::await_change()));
    assert_eq!(
        lines(&calls),
        [format!("PATCH {PIPELINE}")],
        "only the finalizer removal"
    );
    // Released: the API server removes the object once its last finalizer is gone.
    assert_eq!(h.api.get(PIPELINE), None, "released and removed");
    assert_eq!(h.queues().await.len(), 6, "all six queues stay");
}

#[tokio::test]
async fn deleting_with_delete_removes_empty_objects_and_keeps_a_dlq_holding_messages() {
    let h = Harness::new("op-delete", "Delete");
    assert!(h.first_sync().await.0.is_ok());
    let (connection, channel) = support::amqp_channel(&h.vhost.name).await;
    support::publish(&channel, "notes_dlq_exchange", "", b"a dead letter").await;
    connection.close(200, "done".into()).await.expect("close");
    h.mark_deleted();
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::await_change()));
    assert_eq!(
        lines(&calls),
        [format!("GET {SECRET}"), format!("PATCH {PIPELINE}")]
    );
    assert_eq!(
        h.queues().await,
        ["notes_queue_dlq"],
        "only the DLQ with its message stays"
    );
    let notes = events(&calls);
    assert!(
        notes
            .iter()
            .any(|(r, n)| r == "Kept" && n.contains("notes_queue_dlq")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|(r, n)| r == "Deleted" && n.contains("notes_queue.retry.1.1s")),
        "{notes:?}"
    );
}

#[tokio::test]
async fn deleting_when_the_secret_is_gone_releases_with_a_warning_saying_what_was_left() {
    let h = Harness::new("op-gone", "Delete");
    assert!(h.first_sync().await.0.is_ok());
    h.remove(SECRET);
    h.mark_deleted();
    let (result, calls) = h.reconcile().await;
    assert_eq!(
        result,
        Ok(Action::await_change()),
        "never stuck in Terminating"
    );
    assert_eq!(
        lines(&calls),
        [format!("GET {SECRET}"), format!("PATCH {PIPELINE}")]
    );
    let notes = events(&calls);
    assert!(
        notes
            .iter()
            .any(|(r, n)| r == "CleanupSkipped" && n.contains("notes_queue_dlq")),
        "{notes:?}"
    );
    assert_eq!(
        h.queues().await.len(),
        6,
        "nothing deleted without the broker Secret"
    );
}

/// A second pipeline on the same vhost and Secret, with its own names.
fn orders_object(vhost: &str) -> Value {
    let mut object = notes_object(vhost, "Retain");
    object["metadata"]["name"] = json!("orders");
    object["metadata"]["uid"] = json!("6f1d2c3b-4a59-4e6f-8a7b-9c0d1e2f3a4b");
    let spec = &mut object["spec"];
    spec["queue"] = json!({"name": "orders_queue", "type": "quorum"});
    spec["deadLetter"] = json!({});
    object
}

/// Two new pipelines on one vhost, reconciled at the same time on a real broker: they share
/// one batch (policies of both first) and each is Ready after its one reconcile.
#[tokio::test]
async fn pipelines_created_together_converge_in_one_reconcile_each() {
    let h = Harness::new("op-burst", "Retain");
    h.api.put(ORDERS, orders_object(&h.vhost.name));
    let started = std::time::Instant::now();
    let ((notes, _), (orders, _)) =
        futures_util::future::join(h.reconcile_at(PIPELINE), h.reconcile_at(ORDERS)).await;
    assert_eq!(notes, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(orders, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(h.condition("Ready").0, "True");
    let orders_ready = h.api.get(ORDERS).expect("orders")["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(orders_ready, "orders not Ready after one reconcile");
    let queues = h.queues().await;
    for queue in [
        "notes_queue",
        "notes_queue_dlq",
        "notes_queue.retry.4.8s",
        "orders_queue",
    ] {
        assert!(
            queues.contains(&queue.to_string()),
            "{queue} missing from {queues:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "two pipelines took {:?}",
        started.elapsed()
    );
}
