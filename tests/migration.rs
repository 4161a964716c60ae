//! Queue migration on a real RabbitMQ (a node of these tests' own, with the shovel plugin):
//! a classic pipeline under load migrated to quorum by `msgpipe apply`, with each mover; and
//! `msgpipe migrate` killed with SIGKILL at each step in turn and run again.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel};
use msgpipe_client::{Backoff, Consumer, ConsumerOptions, HandlerError, LiveConfig};
use serde_json::Value;
use support::{TestVhost, broker_node, confirm_channel, encode, http, plan_yaml};

/// The node these tests start for themselves (scripts/test-broker.sh enables the shovel
/// plugin on it), so they never depend on how another checkout started the shared node.
const NODE: &str = "msgpipe-migration";
const PORT: u16 = 5713;

fn api() -> String {
    format!("http://127.0.0.1:{}/api", PORT + 10000)
}

fn vhost(prefix: &str) -> TestVhost {
    assert!(
        broker_node("ensure", NODE, &PORT.to_string(), &[], None),
        "the migration test node did not start (scripts/test-broker.sh ensure {NODE} {PORT})"
    );
    TestVhost::on(&api(), prefix)
}

fn amqp_uri(vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:{PORT}/{}", encode(vhost))
}

/// The notes pipeline with short retry delays (tiers of 1 s and 2 s, three attempts).
fn pipeline(vhost: &str, queue_type: &str) -> String {
    format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n  queue: {{ name: notes_queue, type: {queue_type}, exchange: notes, routingKey: notes }}\n  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 2s }} }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path
}

/// The real `msgpipe` binary, pointed at the test node.
fn msgpipe(vhost: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_msgpipe"));
    command
        .env("MSGPIPE_BROKER_URI", amqp_uri(vhost))
        .env(
            "MSGPIPE_MANAGEMENT_URI",
            format!("http://127.0.0.1:{}", PORT + 10000),
        )
        .env_remove("RUST_LOG");
    command
}

fn run_ok(mut command: Command) -> String {
    let output = command.output().expect("msgpipe runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "msgpipe failed:\n{text}");
    text
}

fn get(vhost: &TestVhost, path: &str) -> Value {
    let (status, body) = http("GET", &format!("{}{path}", api()), None, true);
    assert_eq!(status, 200, "{path}: {body}");
    let _ = vhost;
    serde_json::from_str(&body).expect("json")
}

/// Publishes every id (message id and body), persistent and mandatory, confirmed 500 at a time.
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

/// Takes every message of `queue` (auto-ack) and returns their ids.
async fn take_all(channel: &Channel, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
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
            .map(|s| s.to_string());
        ids.push(id.unwrap_or_default());
    }
    ids
}

