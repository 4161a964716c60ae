//! The operator migrating a pipeline's queues itself (`spec.queue.type` changed), on the
//! mocked Kubernetes API: with a real RabbitMQ (a node of these tests' own, `msgpipe-opmigrate`
//! on port 5715, shovel plugin on) a classic queue holding messages moves to quorum through
//! reconcile passes, with progress in `status.migration`, an event per step and no message
//! lost, also across an operator "restart" mid-migration; with the in-memory broker, the
//! safety rail refuses to start and one-type policies are reported before the first step.

#[path = "operator/fake_api.rs"]
#[allow(dead_code)]
mod fake_api;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{Call, FakeApi};
use kube::runtime::controller::Action;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel};
use msgpipe::api::MessagePipeline;
use msgpipe::api::load::parse_pipelines;
use msgpipe::broker::migration::NodeRoom;
use msgpipe::broker::{BrokerApi, BrokerEndpoint, MemoryBroker, RabbitBroker};
use msgpipe::controller::migration::{MIGRATION_POLL, MIGRATION_RETRY};
use msgpipe::controller::{
    BROKER_CONCURRENCY, BrokerPool, Context, Metrics, OperatorConfig, PooledBroker, error_policy,
    reconcile,
};
use serde_json::{Value, json};
use support::{TestVhost, broker_node, confirm_channel, encode, http};

const NODE: &str = "msgpipe-opmigrate";
const PORT: u16 = 5715;
const NS: &str = "notes-app";
const PIPELINE: &str = "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/notes";
const SECRET: &str = "/api/v1/namespaces/notes-app/secrets/rabbitmq-admin";

fn api_url() -> String {
    format!("http://127.0.0.1:{}/api", PORT + 10000)
}

fn amqp_uri(vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:{PORT}/{}", encode(vhost))
}

fn vhost(prefix: &str) -> TestVhost {
    assert!(
        broker_node("ensure", NODE, &PORT.to_string(), &[], None),
        "the test node did not start (scripts/test-broker.sh ensure {NODE} {PORT})"
    );
    TestVhost::on(&api_url(), prefix)
}

/// The notes pipeline (tiers of 1 s and 2 s) on `vhost`, as the API server stores it.
fn pipeline_object(vhost: &str, queue_type: &str) -> Value {
    let yaml = format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: {NS} }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq-admin }}, vhost: \"{vhost}\" }}\n  queue: {{ name: notes_queue, type: {queue_type}, exchange: notes, routingKey: notes }}\n  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 2s }} }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n  deletionPolicy: Retain\n"
    );
    let pipeline = parse_pipelines(&yaml).expect("parses").remove(0);
    let mut object = serde_json::to_value(&pipeline).expect("json");
    object["metadata"]["uid"] = json!("0b6c3f0e-8a51-4d7e-9a0e-5f2d6c1e9a11");
    object["metadata"]["generation"] = json!(1);
    object["metadata"]["resourceVersion"] = json!("1");
    object
}

