//! DeadLetterReplay runs against the mocked Kubernetes API and a RabbitMQ node of its own
//! (port 5692): the rate, the kill switch, a runner killed mid-replay, suspend and resume.
//! Each test has a vhost of its own; 1,000 dead letters with ids `r-0000`..`r-0999`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use msgpipe::api::load::parse_pipelines;
use msgpipe::api::{DeadLetterReplay, ReplayPhase};
use msgpipe::controller::Metrics;
use msgpipe::controller::replay::{
    ReplayContext, ReplaySettings, run_replay, run_replay_controller,
};
use serde_json::{Value, json};

use crate::fake_api::FakeApi;
use crate::isolation::Cluster;
use crate::support;

const NODE: &str = "msgpipe-replay16";
const PORT: u16 = 5692;
const NS: &str = "notes-app";
const DLX: &str = "notes_dlq_exchange";
const DLQ: &str = "notes_queue_dlq";
const WORK_QUEUE: &str = "notes_queue";
const DEAD_LETTERS: usize = 1000;
const PIPELINE: &str = "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/notes";
const SECRET: &str = "/api/v1/namespaces/notes-app/secrets/rabbitmq-admin";
const REPLAY: &str =
    "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/deadletterreplays/after-incident";
const REPLAY_UID: &str = "5f0c2d4e-16aa-4c3b-9d7e-2b8f1a6c0e16";

fn management(path: &str) -> String {
    format!("http://127.0.0.1:{}/api{path}", PORT + 10000)
}

fn uri(vhost: &str) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{PORT}/{}",
        support::encode(vhost)
    )
}

/// A vhost on the replay node for one test.
struct Vhost(String);

impl Vhost {
    fn new(prefix: &str) -> Self {
        assert!(
            support::broker_node("ensure", NODE, &PORT.to_string(), &[], None),
            "replay node starts"
        );
        let name = format!("{prefix}-{}", std::process::id());
        let path = format!("/vhosts/{}", support::encode(&name));
        let _ = support::http("DELETE", &management(&path), None, true);
        let (status, body) = support::http("PUT", &management(&path), None, true);
        assert!((200..300).contains(&status), "vhost: {body}");
        let all = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let permissions = format!("/permissions/{}/guest", support::encode(&name));
        let (status, body) = support::http("PUT", &management(&permissions), Some(&all), true);
        assert!((200..300).contains(&status), "permissions: {body}");
        Vhost(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let path = format!("/vhosts/{}", support::encode(&self.0));
        let _ = support::http("DELETE", &management(&path), None, true);
    }
}

fn pipeline_yaml(vhost: &str) -> String {
    format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: {NS} }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq-admin }}, vhost: \"{vhost}\" }}\n  queue: {{ name: notes_queue, exchange: notes, routingKey: notes }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 1m }} }}\n"
    )
}

/// The test's world: the fake API holding the pipeline, its Secret and the replay; the
/// pipeline provisioned on the node with 1,000 dead letters in its DLQ.
struct World {
    api: FakeApi,
    vhost: Vhost,
    metrics: Arc<Metrics>,
}

