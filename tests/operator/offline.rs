//! The reconcile without RabbitMQ: the mocked Kubernetes API and the in-memory broker
//! (`MemoryBroker`), so ordering and status wording are tested on any machine. The same
//! reconcile runs against a real broker in the other tests of this binary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use msgpipe::api::MessagePipeline;
use msgpipe::broker::MemoryBroker;
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, error_policy, reconcile,
};
use serde_json::{Value, json};

use super::fake_api::{Call, FakeApi};
use super::{CONFIG_MAP, PIPELINE, RULE, SECRET, events, notes_object};

const VHOST: &str = "offline";

/// A fake cluster and an in-memory broker, whose writes go to one journal in order.
struct Offline {
    api: FakeApi,
    broker: Arc<MemoryBroker>,
    ctx: Arc<Context<MemoryBroker>>,
    journal: Arc<Mutex<Vec<String>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl Offline {
    fn new() -> Self {
        let api = FakeApi::default();
        api.set_crd(true);
        api.put(PIPELINE, notes_object(VHOST, "Retain"));
        api.put(
            SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "rabbitmq-admin", "namespace": super::NS},
                "stringData": {"uri": "amqp://app:Sup3r-Secret-Pw@rabbit.invalid:5672/%2f"}
            }),
        );
        let journal = Arc::new(Mutex::new(Vec::new()));
        api.journal_to(journal.clone());
        let broker =
            Arc::new(MemoryBroker::new("amqp://app@rabbit.invalid:5672").with_vhost(VHOST, 4));
        let to_journal = journal.clone();
        broker.on_write(move |_, action| {
            to_journal
                .lock()
                .expect("journal")
                .push(format!("broker: {action}"));
        });
        let shared = broker.clone();
        let brokers = BrokerPool::with_connector(
            Duration::from_secs(5),
            BROKER_CONCURRENCY,
            Box::new(move |_, _| Ok(shared.clone())),
        );
        let (client, server) = api.client();
        let ctx = Arc::new(Context::with_brokers(
            client,
            Arc::new(Metrics::default()),
            OperatorConfig::default(),
            brokers,
        ));
        Self {
            api,
            broker,
            ctx,
            journal,
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

    /// The first reconcile: the finalizer, then the converge in the same pass.
    async fn first_sync(&self) -> (Result<Action, String>, Vec<Call>) {
        let (result, calls) = self.reconcile().await;
        assert_eq!(
            calls.first().map(Call::line),
            Some(format!("PATCH {PIPELINE}")),
            "first: the finalizer"
        );
        (result, calls)
    }

    /// `kubectl apply` of a spec change: the server bumps the generation.
    fn change_spec(&self, change: impl FnOnce(&mut Value)) {
        let mut object = self.api.get(PIPELINE).expect("pipeline");
        change(&mut object["spec"]);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        object["metadata"]["generation"] = json!(generation);
        self.api.put(PIPELINE, object);
    }

    fn take_journal(&self) -> Vec<String> {
        std::mem::take(&mut *self.journal.lock().expect("journal"))
    }

    /// The retry queues the ConfigMap announces to clients.
    fn announced(&self) -> Vec<String> {
        let config_map = self.api.get(CONFIG_MAP).expect("ConfigMap");
        let json: Value = serde_json::from_str(
            config_map["data"]["pipeline.json"]
                .as_str()
                .expect("pipeline.json"),
        )
        .expect("json");
        json["retry"]["tiers"]
            .as_array()
            .expect("tiers")
            .iter()
            .map(|t| t["queue"].as_str().expect("queue").to_string())
            .collect()
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

    fn retry_queues_on_broker(&self) -> Vec<String> {
        self.broker
            .vhost(VHOST)
            .expect("vhost")
            .queues
            .into_keys()
            .filter(|q| q.starts_with("notes_queue.retry."))
            .collect()
    }
}

fn position(journal: &[String], entry: &str) -> usize {
    journal
        .iter()
        .position(|e| e == entry)
        .unwrap_or_else(|| panic!("{entry:?} not in {journal:#?}"))
}

/// Where queue `queue` was declared (whatever its type).
fn declared(journal: &[String], queue: &str) -> usize {
    let prefix = format!("broker: create queue {queue} (");
    journal
        .iter()
        .position(|e| e.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{queue} never declared: {journal:#?}"))
}

fn set_max_attempts(attempts: u32) -> impl FnOnce(&mut Value) {
    move |spec| spec["retry"]["maxAttempts"] = json!(attempts)
}

#[tokio::test]
async fn offline_first_reconcile_converges_and_announces_tiers_only_after_declaring_them() {
    let h = Offline::new();
    let (result, _) = h.first_sync().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(h.condition("Ready").0, "True");
    let journal = h.take_journal();
    let config_map = position(&journal, &format!("kube: PATCH {CONFIG_MAP}"));
    let announced = h.announced();
    assert_eq!(announced.len(), 4, "{announced:?}");
    for queue in &announced {
        let declared = declared(&journal, queue);
        assert!(
            declared < config_map,
            "{queue} announced before it existed: {journal:#?}"
        );
    }
    // Converged: a second pass writes nothing anywhere.
    let (result, _) = h.reconcile().await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(h.take_journal(), Vec::<String>::new());
}

/// Pipelines reconciled at the same time share one batch of their vhost: one snapshot, every
/// pipeline's policies before any of their queues (as `msgpipe apply` does), and each is
/// Ready after one reconcile, with no pass held back for a quiet period.
#[tokio::test]
async fn pipelines_reconciled_together_put_all_their_policies_before_any_queue() {
    let h = Offline::new();
    let names = ["alpha", "beta", "gamma", "delta"];
    let mut paths = Vec::new();
    for name in names {
        let mut object = notes_object(VHOST, "Retain");
        object["metadata"]["name"] = json!(name);
        object["spec"]["queue"] = json!({"name": format!("{name}_queue")});
        object["spec"]["deadLetter"] = json!({});
        let collection = PIPELINE.rsplit_once('/').expect("a path").0;
        let path = format!("{collection}/{name}");
        h.api.put(&path, object);
        paths.push(path);
    }
    let reconciles = paths.iter().map(|path| {
        let object = h.api.get(path).expect("stored");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        reconcile(pipeline, h.ctx.clone())
    });
    let results = futures_util::future::join_all(reconciles).await;
    for (name, result) in names.iter().zip(results) {
        let action = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(action, Action::requeue(Duration::from_secs(300)), "{name}");
    }
    for path in &paths {
        let object = h.api.get(path).expect("stored");
        let ready = object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{path} not Ready after one reconcile: {object}");
    }
    let journal = h.take_journal();
    let broker: Vec<&String> = journal
        .iter()
        .filter(|e| e.starts_with("broker: "))
        .collect();
    let last_policy = broker
        .iter()
        .rposition(|e| e.contains(" policy "))
        .expect("policies written");
    let first_queue = broker
        .iter()
        .position(|e| e.starts_with("broker: create queue"))
        .expect("queues declared");
    assert!(
        last_policy < first_queue,
        "a queue was declared before every policy of the batch was in: {broker:#?}"
    );
    for name in names {
        assert!(
            broker
                .iter()
                .any(|e| e.starts_with(&format!("broker: create queue {name}_queue ("))),
            "{name}_queue never declared: {broker:#?}"
        );
    }
}

#[tokio::test]
async fn added_tiers_reach_the_broker_before_the_config_map_announces_them() {
    let h = Offline::new();
    h.change_spec(set_max_attempts(3));
    assert!(h.first_sync().await.0.is_ok());
    assert_eq!(h.announced().len(), 2);
    h.take_journal();

    h.change_spec(set_max_attempts(7));
    let (result, _) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let journal = h.take_journal();
    let announced = h.announced();
    assert_eq!(announced.len(), 6, "{announced:?}");
    let config_map = position(&journal, &format!("kube: PATCH {CONFIG_MAP}"));
    for new in &announced[2..] {
        let declared = declared(&journal, new);
        let bound = journal
            .iter()
            .position(|e| e.starts_with("broker: bind ") && e.contains(&format!("-> {new} ")))
            .unwrap_or_else(|| panic!("{new} never bound: {journal:#?}"));
        assert!(
            declared < config_map && bound < config_map,
            "{new} announced before it was usable: {journal:#?}"
        );
    }
}

#[tokio::test]
async fn removed_tiers_leave_the_config_map_first_and_the_broker_only_once_empty() {
    let h = Offline::new();
    assert!(h.first_sync().await.0.is_ok());
    assert_eq!(h.announced().len(), 4);
    // Tier 4 still holds a message waiting out its delay.
    assert!(h.broker.set_messages(VHOST, "notes_queue.retry.4.8s", 1));
    h.take_journal();

    h.change_spec(set_max_attempts(3));
    let (result, _) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let journal = h.take_journal();
    assert_eq!(
        h.announced(),
        ["notes_queue.retry.1.1s", "notes_queue.retry.2.2s"]
    );
    let config_map = position(&journal, &format!("kube: PATCH {CONFIG_MAP}"));
    let first_retirement = journal
        .iter()
        .position(|e| e.starts_with("broker: unbind") || e.starts_with("broker: delete"))
        .unwrap_or_else(|| panic!("no tier retired: {journal:#?}"));
    assert!(
        config_map < first_retirement,
        "clients must stop using a tier before it goes: {journal:#?}"
    );
    assert!(
        journal.contains(
            &"broker: delete queue notes_queue.retry.3.4s if empty and unused".to_string()
        )
    );
    assert_eq!(
        h.retry_queues_on_broker(),
        [
            "notes_queue.retry.1.1s",
            "notes_queue.retry.2.2s",
            "notes_queue.retry.4.8s"
        ],
        "the tier holding a message stays until it is empty"
    );

    // Once its message has gone back to the work queue, the next pass removes it.
    assert!(h.broker.set_messages(VHOST, "notes_queue.retry.4.8s", 0));
    assert!(h.reconcile().await.0.is_ok());
    assert_eq!(
        h.retry_queues_on_broker(),
        ["notes_queue.retry.1.1s", "notes_queue.retry.2.2s"]
    );
}

#[tokio::test]
async fn new_tiers_are_not_announced_while_the_broker_is_unreachable() {
    let h = Offline::new();
    h.change_spec(set_max_attempts(3));
    assert!(h.first_sync().await.0.is_ok());
    h.take_journal();
    h.broker.set_unreachable(Some("connection refused"));

    h.change_spec(set_max_attempts(7));
    let (result, calls) = h.reconcile().await;
    let error = result.expect_err("an unreachable broker is retried");
    assert!(error.contains("connection refused"), "{error}");
    assert_eq!(
        h.announced().len(),
        2,
        "clients still see only the tiers that exist"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.method == Method::PATCH && c.path == CONFIG_MAP),
        "{calls:?}"
    );
    let (status, reason, message) = h.condition("BrokerReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "BrokerUnreachable")
    );
    assert!(message.contains("connection refused"), "{message}");
    assert!(!message.contains("Sup3r-Secret-Pw"));
}

/// Every condition message and event note a person reads.
fn readable_texts(h: &Offline, calls: &[Call]) -> Vec<String> {
    let pipeline = h.api.get(PIPELINE).expect("pipeline");
    let mut texts: Vec<String> = pipeline["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["message"].as_str().unwrap_or_default().to_string())
        .collect();
    texts.extend(events(calls).into_iter().map(|(_, note)| note));
    texts
}

#[tokio::test]
async fn a_forbidden_rule_delete_reads_plainly_in_conditions_and_events() {
    let h = Offline::new();
    assert!(h.first_sync().await.0.is_ok());
    assert!(h.api.get(RULE).is_some());
    h.api.forbid(Method::DELETE, RULE);
    h.change_spec(|spec| spec["alerts"]["enabled"] = json!(false));
    let (result, calls) = h.reconcile().await;
    assert!(result.is_ok(), "alerts do not block the broker: {result:?}");
    let (status, reason, message) = h.condition("AlertsReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AlertsApplyFailed")
    );
    assert!(
        message.starts_with("cannot delete PrometheusRule notes-app/notes-alerts: forbidden: ")
            && message.contains(
                "cannot delete resource \"prometheusrules\" in API group \"monitoring.coreos.com\""
            )
            && message.contains("RBAC"),
        "{message}"
    );
    assert_eq!(h.condition("Ready").1, "AlertsApplyFailed");
    let texts = readable_texts(&h, &calls);
    assert!(texts.len() >= 3);
    for text in texts {
        assert!(!text.contains("Status {"), "{text}");
        assert!(text.len() <= 1024, "{} bytes: {text}", text.len());
        assert!(!text.contains('\n'), "{text}");
    }
}

#[tokio::test]
async fn a_forbidden_config_map_write_fails_the_reconcile_in_plain_words() {
    let h = Offline::new();
    h.api.forbid(Method::PATCH, CONFIG_MAP);
    let (result, calls) = h.first_sync().await;
    let error = result.expect_err("a ConfigMap the operator may not write is an error");
    assert!(
        error.starts_with("cannot apply ConfigMap notes-app/notes-client: forbidden: "),
        "{error}"
    );
    assert!(
        !error.contains("Status {") && !error.contains("failed to apply object"),
        "{error}"
    );
    for text in readable_texts(&h, &calls) {
        assert!(!text.contains("Status {") && text.len() <= 1024, "{text}");
    }
}

#[tokio::test]
async fn a_broker_message_longer_than_a_kibibyte_is_cut_on_a_char_boundary() {
    let h = Offline::new();
    let reason = format!("{}\nsecond line", "ü".repeat(900));
    h.broker.set_unreachable(Some(&reason));
    let (result, calls) = h.first_sync().await;
    assert!(result.is_err());
    let (_, reason, message) = h.condition("BrokerReady");
    assert_eq!(reason, "BrokerUnreachable");
    assert!(
        message.len() <= 1024 && message.ends_with('…'),
        "{} bytes",
        message.len()
    );
    for text in readable_texts(&h, &calls) {
        assert!(
            text.len() <= 1024 && !text.contains('\n'),
            "{} bytes",
            text.len()
        );
    }
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_log_line_of_a_reconcile_names_the_pipeline() {
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let h = Offline::new();
    assert!(h.first_sync().await.0.is_ok());
    // A failing pass logs too (the error, without kube's wrapper).
    h.api.forbid(Method::PATCH, &format!("{PIPELINE}/status"));
    h.broker.set_unreachable(Some("connection refused"));
    let (result, _) = h.reconcile().await;
    assert!(result.is_err());
    let text = String::from_utf8(buffer.0.lock().expect("log buffer").clone()).expect("utf-8");
    let ours: Vec<&str> = text.lines().filter(|l| l.contains(" msgpipe::")).collect();
    assert!(
        ours.iter().any(|l| l.contains("broker changed")),
        "broker changes are logged: {text}"
    );
    assert!(
        ours.iter().any(|l| l.contains("reconcile failed")),
        "{text}"
    );
    for line in &ours {
        assert!(line.contains("pipeline=notes-app/notes"), "{line}");
        assert!(
            !line.contains("Status {") && !line.contains("failed to apply object"),
            "{line}"
        );
        assert!(!line.contains("Sup3r-Secret-Pw"), "{line}");
    }
}

#[tokio::test]
async fn deleting_on_an_unreachable_broker_retries_then_releases_after_the_cleanup_timeout() {
    let h = Offline::new();
    h.change_spec(|spec| spec["deletionPolicy"] = json!("Delete"));
    assert!(h.first_sync().await.0.is_ok());
    h.broker.set_unreachable(Some("connection refused"));
    let mark_deleted = |at: &str| {
        let mut object = h.api.get(PIPELINE).expect("pipeline");
        object["metadata"]["deletionTimestamp"] = json!(at);
        h.api.put(PIPELINE, object);
    };
    mark_deleted(&k8s_openapi::jiff::Timestamp::now().to_string());
    let (result, calls) = h.reconcile().await;
    let error = result.expect_err("retried while the broker may come back");
    assert!(error.contains("connection refused"), "{error}");
    assert!(
        events(&calls)
            .iter()
            .any(|(r, n)| r == "BrokerUnreachable" && n.contains("connection refused")),
        "{:?}",
        events(&calls)
    );
    assert_eq!(
        h.api.get(PIPELINE).expect("pipeline")["metadata"]["finalizers"],
        json!(["msgpipe.io/cleanup"]),
        "still held"
    );
    // Deleted longer ago than the cleanup timeout: released, saying what was left.
    mark_deleted("2026-01-01T00:00:00Z");
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::await_change()));
    assert!(
        events(&calls)
            .iter()
            .any(|(r, n)| r == "CleanupAbandoned" && n.contains("notes_queue_dlq")),
        "{:?}",
        events(&calls)
    );
    // Released: the API server removes the object once its last finalizer is gone.
    assert_eq!(h.api.get(PIPELINE), None, "released and removed");
    assert_eq!(h.retry_queues_on_broker().len(), 4, "nothing deleted");
}

/// `spec.alerts.notify` with one Slack receiver whose webhook URL stays in a Secret.
fn notify_slack(spec: &mut Value) {
    spec["alerts"]["notify"] = json!([{
        "name": "team-slack",
        "slack": {"webhookUrl": {"name": "alerting", "key": "slack-url"}, "channel": "#notes"}
    }]);
}

const NOTIFY: &str =
    "/apis/monitoring.coreos.com/v1alpha1/namespaces/notes-app/alertmanagerconfigs/notes-notify";

#[tokio::test]
async fn notify_writes_an_alertmanager_config_and_removing_it_deletes_the_config() {
    let h = Offline::new();
    h.api.0.lock().expect("state").alertmanager_config_crd = true;
    let (result, calls) = h.first_sync().await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        !calls
            .iter()
            .any(|c| c.path.contains("alertmanagerconfigs") || c.path.ends_with("/v1alpha1")),
        "a pipeline without notify never asks for AlertmanagerConfigs: {calls:?}"
    );

    h.change_spec(notify_slack);
    let (result, _) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let config = h.api.get(NOTIFY).expect("AlertmanagerConfig written");
    let text = config.to_string();
    assert!(
        text.contains("slack-url") && text.contains("#notes"),
        "{text}"
    );
    assert_eq!(
        config["metadata"]["ownerReferences"][0]["kind"], "MessagePipeline",
        "owned by the pipeline"
    );
    let pipeline = h.api.get(PIPELINE).expect("pipeline");
    assert_eq!(pipeline["status"]["alertmanagerConfig"], "notes-notify");
    let (status, reason, message) = h.condition("AlertsReady");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Converged"));
    assert!(message.contains("notes-notify"), "{message}");

    // Converged: read, nothing written.
    let (_, calls) = h.reconcile().await;
    assert!(
        !calls
            .iter()
            .any(|c| c.path.contains("alertmanagerconfigs") && c.method != Method::GET),
        "{calls:?}"
    );

    h.change_spec(|spec| {
        spec["alerts"]
            .as_object_mut()
            .expect("alerts")
            .remove("notify");
    });
    let (result, calls) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        calls
            .iter()
            .any(|c| c.method == Method::DELETE && c.path == NOTIFY),
        "notify removed: the AlertmanagerConfig is deleted: {calls:?}"
    );
    assert!(h.api.get(NOTIFY).is_none());
    let pipeline = h.api.get(PIPELINE).expect("pipeline");
    assert!(
        pipeline["status"].get("alertmanagerConfig").is_none(),
        "{pipeline}"
    );
}