/// The fake cluster and one operator context over brokers from `pool`.
struct Harness<B: PooledBroker> {
    api: FakeApi,
    ctx: Option<Arc<Context<B>>>,
    pool: Box<dyn Fn() -> BrokerPool<B>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl<B: PooledBroker> Harness<B> {
    fn new(
        object: Value,
        uri: &str,
        management: Option<String>,
        pool: Box<dyn Fn() -> BrokerPool<B>>,
    ) -> Self {
        let api = FakeApi::default();
        api.set_crd(true);
        api.put(PIPELINE, object);
        let mut data = json!({"uri": uri});
        if let Some(management) = management {
            data["managementUri"] = json!(management);
        }
        api.put(
            SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "rabbitmq-admin", "namespace": NS},
                "stringData": data
            }),
        );
        let mut h = Self {
            api,
            ctx: None,
            pool,
            servers: Vec::new(),
        };
        h.start_operator();
        h
    }

    /// A fresh operator: a new context (nothing in memory), the same cluster and broker.
    fn start_operator(&mut self) {
        let (client, server) = self.api.client();
        self.servers.push(server);
        let config = OperatorConfig {
            broker_timeout: Duration::from_secs(15),
            ..OperatorConfig::default()
        };
        self.ctx = Some(Arc::new(Context::with_brokers(
            client,
            Arc::new(Metrics::default()),
            config,
            (self.pool)(),
        )));
    }

    /// The operator killed: its context, and with it its migration tasks, dropped.
    fn kill_operator(&mut self) {
        self.ctx = None;
    }

    async fn reconcile(&self) -> (Result<Action, String>, Vec<Call>) {
        let ctx = self.ctx.clone().expect("an operator runs");
        let object = self.api.get(PIPELINE).expect("pipeline stored");
        let pipeline: Arc<MessagePipeline> =
            Arc::new(serde_json::from_value(object).expect("pipeline"));
        let result = reconcile(pipeline.clone(), ctx.clone())
            .await
            .map_err(|error| {
                let action = error_policy(pipeline, &error, ctx.clone());
                format!("{error} -> {action:?}")
            });
        (result, self.api.take_calls())
    }

    async fn first_sync(&self) {
        // The finalizer and the first converge, in one pass.
        let (synced, _) = self.reconcile().await;
        assert!(synced.is_ok(), "{synced:?}");
        assert_eq!(
            self.condition("Ready").0,
            "True",
            "{:?}",
            self.condition("Ready")
        );
    }

    /// `kubectl apply` of another queue type: the server bumps the generation.
    fn set_type(&self, queue_type: &str) {
        let mut object = self.api.get(PIPELINE).expect("pipeline");
        object["spec"]["queue"]["type"] = json!(queue_type);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        object["metadata"]["generation"] = json!(generation);
        self.api.put(PIPELINE, object);
    }

    fn status(&self) -> Value {
        self.api.get(PIPELINE).expect("pipeline")["status"].clone()
    }

    fn condition(&self, kind: &str) -> (String, String, String) {
        let status = self.status();
        let c = status["conditions"]
            .as_array()
            .and_then(|list| list.iter().find(|c| c["type"] == kind))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} condition in {status}"));
        let text = |field: &str| c[field].as_str().unwrap_or_default().to_string();
        (text("status"), text("reason"), text("message"))
    }

    /// Reconciles (every `pause`) until the pipeline is Ready with no migration on its
    /// status, or `limit` passes; returns every (reason, note) of the events and every
    /// `status.migration` seen.
    async fn until_migrated(&self, limit: Duration, pause: Duration) -> Reconciled {
        let deadline = Instant::now() + limit;
        let mut seen = Reconciled::default();
        loop {
            let (result, calls) = self.reconcile().await;
            seen.events.extend(events(&calls));
            let migration = self.status()["migration"].clone();
            let ready = self.condition("Ready");
            if migration.is_null() && ready.0 == "True" {
                assert!(result.is_ok(), "{result:?}");
                return seen;
            }
            assert_eq!(ready.0, "False");
            if ready.1 == "Migrating" {
                assert_eq!(result, Ok(Action::requeue(MIGRATION_POLL)), "{ready:?}");
                assert!(!migration.is_null(), "Migrating without status.migration");
            }
            seen.statuses.push(migration);
            seen.conditions.push(ready);
            assert!(
                Instant::now() < deadline,
                "not migrated in {limit:?}; last status: {}",
                self.status()
            );
            tokio::time::sleep(pause).await;
        }
    }
}

#[derive(Default)]
struct Reconciled {
    events: Vec<(String, String)>,
    statuses: Vec<Value>,
    conditions: Vec<(String, String, String)>,
}

impl Reconciled {
    fn notes(&self, reason: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, note)| note.clone())
            .collect()
    }

    fn phases(&self) -> BTreeSet<String> {
        self.statuses
            .iter()
            .filter_map(|s| s["phase"].as_str().map(String::from))
            .collect()
    }
}