impl World {
    async fn new(prefix: &str, replay_spec: Value) -> Self {
        let vhost = Vhost::new(prefix);
        let yaml = pipeline_yaml(&vhost.0);
        let pipeline = parse_pipelines(&yaml).expect("parses").remove(0);
        let state = msgpipe::plan::plan(&pipeline, None).expect("plans");
        support::client_provision(&state, PORT).await;
        let api = FakeApi::default();
        let mut object = serde_json::to_value(&pipeline).expect("json");
        object["metadata"]["uid"] = json!("0b6c3f0e-8a51-4d7e-9a0e-5f2d6c1e9a11");
        api.put(PIPELINE, object);
        api.put(
            SECRET,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "rabbitmq-admin", "namespace": NS},
                "stringData": {
                    "uri": uri(&vhost.0),
                    "managementUri": format!("http://127.0.0.1:{}", PORT + 10000)
                }
            }),
        );
        api.put(
            REPLAY,
            json!({
                "apiVersion": "msgpipe.io/v1alpha1", "kind": "DeadLetterReplay",
                "metadata": {"name": "after-incident", "namespace": NS, "uid": REPLAY_UID,
                             "generation": 1, "resourceVersion": "1",
                             "creationTimestamp": "2026-12-02T00:00:00Z"},
                "spec": replay_spec,
            }),
        );
        let world = World {
            api,
            vhost,
            metrics: Arc::new(Metrics::default()),
        };
        world.fill_dlq().await;
        world
    }

    async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        crate::support::confirm_channel(&uri(&self.vhost.0)).await
    }

    async fn fill_dlq(&self) {
        let (connection, channel) = self.channel().await;
        let mut confirms = Vec::new();
        for i in 0..DEAD_LETTERS {
            let mut headers = FieldTable::default();
            for (name, value) in [
                (msgpipe_client::headers::ERROR, "db timeout"),
                (msgpipe_client::headers::REASON, "max-attempts"),
            ] {
                headers.insert(ShortString::from(name), AMQPValue::LongString(value.into()));
            }
            let properties = BasicProperties::default()
                .with_message_id(format!("r-{i:04}").into())
                .with_delivery_mode(2)
                .with_headers(headers);
            let confirm = channel
                .basic_publish(
                    DLX.into(),
                    "notes".into(),
                    BasicPublishOptions::default(),
                    format!("note {i}").as_bytes(),
                    properties,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
        assert_eq!(support::depth(&channel, DLQ).await as usize, DEAD_LETTERS);
        let _ = connection.close(200, "filled".into()).await;
    }

    fn context(&self, check_interval: Duration) -> (ReplayContext, tokio::task::JoinHandle<()>) {
        let (client, server) = self.api.client();
        let settings = ReplaySettings {
            check_interval,
            broker_timeout: Duration::from_secs(10),
            ..ReplaySettings::default()
        };
        (
            ReplayContext::new(client, self.metrics.clone(), settings, "test"),
            server,
        )
    }

    fn replay(&self) -> DeadLetterReplay {
        serde_json::from_value(self.api.get(REPLAY).expect("replay stored")).expect("replay")
    }

    fn status(&self) -> Value {
        self.api.get(REPLAY).expect("replay stored")["status"].clone()
    }

    fn set_suspend(&self, suspend: bool) {
        let mut object = self.api.get(REPLAY).expect("replay");
        object["spec"]["suspend"] = json!(suspend);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        object["metadata"]["generation"] = json!(generation);
        self.api.put(REPLAY, object);
    }

    async fn depths(&self) -> (usize, usize) {
        let (connection, channel) = self.channel().await;
        let work = support::depth(&channel, WORK_QUEUE).await as usize;
        let dlq = support::depth(&channel, DLQ).await as usize;
        let _ = connection.close(200, "counted".into()).await;
        (work, dlq)
    }

    /// Message ids in both queues (read without taking them).
    async fn tally(&self) -> Tally {
        Tally {
            work: ids_in(&uri(&self.vhost.0), WORK_QUEUE).await,
            dlq: ids_in(&uri(&self.vhost.0), DLQ).await,
        }
    }

    fn event_reasons(&self) -> Vec<String> {
        self.api
            .take_calls()
            .iter()
            .filter(|c| c.is_event() && c.method == http::Method::POST)
            .filter_map(|c| c.body["reason"].as_str().map(str::to_string))
            .collect()
    }
}

struct Tally {
    work: Vec<String>,
    dlq: Vec<String>,
}

impl Tally {
    fn missing(&self) -> Vec<String> {
        let present: BTreeSet<&String> = self.work.iter().chain(&self.dlq).collect();
        (0..DEAD_LETTERS)
            .map(|i| format!("r-{i:04}"))
            .filter(|id| !present.contains(id))
            .collect()
    }

    fn duplicates(&self) -> usize {
        let distinct: BTreeSet<&String> = self.work.iter().chain(&self.dlq).collect();
        self.work.len() + self.dlq.len() - distinct.len()
    }
}

async fn ids_in(uri: &str, queue: &str) -> Vec<String> {
    let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await
        .expect("get")
    {
        let properties = &message.delivery.properties;
        ids.push(
            properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string())
                .unwrap_or_default(),
        );
    }
    let _ = connection.close(200, "done".into()).await;
    ids
}