#[tokio::test]
async fn notify_without_the_alertmanager_config_crd_says_so_and_the_broker_still_converges() {
    let h = Offline::new();
    h.change_spec(notify_slack);
    let (result, _) = h.first_sync().await;
    assert!(result.is_ok(), "{result:?}");
    let (status, reason, message) = h.condition("AlertsReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AlertmanagerConfigCRDMissing")
    );
    assert!(
        message.contains("monitoring.coreos.com/v1alpha1"),
        "{message}"
    );
    let (broker, _, _) = h.condition("BrokerReady");
    assert_eq!(broker, "True");
}

#[tokio::test]
async fn a_migration_under_way_to_another_type_is_finished_by_the_operator_then_migrated_back() {
    use msgpipe::api::QueueType;
    use msgpipe::broker::migration::plan_migration;
    use msgpipe::broker::{BrokerApi, migrate::run_step};

    let h = Offline::new();
    let (synced, _) = h.first_sync().await;
    assert!(synced.is_ok(), "{synced:?}");
    assert_eq!(h.condition("Ready").0, "True");
    // `msgpipe migrate` to classic runs its holding phase, then stops (killed, say).
    let object = h.api.get(PIPELINE).expect("pipeline");
    let mut pipeline: MessagePipeline = serde_json::from_value(object).expect("pipeline");
    pipeline.spec.queue.queue_type = QueueType::Classic;
    let to_classic = msgpipe::plan::plan(&pipeline, None).expect("plans");
    let live = h.broker.snapshot(VHOST).await.expect("vhost");
    let holding = plan_migration(&to_classic, &live)
        .expect("plans")
        .expect("a migration");
    for step in &holding.steps {
        run_step(&*h.broker, VHOST, step, &mut |_| {})
            .await
            .expect("step");
    }
    // The operator, on the quorum spec, finishes the migration to classic (the holding
    // queues record it), then migrates back: Migrating meanwhile.
    let (result, calls) = h.reconcile().await;
    assert!(result.is_ok(), "{result:?}");
    let (status, reason, message) = h.condition("Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Migrating"));
    assert!(
        message.contains(
            "migration of notes_queue to classic found under way on the broker, then to quorum"
        ),
        "{message}"
    );
    assert!(
        events(&calls)
            .iter()
            .any(|(reason, _)| reason == "Migrating"),
        "{:?}",
        events(&calls)
    );
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (result, _) = h.reconcile().await;
        assert!(result.is_ok(), "{result:?}");
        if h.condition("Ready").0 == "True" {
            break;
        }
    }
    assert_eq!(h.condition("Ready").1, "Converged");
    let live = h.broker.snapshot(VHOST).await.expect("vhost");
    assert_eq!(live.queues["notes_queue"].queue_type, "quorum");
    assert!(live.queues.keys().all(|q| !q.ends_with(".migrating")));
}