/// (reason, note) of every event posted.
fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.is_event() && c.method == http::Method::POST)
        .map(|c| {
            (
                c.body["reason"].as_str().unwrap_or_default().to_string(),
                c.body["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Brokers of the real node, deleting drained queues after 1.5 s (not 6 s) to keep the test short.
fn rabbit_pool() -> BrokerPool<RabbitBroker> {
    BrokerPool::with_connector(
        Duration::from_secs(15),
        BROKER_CONCURRENCY,
        Box::new(|endpoint: &BrokerEndpoint, timeout| {
            RabbitBroker::new(endpoint.clone(), timeout)
                .map(|b| Arc::new(b.with_delete_settle(Duration::from_millis(1500))))
        }),
    )
}

fn real_harness(vhost: &TestVhost) -> Harness<RabbitBroker> {
    Harness::new(
        pipeline_object(&vhost.name, "classic"),
        &amqp_uri(&vhost.name),
        Some(format!("http://127.0.0.1:{}", PORT + 10000)),
        Box::new(rabbit_pool),
    )
}

/// Publishes every id (message id and body), persistent, mandatory and confirmed.
async fn publish_ids(channel: &Channel, exchange: &str, key: &str, ids: &[String]) {
    for chunk in ids.chunks(500) {
        let mut confirms = Vec::new();
        for id in chunk {
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2);
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    options,
                    id.as_bytes(),
                    properties,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack(), "nacked");
            assert!(confirmation.take_message().is_none(), "returned");
        }
    }
}

/// Takes every message of `queue` (auto-ack): id -> how many copies.
async fn take_all(channel: &Channel, queue: &str) -> BTreeMap<String, u32> {
    let mut ids = BTreeMap::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}

/// Every queue of the vhost: name -> type.
fn queue_types(vhost: &TestVhost) -> BTreeMap<String, String> {
    let (status, body) = http(
        "GET",
        &format!(
            "{}/queues/{}?columns=name,type",
            api_url(),
            encode(&vhost.name)
        ),
        None,
        true,
    );
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = serde_json::from_str(&body).expect("json");
    rows.iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap_or_default().to_string(),
                q["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Every published id is in `found`, nothing else is, and copies beyond one stay within
/// `duplicates`.
fn assert_all_there(published: &[String], found: &BTreeMap<String, u32>, duplicates: u32) -> u32 {
    let expected: BTreeSet<&str> = published.iter().map(String::as_str).collect();
    let got: BTreeSet<&str> = found.keys().map(String::as_str).collect();
    let lost: Vec<&&str> = expected.difference(&got).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {lost:?}",
        expected.difference(&got).count()
    );
    assert_eq!(got, expected, "messages that were never published");
    let extra: u32 = found.values().map(|n| n - 1).sum();
    assert!(extra <= duplicates, "{extra} duplicates");
    extra
}

async fn preload(vhost: &TestVhost, work: usize, dead: usize) -> (Vec<String>, Vec<String>) {
    let (connection, channel) = confirm_channel(&amqp_uri(&vhost.name)).await;
    let work = ids("w", work);
    let dead = ids("d", dead);
    publish_ids(&channel, "notes", "notes", &work).await;
    publish_ids(&channel, "", "notes_queue_dlq", &dead).await;
    let _ = connection.close(200, "done".into()).await;
    (work, dead)
}

/// Checks every message is there once (copies within `duplicates`); returns the copies.
async fn drain_and_check(
    vhost: &TestVhost,
    work: &[String],
    dead: &[String],
    duplicates: u32,
) -> u32 {
    let (connection, channel) = confirm_channel(&amqp_uri(&vhost.name)).await;
    let work_copies = assert_all_there(work, &take_all(&channel, "notes_queue").await, duplicates);
    let dead_copies = assert_all_there(
        dead,
        &take_all(&channel, "notes_queue_dlq").await,
        duplicates,
    );
    let _ = connection.close(200, "done".into()).await;
    work_copies + dead_copies
}

fn assert_all_quorum(vhost: &TestVhost) {
    let types = queue_types(vhost);
    assert!(
        types.keys().all(|q| !q.ends_with(".migrating")),
        "holding queues left: {types:?}"
    );
    for (queue, kind) in &types {
        assert_eq!(kind, "quorum", "{queue}: {types:?}");
    }
    assert_eq!(types.len(), 4, "work queue, DLQ, two tiers: {types:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_with_messages_migrates_to_quorum_through_reconcile_passes() {
    let vhost = vhost("opmig-run");
    let h = real_harness(&vhost);
    h.first_sync().await;
    let (work, dead) = preload(&vhost, 3000, 200).await;
    let started = Instant::now();
    h.set_type("quorum");
    let seen = h
        .until_migrated(Duration::from_secs(50), Duration::from_millis(500))
        .await;
    let took = started.elapsed();
    // Progress: phases in order, moving to quorum with the shovel (RabbitMQ 4.x, plugin on).
    let first = &seen.statuses[0];
    assert_eq!(first["to"], "quorum", "{first}");
    assert_eq!(first["from"], "classic", "{first}");
    assert_eq!(first["mover"], "shovel", "{first}");
    assert!(first["startedAt"].is_string(), "{first}");
    let phases = seen.phases();
    assert!(
        phases.contains("Draining") || phases.contains("Returning"),
        "{phases:?}"
    );
    let moved = seen
        .statuses
        .iter()
        .filter_map(|s| s["moved"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(moved > 0, "no progress reported: {:?}", seen.statuses);
    assert!(
        seen.conditions.iter().all(|c| c.1 == "Migrating"),
        "{:?}",
        seen.conditions
    );
    // Events: the start, one per step (each once), the end.
    let steps = seen.notes("Migrating");
    assert!(
        steps[0]
            .starts_with("starting to migrate the queues of notes_queue from classic to quorum"),
        "{steps:?}"
    );
    for expected in [
        "[holding] create holding queue notes_queue.migrating (quorum)",
        "[draining] move every message of notes_queue into notes_queue.migrating",
        "[replacing] create queue notes_queue (quorum)",
        "[returning] move every message of notes_queue.migrating into notes_queue",
        "[returning] delete queues notes_queue.migrating, notes_queue_dlq.migrating once they hold no message",
    ] {
        // Exact, or followed by the drain's feeders.
        let count = steps
            .iter()
            .filter(|s| *s == expected || s.starts_with(&format!("{expected} until ")))
            .count();
        assert_eq!(count, 1, "{expected}: {steps:#?}");
    }
    let unique: BTreeSet<&String> = steps.iter().collect();
    assert_eq!(
        unique.len(),
        steps.len(),
        "a step reported twice: {steps:#?}"
    );
    let done = seen.notes("Migrated");
    assert_eq!(done.len(), 1, "{:?}", seen.events);
    assert!(
        done[0].starts_with("migrated the queues of notes_queue to quorum: "),
        "{done:?}"
    );
    // Converged, status cleared, nothing lost, every queue quorum.
    let (_, reason, _) = h.condition("Ready");
    assert_eq!(reason, "Converged");
    assert!(h.status()["migration"].is_null());
    assert_all_quorum(&vhost);
    drain_and_check(&vhost, &work, &dead, 0).await;
    println!(
        "operator migration of {} + {} messages, classic -> quorum, shovel: {:.1}s ({} reconciles)",
        work.len(),
        dead.len(),
        took.as_secs_f64(),
        seen.statuses.len() + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_migration_is_resumed_by_the_next_from_the_broker_and_loses_nothing()
{
    let vhost = vhost("opmig-kill");
    let mut h = real_harness(&vhost);
    h.first_sync().await;
    let (work, dead) = preload(&vhost, 5000, 100).await;
    h.set_type("quorum");
    // Run until the old queues are being drained (or later), then kill the operator.
    let deadline = Instant::now() + Duration::from_secs(30);
    let killed_in = loop {
        let _ = h.reconcile().await;
        let migration = h.status()["migration"].clone();
        let phase = migration["phase"].as_str().unwrap_or_default().to_string();
        if phase != "Holding" && !phase.is_empty() || migration["moved"].as_u64() > Some(0) {
            break phase;
        }
        assert!(Instant::now() < deadline, "no progress: {}", h.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    h.kill_operator();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holding = queue_types(&vhost);
    assert!(
        holding.contains_key("notes_queue.migrating"),
        "killed in {killed_in}: the broker shows the migration under way: {holding:?}"
    );
    // A new operator knows nothing; the broker tells it.
    h.start_operator();
    let resumed = Instant::now();
    let seen = h
        .until_migrated(Duration::from_secs(45), Duration::from_millis(500))
        .await;
    let notes = seen.notes("Migrating");
    assert!(
        notes[0].starts_with(
            "resuming the migration of notes_queue to quorum found under way on the broker"
        ),
        "{notes:?}"
    );
    assert_eq!(seen.notes("Migrated").len(), 1, "{:?}", seen.events);
    assert_all_quorum(&vhost);
    // At least once: a shovel stopped between a copy's confirm and the original's ack
    // duplicates at most its prefetch (1000).
    let copies = drain_and_check(&vhost, &work, &dead, 1000).await;
    println!(
        "killed in phase {killed_in}; the new operator finished in {:.1}s; {copies} duplicates",
        resumed.elapsed().as_secs_f64()
    );
}

/// The in-memory broker behind every endpoint.
fn memory_harness(queue_type: &str) -> (Harness<MemoryBroker>, Arc<MemoryBroker>) {
    let broker = Arc::new(MemoryBroker::new("amqp://app@rabbit.invalid:5672").with_vhost("mem", 4));
    let shared = broker.clone();
    let pool = move || {
        let shared = shared.clone();
        BrokerPool::with_connector(
            Duration::from_secs(5),
            BROKER_CONCURRENCY,
            Box::new(move |_, _| Ok(shared.clone())),
        )
    };
    let h = Harness::new(
        pipeline_object("mem", queue_type),
        "amqp://app:Sup3r-Secret-Pw@rabbit.invalid:5672/mem",
        None,
        Box::new(pool),
    );
    (h, broker)
}

#[tokio::test]
async fn a_migration_does_not_start_while_a_node_is_in_a_disk_alarm_and_starts_once_cleared() {
    let (h, broker) = memory_harness("classic");
    h.first_sync().await;
    broker.set_messages("mem", "notes_queue", 40);
    let alarm = |disk_alarm| NodeRoom {
        node: "rabbit@a".into(),
        memory_alarm: false,
        disk_alarm,
        disk_free: 10_000_000_000,
        disk_free_limit: 50_000_000,
    };
    broker.set_nodes(vec![alarm(true)]);
    let writes_before = broker.writes().len();
    h.set_type("quorum");
    let (result, calls) = h.reconcile().await;
    assert_eq!(result, Ok(Action::requeue(MIGRATION_RETRY)));
    let (status, reason, message) = h.condition("Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "MigrationRefused")
    );
    assert!(
        message.contains("node rabbit@a is in a disk alarm"),
        "{message}"
    );
    assert!(!message.contains("Sup3r"), "{message}");
    assert_eq!(h.status()["migration"]["phase"], "Refused");
    assert_eq!(h.status()["migration"]["to"], "quorum");
    assert!(
        events(&calls)
            .iter()
            .any(|(r, n)| r == "MigrationRefused" && n.contains("disk alarm")),
        "{:?}",
        events(&calls)
    );
    assert_eq!(
        broker.writes().len(),
        writes_before,
        "nothing written: {:?}",
        broker.writes()
    );
    broker.set_nodes(vec![alarm(false)]);
    let seen = h
        .until_migrated(Duration::from_secs(20), Duration::from_millis(50))
        .await;
    assert_eq!(seen.notes("Migrated").len(), 1, "{:?}", seen.events);
    let live = broker.snapshot("mem").await.expect("vhost");
    assert_eq!(live.queues["notes_queue"].queue_type, "quorum");
    assert_eq!(
        live.queues["notes_queue"].messages, 40,
        "every message back"
    );
    assert!(live.queues.keys().all(|q| !q.ends_with(".migrating")));
}

#[tokio::test]
async fn a_policy_for_classic_queues_only_is_reported_before_the_first_step() {
    use msgpipe::broker::BrokerAction;
    use msgpipe::plan::topology::{Policy, PolicyDefinition};
    let (h, broker) = memory_harness("classic");
    h.first_sync().await;
    let policy = Policy {
        name: "lazy-classic".into(),
        pattern: "^notes_queue$".into(),
        apply_to: "classic_queues".into(),
        priority: 50,
        definition: PolicyDefinition::default(),
    };
    let definition = serde_json::Map::from_iter([("max-length".to_string(), json!(1000))]);
    broker
        .execute(
            "mem",
            &BrokerAction::PutPolicy {
                policy,
                definition,
                exists: false,
            },
        )
        .await
        .expect("foreign policy");
    h.set_type("quorum");
    let seen = h
        .until_migrated(Duration::from_secs(20), Duration::from_millis(50))
        .await;
    let warning = seen
        .events
        .iter()
        .position(|(r, n)| {
            r == "TypeSpecificPolicy"
                && n == "policy lazy-classic (apply-to: classic_queues) matches queue notes_queue and stops applying to it once it is quorum"
        })
        .unwrap_or_else(|| panic!("no warning: {:?}", seen.events));
    let first_step = seen
        .events
        .iter()
        .position(|(r, n)| r == "Migrating" && n.starts_with('['))
        .expect("a step event");
    assert!(warning < first_step, "{:?}", seen.events);
    // The warning is on the status too, while the migration starts.
    assert!(
        seen.conditions[0].2.contains("policy lazy-classic"),
        "{:?}",
        seen.conditions
    );
}

#[test]
fn the_crd_admits_a_queue_type_change_and_shows_the_migration() {
    for path in [
        "crds/messagepipelines.msgpipe.io.yaml",
        "charts/msgpipe-operator/crds/messagepipelines.msgpipe.io.yaml",
    ] {
        let text = std::fs::read_to_string(support::repo_path(path)).expect("CRD");
        assert!(
            !text.contains("oldSelf"),
            "{path}: a transition rule is left"
        );
        let crd: Value = serde_saphyr::from_str(&text).expect("yaml");
        let version = &crd["spec"]["versions"][0];
        let columns = version["additionalPrinterColumns"]
            .as_array()
            .expect("columns");
        assert!(
            columns
                .iter()
                .any(|c| c["name"] == "Migration" && c["jsonPath"] == ".status.migration.phase"),
            "{path}: {columns:?}"
        );
        let migration = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["migration"]["properties"];
        for field in [
            "phase",
            "step",
            "from",
            "to",
            "moved",
            "remaining",
            "mover",
            "startedAt",
            "message",
        ] {
            assert!(
                migration.get(field).is_some(),
                "{path}: status.migration.{field}"
            );
        }
    }
}