fn number(status: &Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("status.{field} in {status}"))
}

/// Times, from outside, how long the work queue takes to go from its first copy to `count`.
fn time_copies(world: &World, count: usize) -> tokio::task::JoinHandle<Option<Duration>> {
    let uri = uri(&world.vhost.0);
    tokio::spawn(async move {
        let connection = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("AMQP connects");
        let channel = connection.create_channel().await.expect("channel");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = None;
        while Instant::now() < deadline {
            let depth = support::depth(&channel, WORK_QUEUE).await as usize;
            let now = Instant::now();
            if depth > 0 && first.is_none() {
                first = Some(now);
            }
            if depth >= count {
                return first.map(|at| now - at);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    })
}

#[tokio::test]
async fn replay_of_1000_at_200_per_second_takes_5_seconds_and_status_matches_the_broker() {
    let world = World::new(
        "dlr-rate",
        json!({"pipelineRef": {"name": "notes"}, "rate": 200}),
    )
    .await;
    let (ctx, _server) = world.context(Duration::from_secs(1));
    let timer = time_copies(&world, DEAD_LETTERS);
    let started = Instant::now();
    let phase = run_replay(&ctx, world.replay()).await.expect("replay runs");
    let total = started.elapsed();
    let copying = timer.await.expect("timer").expect("all copies arrived");
    println!(
        "1000 copies at 200/s: {copying:?} from first to last copy; run_replay took {total:?}"
    );
    assert_eq!(phase, ReplayPhase::Completed);
    let seconds = copying.as_secs_f64();
    assert!(
        (4.0..=6.0).contains(&seconds),
        "1000 at 200/s must take 5 s ± 20 %, took {copying:?}"
    );
    let (work, dlq) = world.depths().await;
    assert_eq!((work, dlq), (DEAD_LETTERS, 0));
    let status = world.status();
    assert_eq!(status["phase"], "Completed");
    assert_eq!(number(&status, "selected"), DEAD_LETTERS as u64);
    assert_eq!(number(&status, "replayed"), work as u64, "{status}");
    assert_eq!(number(&status, "remaining"), dlq as u64, "{status}");
    assert_eq!(number(&status, "failedAgain"), 0);
    assert_eq!(status["replayId"], REPLAY_UID);
    assert!(status["startTime"].is_string() && status["finishTime"].is_string());
    assert_eq!(status["observedGeneration"], 1);
    let finished = &status["conditions"][0];
    assert_eq!(
        (
            finished["type"].as_str(),
            finished["status"].as_str(),
            finished["reason"].as_str()
        ),
        (Some("Finished"), Some("True"), Some("ReplayCompleted"))
    );
    let reasons = world.event_reasons();
    assert_eq!(reasons, ["ReplayStarted", "ReplayCompleted"], "events");
    let metrics = world.metrics.encode();
    assert!(
        metrics.contains(
            r#"msgpipe_replay_messages_total{msgpipe_namespace="notes-app",msgpipe_replay="after-incident",outcome="replayed"} 1000"#
        ),
        "{metrics}"
    );
    // Every copy carries the replay id: a second run finds nothing to do and changes nothing.
    let again = run_replay(&ctx, world.replay()).await.expect("final");
    assert_eq!(again, ReplayPhase::Completed);
    assert_eq!(world.depths().await, (DEAD_LETTERS, 0));
}

/// Rejects (no requeue) everything that reaches the work queue: the broker dead-letters it.
async fn reject_everything(world: &World) -> (lapin::Connection, tokio::task::JoinHandle<()>) {
    let (connection, channel) = world.channel().await;
    let mut consumer = channel
        .basic_consume(
            WORK_QUEUE.into(),
            "always-fails".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
        }
    });
    (connection, task)
}