/// Every queue of the vhost: name -> type.
fn queue_types(vhost: &TestVhost) -> BTreeMap<String, String> {
    let queues = get(
        vhost,
        &format!("/queues/{}?columns=name,type", encode(&vhost.name)),
    );
    queues
        .as_array()
        .expect("list")
        .iter()
        .map(|q| {
            (
                q["name"].as_str().unwrap_or_default().to_string(),
                q["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The migrated pipeline: every queue quorum, no holding queue left, every binding the spec
/// wants in place and no other route into its queues.
fn assert_migrated(vhost: &TestVhost) {
    let desired = plan_yaml(&pipeline(&vhost.name, "quorum"));
    let types = queue_types(vhost);
    let expected: BTreeMap<String, String> = desired
        .topology
        .queues
        .iter()
        .map(|q| (q.name.clone(), "quorum".to_string()))
        .collect();
    assert_eq!(types, expected, "queues after the migration");
    let bindings = get(vhost, &format!("/bindings/{}", encode(&vhost.name)));
    let live: BTreeSet<(String, String, String)> = bindings
        .as_array()
        .expect("list")
        .iter()
        .filter(|b| b["source"] != "")
        .map(|b| {
            (
                b["source"].as_str().unwrap_or_default().to_string(),
                b["destination"].as_str().unwrap_or_default().to_string(),
                b["routing_key"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let wanted: BTreeSet<(String, String, String)> = desired
        .topology
        .bindings
        .iter()
        .map(|b| {
            (
                b.source.clone(),
                b.destination.clone(),
                b.routing_key.clone(),
            )
        })
        .collect();
    assert_eq!(live, wanted, "bindings after the migration");
    let shovels = get(
        vhost,
        &format!("/parameters/shovel/{}", encode(&vhost.name)),
    );
    assert_eq!(shovels, Value::Array(vec![]), "no shovel is left behind");
}

/// Whether the handler fails this delivery: 30 % of (message, attempt) pairs, the same in
/// every run.
fn fails(id: &str, attempt: u32) -> bool {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes().chain(attempt.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash % 10 < 3
}

/// Publishes `live-N` to the work exchange about every 5 ms (≈ 200/s) with confirms and
/// `mandatory` until told to stop; counts what was confirmed, returned and nacked.
struct Publisher {
    stop: Arc<AtomicBool>,
    confirmed: Arc<Mutex<Vec<String>>>,
    returned: Arc<AtomicU64>,
    nacked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn start(uri: &str) -> Self {
        let (connection, channel) = confirm_channel(uri).await;
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed: Arc<Mutex<Vec<String>>> = Arc::default();
        let returned = Arc::new(AtomicU64::new(0));
        let nacked = Arc::new(AtomicU64::new(0));
        let (s, c, r, n) = (
            stop.clone(),
            confirmed.clone(),
            returned.clone(),
            nacked.clone(),
        );
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                tick.tick().await;
                let id = format!("live-{i:06}");
                i += 1;
                let properties = BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2);
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let confirmation = channel
                    .basic_publish(
                        "notes".into(),
                        "notes".into(),
                        options,
                        id.as_bytes(),
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                let acked = confirmation.is_ack();
                if confirmation.take_message().is_some() {
                    r.fetch_add(1, Ordering::SeqCst);
                } else if acked {
                    c.lock().expect("lock").push(id);
                } else {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
            let _ = connection.close(200, "done".into()).await;
        });
        Self {
            stop,
            confirmed,
            returned,
            nacked,
            task,
        }
    }

    async fn stop(self) -> (Vec<String>, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("publisher");
        let confirmed = self.confirmed.lock().expect("lock").clone();
        (
            confirmed,
            self.returned.load(Ordering::SeqCst),
            self.nacked.load(Ordering::SeqCst),
        )
    }
}

/// A classic work queue holding `preload` messages, a publisher at ≈ 200 msg/s and a
/// consumer failing 30 % of deliveries throughout, migrated to quorum by `msgpipe apply`
/// with `mover`: every message handled exactly once or dead-lettered after its three
/// attempts, none lost, no publish returned, bindings intact.
async fn migrate_under_load(mover: &str, preload: usize) {
    let vhost = vhost(&format!("migrate-load-{mover}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let classic = write(
        dir.path(),
        "classic.yaml",
        &pipeline(&vhost.name, "classic"),
    );
    let quorum = write(dir.path(), "quorum.yaml", &pipeline(&vhost.name, "quorum"));
    run_ok({
        let mut c = msgpipe(&vhost.name);
        c.args(["apply", "-f"]).arg(&classic);
        c
    });
    let uri = amqp_uri(&vhost.name);
    let (connection, channel) = confirm_channel(&uri).await;
    let preloaded: Vec<String> = (0..preload).map(|i| format!("pre-{i:06}")).collect();
    publish_ids(&channel, "notes", "notes", &preloaded).await;

    // The consumer: 30 % of attempts fail (retry tiers in use), 2 ms a message.
    let config = plan_yaml(&pipeline(&vhost.name, "classic")).client_config;
    let mut options = ConsumerOptions::new(uri.clone());
    options.prefetch = 20;
    options.concurrency = 8;
    options.connect_timeout = Duration::from_secs(5);
    options.reconnect = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
    };
    options.give_back_backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let consumer = Consumer::new(options, LiveConfig::fixed(config)).expect("consumer");
    let shutdown = consumer.shutdown_handle();
    let handled: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let seen = handled.clone();
    let consuming = tokio::spawn(consumer.run(move |message| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let id = message.message_id().unwrap_or_default().to_string();
            if fails(&id, message.attempt()) {
                return Err(HandlerError::retryable("flaky (test)"));
            }
            *seen.lock().expect("lock").entry(id).or_default() += 1;
            Ok(())
        }
    }));
    let publisher = Publisher::start(&uri).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let output = tokio::task::spawn_blocking({
        let quorum = quorum.clone();
        let name = vhost.name.clone();
        let mover = mover.to_string();
        move || {
            let mut c = msgpipe(&name);
            c.args(["apply", "--settle", "1500ms", "--mover", &mover, "-f"])
                .arg(&quorum);
            run_ok(c)
        }
    })
    .await
    .expect("apply");
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (published, returned, nacked) = publisher.stop().await;
    assert!(
        output.contains("migrated to quorum"),
        "apply did not migrate:\n{output}"
    );
    if std::env::var_os("MSGPIPE_MIGRATION_LOG").is_some() {
        eprintln!("{output}");
    }
    let moved_line = output
        .lines()
        .find(|l| l.contains("migrated to quorum"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        returned, 0,
        "publishes returned as unroutable during the migration"
    );
    assert_eq!(nacked, 0, "publishes refused during the migration");

    // Every message is handled or dead-lettered once the retries have run out.
    let all: BTreeSet<String> = preloaded.iter().chain(&published).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut dead: Vec<String> = Vec::new();
    loop {
        dead.extend(take_all(&channel, "notes_queue_dlq").await);
        let done: BTreeSet<String> = handled
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .chain(dead.iter().cloned())
            .collect();
        if done.is_superset(&all) {
            break;
        }
        let missing: Vec<&String> = all.difference(&done).take(5).collect();
        assert!(
            Instant::now() < deadline,
            "{} of {} messages neither handled nor dead-lettered, e.g. {missing:?}",
            all.difference(&done).count(),
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), consuming).await;
    let handled = handled.lock().expect("lock").clone();
    // Dead-lettered by its own rule: a dead letter is a message whose three attempts failed.
    for id in &dead {
        assert!(
            (1..=3).all(|attempt| fails(id, attempt)),
            "{id} was dead-lettered though an attempt of it succeeds"
        );
    }
    let duplicates: u32 = handled.values().map(|n| n - 1).sum::<u32>()
        + dead.iter().filter(|id| handled.contains_key(*id)).count() as u32;
    eprintln!(
        "mover {mover}: {} messages ({preload} preloaded, {} published during the migration), \
         {} handled, {} dead-lettered, {duplicates} duplicates; apply took {:.1}s ({moved_line})",
        all.len(),
        published.len(),
        handled.len(),
        dead.len(),
        took.as_secs_f64()
    );
    // The at-least-once bound (docs/migration.md): publishes landing while both the old and the
    // holding queue are bound, each way: the publish rate times two broker round trips per
    // switch. 2-6 on a quiet machine, 12 seen on a loaded 2-core CI run; 50 is 250 ms of
    // switching at 200 msg/s, far below what a lost route or a double move would give.
    assert!(duplicates <= 50, "{duplicates} duplicates");
    let _ = connection.close(200, "done".into()).await;
    assert_migrated(&vhost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_classic_queue_under_load_migrates_to_quorum_by_apply_with_shovels() {
    migrate_under_load("shovel", 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_classic_queue_under_load_migrates_to_quorum_by_apply_with_the_confirm_mover() {
    migrate_under_load("confirm", 10_000).await;
}

/// `msgpipe migrate` killed (SIGKILL) at each step in turn: every run is killed as it starts
/// a step no run was killed in yet (a drain 300 ms into its move), until a run finishes by
/// itself. Nothing is lost; duplicates stay
/// within what the killed movers had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_killed_at_each_step_resumes_from_the_broker_and_loses_nothing() {
    let vhost = vhost("migrate-kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let classic = write(
        dir.path(),
        "classic.yaml",
        &pipeline(&vhost.name, "classic"),
    );
    let quorum = write(dir.path(), "quorum.yaml", &pipeline(&vhost.name, "quorum"));
    run_ok({
        let mut c = msgpipe(&vhost.name);
        c.args(["apply", "-f"]).arg(&classic);
        c
    });
    let (connection, channel) = confirm_channel(&amqp_uri(&vhost.name)).await;
    let work: Vec<String> = (0..3_000).map(|i| format!("w-{i:05}")).collect();
    let dead: Vec<String> = (0..200).map(|i| format!("d-{i:04}")).collect();
    let retried: Vec<String> = (0..100).map(|i| format!("r-{i:04}")).collect();
    publish_ids(&channel, "notes", "notes", &work).await;
    publish_ids(&channel, "notes_dlq_exchange", "", &dead).await;
    // Waiting in the 2 s tier: they return to the work queue while the migration runs.
    publish_ids(&channel, "notes_queue.retry", "2", &retried).await;

    // The dry runs print every step, from holding to returning, and change nothing.
    let before = queue_types(&vhost);
    for command in ["migrate", "apply"] {
        let printed = run_ok({
            let mut c = msgpipe(&vhost.name);
            c.args([command, "--dry-run", "-f"]).arg(&quorum);
            c
        });
        for step in [
            "[holding] would create holding queue notes_queue.migrating (quorum)",
            "[draining] would move every message of notes_queue into notes_queue.migrating until notes_queue.retry.1.1s, notes_queue.retry.2.2s are empty",
            "[replacing] would create queue notes_queue (quorum)",
            "[returning] would delete queues notes_queue.migrating, notes_queue_dlq.migrating once they hold no message",
        ] {
            assert!(
                printed.contains(step),
                "{command} --dry-run lacks {step:?}:\n{printed}"
            );
        }
    }
    assert_eq!(queue_types(&vhost), before, "a dry run changed the broker");
    assert!(before.values().all(|t| t == "classic"), "{before:?}");

    let mut kills: Vec<String> = Vec::new();
    for run in 1..=80 {
        let mut command = msgpipe(&vhost.name);
        command
            .args(["migrate", "--settle", "1s", "--mover", "confirm", "-f"])
            .arg(&quorum)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("msgpipe migrate starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut killed_at = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            // A step line: `ns/name: [phase] step (at 1.2s)`; progress lines say `moved`.
            let Some(step) = line
                .split_once("] ")
                .filter(|_| !line.contains("] moved "))
                .and_then(|(_, rest)| rest.rsplit_once(" (at ").map(|(step, _)| step.to_string()))
            else {
                continue;
            };
            if !kills.iter().any(|k| k.contains(&step)) {
                // A mover is killed mid-move; any other step as it starts.
                if step.starts_with("move ") {
                    std::thread::sleep(Duration::from_millis(300));
                }
                child.kill().expect("SIGKILL");
                killed_at = Some(line);
                break;
            }
        }
        let status = child.wait().expect("wait");
        match killed_at {
            Some(line) => kills.push(line),
            None => {
                assert!(status.success(), "run {run} failed after {kills:#?}");
                break;
            }
        }
        assert!(run < 80, "the migration did not finish in 80 runs");
    }
    eprintln!("killed {} times, at:\n{}", kills.len(), kills.join("\n"));
    assert!(
        kills.len() >= 10,
        "too few kills to cover the steps: {kills:#?}"
    );
    for phase in ["[holding]", "[draining]", "[replacing]", "[returning]"] {
        assert!(
            kills.iter().any(|k| k.contains(phase)),
            "never killed in {phase}: {kills:#?}"
        );
    }
    assert_migrated(&vhost);
    let in_work = take_all(&channel, "notes_queue").await;
    let in_dlq = take_all(&channel, "notes_queue_dlq").await;
    let expected_work: BTreeSet<String> = work.iter().chain(&retried).cloned().collect();
    let got_work: BTreeSet<String> = in_work.iter().cloned().collect();
    let got_dlq: BTreeSet<String> = in_dlq.iter().cloned().collect();
    assert_eq!(got_work, expected_work, "work queue after the migration");
    assert_eq!(
        got_dlq,
        dead.iter().cloned().collect(),
        "DLQ after the migration"
    );
    let duplicates = in_work.len() - got_work.len() + in_dlq.len() - got_dlq.len();
    eprintln!("{duplicates} duplicates after {} kills", kills.len());
    // A killed confirm mover can leave at most its window (256) confirmed but unacked.
    assert!(duplicates <= 256 * kills.len(), "{duplicates} duplicates");
    let _ = connection.close(200, "done".into()).await;
}

/// How long migrating a classic work queue of 100,000 messages (100 bytes) to quorum takes
/// with each mover, beside one raw shovel moving the same number from a classic queue into a
/// quorum queue on the same node in the same run. No consumers or publishers. Ignored (about
/// four minutes); run it with
/// `cargo nextest run --test migration --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn migration_of_100000_messages_figures() {
    const N: usize = 100_000;
    let ids: Vec<String> = (0..N).map(|i| format!("{i:0>100}")).collect();
    let mut figures = Vec::new();
    // The baseline: one dynamic shovel, classic -> quorum, timed until the target holds N.
    {
        let vhost = vhost("migrate-bench-raw");
        let (connection, channel) = confirm_channel(&amqp_uri(&vhost.name)).await;
        for (queue, kind) in [("raw_classic", "classic"), ("raw_quorum", "quorum")] {
            let mut arguments = lapin::types::FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString(kind.into()),
            );
            let options = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.into(), options, arguments)
                .await
                .expect("declare");
        }
        publish_ids(&channel, "", "raw_classic", &ids).await;
        let local = format!("amqp:///{}", encode(&vhost.name));
        let body = serde_json::json!({"value": {
            "src-protocol": "amqp091", "src-uri": local, "src-queue": "raw_classic",
            "src-predeclared": true, "src-delete-after": "queue-length",
            "dest-protocol": "amqp091", "dest-uri": local, "dest-queue": "raw_quorum",
            "dest-predeclared": true, "ack-mode": "on-confirm"}});
        let started = Instant::now();
        let (status, text) = http(
            "PUT",
            &format!("{}/parameters/shovel/{}/raw", api(), encode(&vhost.name)),
            Some(&body),
            true,
        );
        assert!((200..300).contains(&status), "{status} {text}");
        while support::depth(&channel, "raw_quorum").await < N as u32 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        figures.push((
            "raw shovel, classic -> quorum".to_string(),
            started.elapsed(),
        ));
        let _ = connection.close(200, "done".into()).await;
    }
    for mover in ["shovel", "confirm"] {
        let vhost = vhost(&format!("migrate-bench-{mover}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let classic = write(
            dir.path(),
            "classic.yaml",
            &pipeline(&vhost.name, "classic"),
        );
        let quorum = write(dir.path(), "quorum.yaml", &pipeline(&vhost.name, "quorum"));
        run_ok({
            let mut c = msgpipe(&vhost.name);
            c.args(["apply", "-f"]).arg(&classic);
            c
        });
        let (connection, channel) = confirm_channel(&amqp_uri(&vhost.name)).await;
        publish_ids(&channel, "notes", "notes", &ids).await;
        let started = Instant::now();
        let name = vhost.name.clone();
        let mover_arg = mover.to_string();
        let output = tokio::task::spawn_blocking(move || {
            let mut c = msgpipe(&name);
            c.args(["migrate", "--settle", "1500ms", "--mover", &mover_arg, "-f"])
                .arg(&quorum);
            run_ok(c)
        })
        .await
        .expect("migrate");
        let took = started.elapsed();
        assert_eq!(
            support::depth(&channel, "notes_queue").await,
            N as u32,
            "{output}"
        );
        let phases: Vec<&str> = output
            .lines()
            .filter(|l| l.contains("] move every") || l.contains("] delete queues"))
            .collect();
        eprintln!("{mover}:\n{}", phases.join("\n"));
        figures.push((format!("msgpipe migrate --mover {mover}"), took));
        let _ = connection.close(200, "done".into()).await;
    }
    let raw = figures[0].1.as_secs_f64();
    for (what, took) in &figures {
        eprintln!(
            "{what}: {:.1}s ({:.0} msg/s moved, {:.2}x the raw shovel)",
            took.as_secs_f64(),
            N as f64 / took.as_secs_f64(),
            took.as_secs_f64() / raw
        );
    }
}