#[tokio::test]
async fn a_replay_whose_messages_keep_failing_stops_at_the_threshold_and_leaves_the_rest() {
    let spec = json!({
        "pipelineRef": {"name": "notes"}, "rate": 100,
        "stopWhen": {"failedAgainPercent": 50, "window": "1m", "minSample": 20}
    });
    let world = World::new("dlr-stop", spec).await;
    let (consumer, task) = reject_everything(&world).await;
    let (ctx, _server) = world.context(Duration::from_millis(300));
    let started = Instant::now();
    let phase = run_replay(&ctx, world.replay()).await.expect("replay runs");
    let took = started.elapsed();
    println!("stopped after {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "the kill switch reacts within seconds at 100/s, took {took:?}"
    );
    assert_eq!(phase, ReplayPhase::Stopped);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = consumer.close(200, "done".into()).await;
    task.abort();
    let status = world.status();
    println!("kill switch: {status}");
    let replayed = number(&status, "replayed");
    assert!(
        (20..200).contains(&replayed),
        "stops soon after the minimum sample of 20, not after {replayed}"
    );
    assert!(number(&status, "failedAgain") >= 10, "{status}");
    assert_eq!(
        number(&status, "remaining"),
        DEAD_LETTERS as u64 - replayed,
        "the rest is left in the DLQ"
    );
    assert_eq!(status["conditions"][0]["reason"], "ReplayStopped");
    let metrics = world.metrics.encode();
    for (outcome, count) in [
        ("replayed", replayed),
        ("failed_again", number(&status, "failedAgain")),
    ] {
        let line = format!(
            r#"msgpipe_replay_messages_total{{msgpipe_namespace="notes-app",msgpipe_replay="after-incident",outcome="{outcome}"}} {count}"#
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    let tally = world.tally().await;
    assert_eq!(tally.missing(), Vec::<String>::new(), "nothing lost");
    assert!(
        tally.work.is_empty(),
        "every copy failed: {:?}",
        tally.work.len()
    );
    assert_eq!(tally.dlq.len(), DEAD_LETTERS, "originals + copies back");
    let reasons = world.event_reasons();
    assert_eq!(reasons, ["ReplayStarted", "ReplayStopped"]);
    // Stopped is final: running it again moves nothing.
    assert_eq!(
        run_replay(&ctx, world.replay()).await.expect("final"),
        ReplayPhase::Stopped
    );
    assert_eq!(world.depths().await.1, DEAD_LETTERS);
}

#[tokio::test]
async fn a_runner_killed_mid_replay_is_resumed_by_a_new_one_without_loss() {
    // A limit, so that a miscount after the kill would show as too many or too few copies.
    const LIMIT: usize = 900;
    let spec =
        json!({"pipelineRef": {"name": "notes"}, "rate": 200, "selection": {"limit": LIMIT}});
    let world = World::new("dlr-kill", spec).await;
    let (ctx, _server) = world.context(Duration::from_millis(500));
    let ctx = Arc::new(ctx);
    let first = {
        let ctx = ctx.clone();
        let replay = world.replay();
        tokio::spawn(async move { run_replay(&ctx, replay).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.depths().await.0 < 300 {
        assert!(Instant::now() < deadline, "the replay never got under way");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator dies: its task stops and its connections go (as a killed process's would).
    first.abort();
    assert!(first.await.is_err_and(|e| e.is_cancelled()));
    assert!(
        support::broker_node(
            "ctl",
            NODE,
            &PORT.to_string(),
            &[
                "close_all_connections",
                "-p",
                &world.vhost.0,
                "operator killed"
            ],
            None
        ),
        "connections closed"
    );
    let status = world.status();
    let recorded = number(&status, "replayed");
    let (work, dlq) = world.depths().await;
    println!(
        "killed: status says {recorded} replayed; broker: {work} in the work queue, {dlq} in the DLQ"
    );
    assert!(
        work < DEAD_LETTERS && work + dlq >= DEAD_LETTERS,
        "nothing lost at the kill"
    );
    assert_eq!(status["phase"], "Running");

    // A new runner (another replica, or the restarted operator) resumes from the stored object.
    let (ctx2, _server2) = world.context(Duration::from_millis(500));
    let phase = run_replay(&ctx2, world.replay()).await.expect("resumes");
    assert_eq!(phase, ReplayPhase::Completed);
    let tally = world.tally().await;
    println!(
        "resumed: {} in the work queue, {} in the DLQ, {} duplicates",
        tally.work.len(),
        tally.dlq.len(),
        tally.duplicates()
    );
    assert_eq!(tally.missing(), Vec::<String>::new(), "nothing lost");
    let distinct: BTreeSet<&String> = tally.work.iter().collect();
    assert!(
        (LIMIT..=LIMIT + 1).contains(&distinct.len()),
        "the limit holds, give or take the one message of the at-least-once window: {}",
        distinct.len()
    );
    assert!(
        tally.duplicates() <= 1,
        "at most the one copy in flight at the kill is doubled, got {}",
        tally.duplicates()
    );
    let status = world.status();
    assert_eq!(number(&status, "selected"), LIMIT as u64);
    assert_eq!(number(&status, "matched"), DEAD_LETTERS as u64);
    assert_eq!(number(&status, "replayed"), LIMIT as u64, "{status}");
    assert_eq!(number(&status, "remaining"), 0);
    assert_eq!(status["phase"], "Completed");
}

#[tokio::test]
async fn suspend_stops_the_copies_and_resume_completes() {
    let world = World::new(
        "dlr-suspend",
        json!({"pipelineRef": {"name": "notes"}, "rate": 200}),
    )
    .await;
    let (ctx, _server) = world.context(Duration::from_millis(200));
    let ctx = Arc::new(ctx);
    let running = {
        let ctx = ctx.clone();
        let replay = world.replay();
        tokio::spawn(async move { run_replay(&ctx, replay).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.depths().await.0 < 200 {
        assert!(Instant::now() < deadline, "the replay never got under way");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.set_suspend(true);
    let phase = running.await.expect("joins").expect("runs");
    assert_eq!(phase, ReplayPhase::Suspended);
    let paused = world.depths().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = world.depths().await;
    println!("suspended at {paused:?} (work, dlq); 2 s later {later:?}");
    assert_eq!(paused, later, "no message moves while suspended");
    assert!(paused.0 < DEAD_LETTERS && paused.0 + paused.1 == DEAD_LETTERS);
    let status = world.status();
    assert_eq!(status["phase"], "Suspended");
    assert_eq!(status["conditions"][0]["reason"], "ReplaySuspended");
    assert_eq!(number(&status, "replayed"), paused.0 as u64, "{status}");
    assert_eq!(
        run_replay(&ctx, world.replay())
            .await
            .expect("still suspended"),
        ReplayPhase::Suspended
    );
    assert_eq!(world.depths().await, paused);

    world.set_suspend(false);
    let phase = run_replay(&ctx, world.replay()).await.expect("resumes");
    assert_eq!(phase, ReplayPhase::Completed);
    assert_eq!(world.depths().await, (DEAD_LETTERS, 0));
    let tally = world.tally().await;
    assert_eq!(tally.duplicates(), 0);
    let status = world.status();
    assert_eq!(number(&status, "replayed"), DEAD_LETTERS as u64);
    assert_eq!(status["observedGeneration"], 3);
    let reasons = world.event_reasons();
    assert_eq!(
        reasons,
        [
            "ReplayStarted",
            "ReplaySuspended",
            "ReplayStarted",
            "ReplayCompleted"
        ]
    );
}

/// Closes every connection of the test's vhost, as the exit of the operator's process would.
fn close_connections(world: &World, why: &str) {
    assert!(
        support::broker_node(
            "ctl",
            NODE,
            &PORT.to_string(),
            &["close_all_connections", "-p", &world.vhost.0, why],
            None
        ),
        "connections closed"
    );
}

/// One operator replica holding the lease: the replay controller over every namespace.
fn start_leader(
    cluster: &Cluster,
    identity: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (client, _server) = cluster.client();
    let settings = ReplaySettings {
        check_interval: Duration::from_millis(500),
        broker_timeout: Duration::from_secs(10),
        ..ReplaySettings::default()
    };
    let ctx = Arc::new(ReplayContext::new(
        client,
        Arc::new(Metrics::default()),
        settings,
        identity,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_replay_controller(ctx, None, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_runs_a_replay_under_the_operators_rbac_and_a_new_leader_resumes_it() {
    let world = World::new(
        "dlr-leader",
        json!({"pipelineRef": {"name": "notes"}, "rate": 200}),
    )
    .await;
    let cluster = Cluster::over(world.api.clone());
    let (stop, first) = start_leader(&cluster, "replica-a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.depths().await.0 < 300 {
        assert!(
            Instant::now() < deadline,
            "the controller never started the replay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leadership lost: the controller stops and aborts its runs; the process exits.
    let _ = stop.send(());
    first.await.expect("controller stops");
    close_connections(&world, "lost the lease");
    let handed_over = world.depths().await;
    assert!(handed_over.0 < DEAD_LETTERS, "{handed_over:?}");
    assert_eq!(world.status()["phase"], "Running");

    let (stop, second) = start_leader(&cluster, "replica-b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.status()["phase"] != "Completed" {
        assert!(
            Instant::now() < deadline,
            "the new leader did not finish: {}",
            world.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    second.await.expect("controller stops");
    assert_eq!(
        cluster.denied(),
        Vec::<String>::new(),
        "every call is in the RBAC list"
    );
    let tally = world.tally().await;
    println!(
        "leader change at {handed_over:?} (work, dlq): {} in the work queue, {} duplicates",
        tally.work.len(),
        tally.duplicates()
    );
    assert_eq!(tally.missing(), Vec::<String>::new(), "nothing lost");
    assert!(tally.dlq.is_empty());
    assert!(tally.duplicates() <= 1, "{}", tally.duplicates());
    assert_eq!(number(&world.status(), "replayed"), DEAD_LETTERS as u64);
    // Status and events never carry the broker's credentials.
    for call in world.api.take_calls() {
        let body = call.body.to_string();
        assert!(
            !body.contains("guest:guest"),
            "{} {}: {body}",
            call.method,
            call.path
        );
    }
}

#[tokio::test]
async fn cli_stop_when_halts_a_failing_replay_and_says_how_to_resume() {
    let world = World::new("dlr-cli", json!({"pipelineRef": {"name": "notes"}})).await;
    let (consumer, task) = reject_everything(&world).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("notes.yaml");
    std::fs::write(&file, pipeline_yaml(&world.vhost.0)).expect("manifest");
    let broker = uri(&world.vhost.0);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_msgpipe"))
            .args([
                "dlq",
                "replay",
                "--all",
                "--rate",
                "100/s",
                "--stop-when",
                "50%/1m",
            ])
            .args(["--stop-min-sample", "20", "-f"])
            .arg(&file)
            .env("MSGPIPE_BROKER_URI", broker)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("joins")
    .expect("msgpipe runs");
    let _ = consumer.close(200, "done".into()).await;
    task.abort();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let replayed = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("replayed #"))
        .count();
    println!("--stop-when: {replayed} replayed; {stderr}");
    assert!(!output.status.success(), "a stopped replay exits non-zero");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("stopped by --stop-when 50%/1m"), "{stderr}");
    assert!(stderr.contains("--resume replay-"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "{stderr}");
    assert!((20..200).contains(&replayed), "stopped after {replayed}");
    let tally = world.tally().await;
    assert_eq!(tally.missing(), Vec::<String>::new(), "nothing lost");
    assert_eq!(tally.dlq.len(), DEAD_LETTERS, "originals and failed copies");
}

#[tokio::test]
async fn deleting_a_running_replay_stops_its_copies() {
    let world = World::new(
        "dlr-delete",
        json!({"pipelineRef": {"name": "notes"}, "rate": 200}),
    )
    .await;
    let (ctx, _server) = world.context(Duration::from_millis(200));
    let ctx = Arc::new(ctx);
    let running = {
        let ctx = ctx.clone();
        let replay = world.replay();
        tokio::spawn(async move { run_replay(&ctx, replay).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.depths().await.0 < 100 {
        assert!(Instant::now() < deadline, "the replay never got under way");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.api.0.lock().expect("state").objects.remove(REPLAY);
    let ended = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the runner stops once its object is gone")
        .expect("joins");
    assert_eq!(
        ended.expect("no error"),
        ReplayPhase::Running,
        "not finished, just gone"
    );
    let stopped = world.depths().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        world.depths().await,
        stopped,
        "no copies after the deletion"
    );
    assert!(
        stopped.0 < DEAD_LETTERS && stopped.0 + stopped.1 == DEAD_LETTERS,
        "{stopped:?}"
    );
}

#[tokio::test]
async fn a_replay_that_cannot_run_fails_with_one_line_naming_the_field() {
    for (spec, field) in [
        (
            json!({"pipelineRef": {"name": "notes"}, "selection": {"errorMatches": "db (timeout"}}),
            "spec.selection.errorMatches",
        ),
        (
            json!({"pipelineRef": {"name": "nowhere"}}),
            "spec.pipelineRef.name: MessagePipeline notes-app/nowhere does not exist",
        ),
    ] {
        let api = FakeApi::default();
        api.put(
            REPLAY,
            json!({
                "apiVersion": "msgpipe.io/v1alpha1", "kind": "DeadLetterReplay",
                "metadata": {"name": "after-incident", "namespace": NS, "uid": REPLAY_UID,
                             "generation": 1, "resourceVersion": "1"},
                "spec": spec,
            }),
        );
        let (client, _server) = api.client();
        let ctx = ReplayContext::new(
            client,
            Arc::new(Metrics::default()),
            ReplaySettings::default(),
            "test",
        );
        let replay: DeadLetterReplay =
            serde_json::from_value(api.get(REPLAY).expect("stored")).expect("replay");
        let phase = run_replay(&ctx, replay)
            .await
            .expect("a final answer, not a retry");
        assert_eq!(phase, ReplayPhase::Failed);
        let status = api.get(REPLAY).expect("stored")["status"].clone();
        assert_eq!(status["phase"], "Failed");
        assert!(status["finishTime"].is_string());
        let condition = &status["conditions"][0];
        assert_eq!(condition["reason"], "ReplayFailed");
        let message = condition["message"].as_str().expect("message");
        assert!(message.contains(field), "{message}");
        assert!(!message.contains('\n') && message.len() <= 1024);
        let warning = api
            .take_calls()
            .into_iter()
            .find(|c| c.is_event() && c.body["reason"] == "ReplayFailed")
            .expect("a ReplayFailed event");
        assert_eq!(warning.body["type"], "Warning");
    }
}
