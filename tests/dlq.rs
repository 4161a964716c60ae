//! `msgpipe dlq list|show|replay|purge` as users run it, against a real RabbitMQ: the notes
//! pipeline in a vhost of its own, dead letters made both ways (the consumer publishing to
//! the DLX with its failure headers, and the broker dead-lettering a rejected message).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use msgpipe::broker::{self, BrokerApi, BrokerEndpoint, RabbitBroker};
use msgpipe_client::headers;
use serde_json::Value;
use support::{TestVhost, amqp_channel, amqp_uri, depth};

const DLX: &str = "notes_dlq_exchange";
const DLQ: &str = "notes_queue_dlq";
const WORK_QUEUE: &str = "notes_queue";

/// The notes pipeline of the seed article on `vhost`; `queue_type` is quorum or classic.
fn manifest(vhost: &str, queue_type: &str) -> String {
    format!(
        "apiVersion: msgpipe.io/v1alpha1\nkind: MessagePipeline\nmetadata: {{ name: notes, namespace: notes-app }}\nspec:\n  broker: {{ secretRef: {{ name: rabbitmq }}, vhost: \"{vhost}\" }}\n  queue: {{ name: notes_queue, exchange: notes, routingKey: notes, type: {queue_type} }}\n  deadLetter: {{ exchange: notes_dlq_exchange, queue: notes_queue_dlq }}\n  retry: {{ maxAttempts: 3, backoff: {{ initialDelay: 1s, multiplier: 2, maxDelay: 1m }} }}\n"
    )
}

/// Writes the manifest and provisions the pipeline with the library's reconciler.
async fn provision(broker: &RabbitBroker, dir: &Path, vhost: &str, queue_type: &str) -> PathBuf {
    let yaml = manifest(vhost, queue_type);
    let path = dir.join("notes.yaml");
    std::fs::write(&path, &yaml).expect("write manifest");
    let pipeline = msgpipe::api::load::parse_pipelines(&yaml)
        .expect("parses")
        .remove(0);
    let state = msgpipe::plan::plan(&pipeline, None).expect("plans");
    let live = broker.snapshot(vhost).await.expect("snapshot");
    broker::reconcile(broker, &state, &live)
        .await
        .expect("reconcile");
    path
}

/// Runs `msgpipe` with the broker URI in the environment and no terminal on stdin.
fn msgpipe(uri: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(args)
        .env("MSGPIPE_BROKER_URI", uri)
        .env_remove("MSGPIPE_MANAGEMENT_URI")
        .stdin(Stdio::null())
        .output()
        .expect("msgpipe runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Stdout of a command that must succeed.
fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "msgpipe failed:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Stderr of a command that must fail with one `error: ...` line.
fn one_line_error(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected a failure, got:\n{}",
        text(&output.stdout)
    );
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&ok(output)).expect("JSON output")
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

/// The headers the consumer library writes on a final failure.
fn consumer_headers(error: &str, reason: &str, attempts: i64) -> FieldTable {
    let mut table = FieldTable::default();
    let entries = [
        (headers::ERROR, long(error)),
        (headers::REASON, long(reason)),
        (headers::ATTEMPTS, AMQPValue::LongLongInt(attempts)),
        (headers::RETRY_COUNT, AMQPValue::LongLongInt(attempts - 1)),
        (headers::FIRST_FAILURE, long("2024-05-01T10:00:00Z")),
        (headers::LAST_FAILURE, long("2024-05-01T10:00:07Z")),
        (headers::ORIGINAL_EXCHANGE, long("notes")),
        (headers::ORIGINAL_ROUTING_KEY, long("notes")),
    ];
    for (name, value) in entries {
        table.insert(ShortString::from(name), value);
    }
    table
}

/// Publishes with confirms and `mandatory`; panics if the broker did not take it.
async fn publish(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(exchange.into(), key.into(), options, body, properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "nacked");
    assert!(confirm.take_message().is_none(), "unroutable");
}

/// A dead letter as the consumer library makes one: published to the DLX with its headers.
async fn consumer_dead_letter(channel: &Channel, id: &str, error: &str, reason: &str, body: &[u8]) {
    let properties = BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(consumer_headers(error, reason, 3));
    publish(channel, DLX, "notes", body, properties).await;
}

/// A dead letter the broker makes: published to the work queue, rejected without requeue.
async fn broker_dead_letter(channel: &Channel, id: &str, body: &[u8]) {
    let before = depth(channel, DLQ).await;
    let properties = BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2);
    publish(channel, "notes", "notes", body, properties).await;
    reject_head_of_work_queue(channel).await;
    wait_for_depth(channel, DLQ, before + 1).await;
}

async fn reject_head_of_work_queue(channel: &Channel) {
    support::reject_head(channel, WORK_QUEUE).await;
}

async fn wait_for_depth(channel: &Channel, queue: &str, expected: u32) {
    let start = Instant::now();
    while depth(channel, queue).await != expected {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{queue} never reached {expected} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Message ids in a queue, in order, read without taking them (get unacked, then close).
async fn ids_in(uri: &str, queue: &str) -> Vec<String> {
    let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
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

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

#[tokio::test]
async fn list_groups_by_error_and_shows_consumer_and_broker_reasons() {
    let vhost = TestVhost::new("dlq-list");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "quorum").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    for id in ["db-1", "db-2", "db-3"] {
        consumer_dead_letter(&channel, id, "db timeout", "max-attempts", b"{}").await;
    }
    consumer_dead_letter(
        &channel,
        "json-1",
        "bad json\n at line 1",
        "permanent",
        b"{",
    )
    .await;
    broker_dead_letter(&channel, "rejected-1", b"x").await;
    // Retried once (expired from tier 1 back to the work queue), then rejected: the most
    // recent death is what the list shows, not x-first-death-reason (`expired`).
    publish(
        &channel,
        "notes_queue.retry",
        "1",
        b"y",
        BasicProperties::default().with_message_id("retried-1".into()),
    )
    .await;
    wait_for_depth(&channel, WORK_QUEUE, 1).await;
    reject_head_of_work_queue(&channel).await;
    wait_for_depth(&channel, DLQ, 6).await;

    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");
    let listing = json(&msgpipe(&uri, &["dlq", "list", "-f", file, "-o", "json"]));
    let listing = &listing[0];
    assert_eq!(listing["depth"], 6);
    assert_eq!(listing["queue"], DLQ);
    let groups: Vec<(String, u64)> = listing["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["key"].as_str().unwrap_or("?").to_string(),
                g["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("db timeout".to_string(), 3),
            ("(none)".to_string(), 2),
            ("bad json at line 1".to_string(), 1)
        ]
    );
    let by_id: BTreeMap<&str, &Value> = listing["deadLetters"]
        .as_array()
        .expect("dead letters")
        .iter()
        .map(|l| (l["messageId"].as_str().unwrap_or("?"), l))
        .collect();
    let db = by_id["db-1"];
    assert_eq!(
        (
            &db["reason"],
            &db["reasonSource"],
            &db["attempts"],
            &db["error"]
        ),
        (
            &Value::from("max-attempts"),
            &Value::from("consumer"),
            &Value::from(3),
            &Value::from("db timeout")
        )
    );
    assert_eq!(db["lastFailure"], "2024-05-01T10:00:07Z");
    assert_eq!(db["originalRoutingKey"], "notes");
    assert_eq!(by_id["json-1"]["reason"], "permanent");
    for id in ["rejected-1", "retried-1"] {
        let letter = by_id[id];
        assert_eq!(letter["reason"], "rejected", "{id}: {letter}");
        assert_eq!(letter["reasonSource"], "broker");
        assert_eq!(letter["deadLetteredFrom"], WORK_QUEUE);
        assert!(letter["lastFailure"].is_string(), "{letter}");
    }

    let by_reason = json(&msgpipe(
        &uri,
        &[
            "dlq",
            "list",
            "-f",
            file,
            "--group-by",
            "reason",
            "-o",
            "json",
        ],
    ));
    let reasons: Vec<&str> = by_reason[0]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["key"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(reasons, ["max-attempts", "rejected", "permanent"]);

    let table = ok(&msgpipe(&uri, &["dlq", "list", "-f", file, "--limit", "4"]));
    assert!(
        table.contains("holds 6 dead letters; showing the first 4"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("#    MESSAGE ID")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("COUNT   ERROR")),
        "{table}"
    );
    assert!(table.contains("bad json at line 1"), "{table}");
    // Listing takes nothing: a quorum DLQ gets the browsed messages back a moment after
    // the browsing connection closes.
    wait_for_depth(&channel, DLQ, 6).await;
}

#[tokio::test]
async fn show_prints_every_header_and_the_body_by_id_or_position() {
    let vhost = TestVhost::new("dlq-show");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "quorum").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    consumer_dead_letter(
        &channel,
        "note-1",
        "db timeout",
        "max-attempts",
        br#"{"text":"hi"}"#,
    )
    .await;
    consumer_dead_letter(
        &channel,
        "blob-1",
        "bad bytes",
        "permanent",
        &[0, 159, 146, 150],
    )
    .await;
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");

    let shown = ok(&msgpipe(&uri, &["dlq", "show", "note-1", "-f", file]));
    for expected in [
        "dead letter #1 of notes_queue_dlq",
        "reason:               max-attempts (consumer)",
        "messageId: note-1",
        "contentType: application/json",
        "x-msgpipe-error: db timeout",
        "x-msgpipe-attempts: 3",
        "x-msgpipe-original-routing-key: notes",
        "body (13 bytes, text):\n{\"text\":\"hi\"}",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from:\n{shown}"
        );
    }
    let binary = ok(&msgpipe(&uri, &["dlq", "show", "#2", "-f", file]));
    assert!(
        binary.contains("body (4 bytes, binary, hex):\n00000000  00 9f 92 96"),
        "{binary}"
    );

    let data = json(&msgpipe(
        &uri,
        &["dlq", "show", "#2", "-f", file, "-o", "json"],
    ));
    assert_eq!(data[0]["summary"]["messageId"], "blob-1");
    assert_eq!(
        data[0]["body"],
        serde_json::json!({"encoding": "base64", "data": "AJ+Slg=="})
    );
    assert_eq!(data[0]["headers"][headers::ERROR], "bad bytes");

    let missing = one_line_error(&msgpipe(&uri, &["dlq", "show", "nope", "-f", file]));
    assert!(
        missing.contains("no dead letter with message id \"nope\""),
        "{missing}"
    );
    // Showing takes nothing: a quorum DLQ gets the browsed messages back a moment after
    // the browsing connection closes.
    wait_for_depth(&channel, DLQ, 2).await;
}

#[tokio::test]
async fn replay_by_id_sends_a_fresh_copy_and_dry_run_changes_nothing() {
    let vhost = TestVhost::new("dlq-replay-id");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "quorum").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    for id in ["a", "b", "c"] {
        consumer_dead_letter(&channel, id, "db timeout", "max-attempts", id.as_bytes()).await;
    }
    broker_dead_letter(&channel, "d", b"d").await;
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");

    let dry = ok(&msgpipe(
        &uri,
        &["dlq", "replay", "--all", "--dry-run", "-f", file],
    ));
    assert_eq!(
        dry.lines()
            .filter(|l| l.starts_with("would replay #"))
            .count(),
        4,
        "{dry}"
    );
    assert!(
        dry.contains("would replay #2 b -> queue notes_queue (original routing key \"notes\")"),
        "{dry}"
    );
    assert!(dry.contains("nothing was changed"), "{dry}");
    // The dry run leaves the DLQ (a quorum DLQ gets the browsed messages back a moment
    // after the connection closes).
    wait_for_depth(&channel, DLQ, 4).await;
    assert_eq!(
        depth(&channel, WORK_QUEUE).await,
        0,
        "dry run sends nothing"
    );

    let unknown = one_line_error(&msgpipe(
        &uri,
        &["dlq", "replay", "--id", "zzz", "-f", file],
    ));
    assert!(
        unknown.contains("no dead letter in notes_queue_dlq has message id zzz"),
        "{unknown}"
    );
    wait_for_depth(&channel, DLQ, 4).await;

    let out = ok(&msgpipe(
        &uri,
        &["dlq", "replay", "--id", "b", "d", "-f", file],
    ));
    assert!(out.contains("replayed #2 b -> queue notes_queue"), "{out}");
    assert!(out.contains("replayed 2 of the 4 dead letters"), "{out}");
    assert_eq!(
        ids_in(&uri, DLQ).await,
        ["a", "c"],
        "the others stay, in order"
    );

    let copy = channel
        .basic_get(WORK_QUEUE.into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("the replayed copy");
    let p = &copy.delivery.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("b"));
    assert_eq!(copy.delivery.data, b"b");
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        header(p, headers::REPLAY_COUNT),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert!(matches!(
        header(p, headers::REPLAYED_AT),
        Some(AMQPValue::LongString(_))
    ));
    assert_eq!(
        header(p, headers::ORIGINAL_ROUTING_KEY),
        Some(&long("notes"))
    );
    for gone in [
        headers::RETRY_COUNT,
        headers::ERROR,
        headers::REASON,
        headers::ATTEMPTS,
        headers::LAST_FAILURE,
    ] {
        assert_eq!(header(p, gone), None, "{gone} should be removed");
    }
    let broker_copy = channel
        .basic_get(WORK_QUEUE.into(), BasicGetOptions::default())
        .await
        .expect("get")
        .expect("the second copy");
    let p = &broker_copy.delivery.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("d"));
    for gone in ["x-death", "x-first-death-reason", "x-first-death-queue"] {
        assert_eq!(header(p, gone), None, "{gone} should be removed");
    }
    // A quorum work queue stamps its own count on delivery: this is the copy's first.
    let count = header(p, "x-delivery-count");
    assert!(
        matches!(count, None | Some(AMQPValue::LongLongInt(0))),
        "the DLQ's delivery count was carried over: {count:?}"
    );
}

#[tokio::test]
async fn replay_reaches_the_work_queue_and_nothing_else() {
    let vhost = TestVhost::new("dlq-exact");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "classic").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    // A bystander bound to the work exchange with the pipeline's own key.
    channel
        .queue_declare(
            "bystander".into(),
            // Durable: RabbitMQ 4.x deprecates transient non-exclusive queues (the suite's
            // nodes refuse them).
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .queue_bind(
            "bystander".into(),
            "notes".into(),
            "notes".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    consumer_dead_letter(&channel, "ok-1", "db timeout", "max-attempts", b"1").await;
    // A key no queue is bound with: the copy still reaches the work queue, by name.
    let mut stray = consumer_headers("db timeout", "max-attempts", 3);
    stray.insert(
        ShortString::from(headers::ORIGINAL_ROUTING_KEY),
        long("nowhere"),
    );
    let properties = BasicProperties::default()
        .with_message_id("stray-1".into())
        .with_headers(stray);
    publish(&channel, DLX, "notes", b"2", properties).await;
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");

    let out = ok(&msgpipe(&uri, &["dlq", "replay", "--all", "-f", file]));
    assert!(out.contains("replayed 2 of the 2 dead letters"), "{out}");
    assert_eq!(ids_in(&uri, WORK_QUEUE).await, ["ok-1", "stray-1"]);
    assert_eq!(
        depth(&channel, "bystander").await,
        0,
        "the bystander got a copy"
    );
    assert_eq!(depth(&channel, DLQ).await, 0);
}

#[tokio::test]
async fn replay_selects_by_reason_and_error_and_a_resumed_replay_skips_its_own_copies() {
    let vhost = TestVhost::new("dlq-select");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "classic").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    for id in ["t1", "t2", "t3"] {
        consumer_dead_letter(&channel, id, "db timeout after 5s", "max-attempts", b"t").await;
    }
    for id in ["p1", "p2"] {
        consumer_dead_letter(&channel, id, "invalid JSON", "permanent", b"p").await;
    }
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");

    let out = ok(&msgpipe(
        &uri,
        &["dlq", "replay", "--reason", "permanent", "-f", file],
    ));
    assert!(
        out.contains("replayed 2 of the 5 dead letters in notes_queue_dlq to queue notes_queue; skipped 3, 3 remaining"),
        "{out}"
    );
    assert_eq!(ids_in(&uri, WORK_QUEUE).await, ["p1", "p2"]);
    for _ in 0..2 {
        let done = channel
            .basic_get(WORK_QUEUE.into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a replayed copy");
        done.delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .expect("ack");
    }

    let started = Instant::now();
    let out = ok(&msgpipe(
        &uri,
        &[
            "dlq",
            "replay",
            "--error-matches",
            "time(out)?",
            "--limit",
            "2",
            "--rate",
            "4/s",
            "-f",
            file,
        ],
    ));
    assert!(out.contains("replayed 2 of the 3"), "{out}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "4/s: the second copy waits a quarter second"
    );
    let replay_id = out
        .lines()
        .find_map(|l| l.split("replay id ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the replay id is printed")
        .to_string();
    assert_eq!(ids_in(&uri, DLQ).await, ["t3"]);

    // One copy of that replay fails again and comes back to the DLQ.
    support::reject_head(&channel, WORK_QUEUE).await;
    wait_for_depth(&channel, DLQ, 2).await;
    let out = ok(&msgpipe(
        &uri,
        &["dlq", "replay", "--resume", &replay_id, "-f", file],
    ));
    assert!(out.contains("replayed 1 of the 2"), "{out}");
    assert!(out.contains("skipped 1"), "{out}");
    assert!(
        out.contains("replayed #1 t3") || out.contains("t3"),
        "{out}"
    );
    assert_eq!(
        depth(&channel, DLQ).await,
        1,
        "its own copy stays, not replayed twice"
    );

    let bad = one_line_error(&msgpipe(
        &uri,
        &["dlq", "replay", "--error-matches", "(", "-f", file],
    ));
    assert!(bad.contains("--error-matches"), "{bad}");
    let bad = one_line_error(&msgpipe(
        &uri,
        &["dlq", "replay", "--all", "--rate", "fast", "-f", file],
    ));
    assert!(bad.contains("--rate"), "{bad}");
}

/// Peak resident memory (KiB) of `msgpipe ARGS`, from /usr/bin/time.
fn peak_rss_kib(uri: &str, args: &[&str]) -> (u64, Output) {
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("PEAK_RSS_KIB=%M")
        .arg(env!("CARGO_BIN_EXE_msgpipe"))
        .args(args)
        .env("MSGPIPE_BROKER_URI", uri)
        .env_remove("MSGPIPE_MANAGEMENT_URI")
        .stdin(Stdio::null())
        .output()
        .expect("time runs");
    let stderr = text(&output.stderr);
    let peak = stderr
        .lines()
        .find_map(|l| l.strip_prefix("PEAK_RSS_KIB="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr}"));
    (peak, output)
}

/// Fills the DLQ with dead letters `m-N` for N in `ids`, of `size` bytes, fast (confirms in batches).
async fn fill(channel: &Channel, ids: std::ops::Range<usize>, size: usize) {
    let body = vec![b'x'; size];
    let mut pending = Vec::new();
    for i in ids {
        let properties = BasicProperties::default()
            .with_message_id(format!("m-{i}").into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                DLX.into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 500 {
            for confirm in pending.drain(..) {
                assert!(confirm.await.expect("confirm").is_ack());
            }
        }
    }
    for confirm in pending {
        assert!(confirm.await.expect("confirm").is_ack());
    }
}

/// The figures in docs/broker.md: time and peak RSS of a dry run and a replay of 100,000
/// small dead letters (`MSGPIPE_REPLAY_COUNT`, `MSGPIPE_REPLAY_QUEUE_TYPE` change the size
/// and the queue type, default classic). Slow (minutes), so run by hand:
/// `cargo nextest run --test dlq --run-ignored only --no-capture replay_of_100000`.
#[tokio::test]
#[ignore = "measurement: minutes long"]
async fn replay_of_100000_small_dead_letters_figures() {
    let count: usize = std::env::var("MSGPIPE_REPLAY_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100_000);
    let queue_type =
        std::env::var("MSGPIPE_REPLAY_QUEUE_TYPE").unwrap_or_else(|_| "classic".into());
    let vhost = TestVhost::new("dlq-100k");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, &queue_type).await;
    let (connection, channel) = amqp_channel(&vhost.name).await;
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");
    let started = Instant::now();
    fill(&channel, 0..count, 100).await;
    let _ = connection.close(200, "filled".into()).await;
    println!(
        "filled {count} {queue_type} dead letters of 100 bytes in {:?}",
        started.elapsed()
    );
    for args in [
        &["dlq", "replay", "--all", "--dry-run", "-f", file][..],
        &["dlq", "replay", "--all", "-f", file][..],
    ] {
        let started = Instant::now();
        let (peak, out) = peak_rss_kib(&uri, args);
        let summary = text(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        println!(
            "{}: {:?}, peak RSS {peak} KiB; {summary}",
            args.join(" "),
            started.elapsed()
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // A fresh connection: the first one missed heartbeats while this thread waited.
    drop(channel);
    let (_connection, check) = amqp_channel(&vhost.name).await;
    assert_eq!(depth(&check, WORK_QUEUE).await as usize, count);
    assert_eq!(depth(&check, DLQ).await, 0);
}

#[tokio::test]
async fn replay_memory_is_bounded_by_one_message_not_the_dlq() {
    let vhost = TestVhost::new("dlq-memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "classic").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");
    // 500 then 5,000 dead letters of 4 KiB: 2 MB then 20 MB of bodies.
    fill(&channel, 0..500, 4096).await;
    let (small, out) = peak_rss_kib(&uri, &["dlq", "replay", "--all", "--dry-run", "-f", file]);
    assert!(
        text(&out.stdout).contains("would replay 500 of the 500"),
        "{}",
        text(&out.stdout)
    );
    fill(&channel, 500..5000, 4096).await;
    let (large, out) = peak_rss_kib(&uri, &["dlq", "replay", "--all", "--dry-run", "-f", file]);
    assert!(
        text(&out.stdout).contains("would replay 5000 of the 5000"),
        "{}",
        text(&out.stdout)
    );
    let (by_id, out) = peak_rss_kib(&uri, &["dlq", "replay", "--id", "m-4999", "-f", file]);
    assert!(
        text(&out.stdout).contains("replayed 1 of the 5000"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    println!("peak RSS: 500 dead letters {small} KiB, 5000 {large} KiB, --id {by_id} KiB");
    // Ten times the dead letters (18 MB more bodies) must not cost ten times the memory.
    assert!(
        large < small + 8 * 1024 && by_id < small + 8 * 1024,
        "peak RSS grows with the DLQ: {small} KiB -> {large} KiB (--id {by_id} KiB)"
    );
    assert_eq!(depth(&channel, DLQ).await, 4999);
}

#[tokio::test]
async fn purge_asks_on_a_terminal_and_refuses_without_yes_otherwise() {
    let vhost = TestVhost::new("dlq-purge");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "quorum").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    for id in ["a", "b"] {
        consumer_dead_letter(&channel, id, "db timeout", "max-attempts", b"x").await;
    }
    let uri = amqp_uri(&vhost.name);
    let file = file.to_str().expect("utf-8");

    let refused = one_line_error(&msgpipe(&uri, &["dlq", "purge", "-f", file]));
    assert!(
        refused.contains("refusing to purge without --yes"),
        "{refused}"
    );
    assert_eq!(depth(&channel, DLQ).await, 2);

    // On a terminal (util-linux `script` gives it one) it asks for the queue name.
    let wrong = on_a_terminal(&uri, file, "notes_queue\n");
    assert!(!wrong.status.success());
    let transcript = text(&wrong.stdout);
    assert!(
        transcript.contains("Type the queue name to confirm:")
            && transcript.contains("not confirmed; nothing was purged"),
        "{transcript}"
    );
    assert_eq!(depth(&channel, DLQ).await, 2);
    let confirmed = on_a_terminal(&uri, file, "notes_queue_dlq\n");
    let transcript = text(&confirmed.stdout);
    assert!(confirmed.status.success(), "{transcript}");
    assert!(
        transcript.contains("this deletes the 2 dead letters in notes_queue_dlq")
            && transcript.contains("purged 2 dead letters from notes_queue_dlq"),
        "{transcript}"
    );
    assert_eq!(depth(&channel, DLQ).await, 0);

    consumer_dead_letter(&channel, "c", "db timeout", "max-attempts", b"x").await;
    let purged = ok(&msgpipe(&uri, &["dlq", "purge", "--yes", "-f", file]));
    assert_eq!(
        purged.trim(),
        "notes-app/notes: purged 1 dead letters from notes_queue_dlq"
    );
    assert_eq!(depth(&channel, DLQ).await, 0);
}

/// `msgpipe dlq purge` with a pseudo-terminal on stdin, answering `answer`; the transcript
/// (prompt included) is on stdout.
fn on_a_terminal(uri: &str, file: &str, answer: &str) -> Output {
    let command = format!("'{}' dlq purge -f '{file}'", env!("CARGO_BIN_EXE_msgpipe"));
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("MSGPIPE_BROKER_URI", uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(answer.as_bytes())
        .expect("answer");
    child.wait_with_output().expect("script exits")
}

#[tokio::test]
async fn errors_are_one_line_and_never_show_the_password() {
    let vhost = TestVhost::new("dlq-errors");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("notes.yaml");
    std::fs::write(&file, manifest(&vhost.name, "quorum")).expect("write");
    let file = file.to_str().expect("utf-8");
    let secret = "Dlq-S3cret-pw";
    let cases = [
        // Wrong password, right broker.
        (
            format!("amqp://guest:{secret}@127.0.0.1:5673/"),
            "refused the credentials",
        ),
        // Nothing listening.
        (format!("amqp://guest:{secret}@127.0.0.1:1/"), "unreachable"),
    ];
    for (uri, expected) in &cases {
        for command in [
            &["dlq", "list", "-f", file][..],
            &["dlq", "replay", "--all", "-f", file],
        ] {
            let error = one_line_error(&msgpipe(uri, command));
            assert!(error.contains(expected), "{command:?}: {error}");
            assert!(!error.contains(secret), "password leaked: {error}");
        }
        // The same through the flag instead of the environment.
        let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
            .args([
                "dlq",
                "show",
                "x",
                "-f",
                file,
                "--broker",
                uri,
                "--timeout",
                "5",
            ])
            .env_remove("MSGPIPE_BROKER_URI")
            .output()
            .expect("runs");
        let error = one_line_error(&output);
        assert!(
            !error.contains(secret) && !text(&output.stdout).contains(secret),
            "{error}"
        );
    }
    // A two-character password is hidden too (where it stands alone).
    for uri in [
        "amqp://guest:Q7@127.0.0.1:5673/",
        "amqp://guest:Q7@127.0.0.1:1/",
    ] {
        let output = msgpipe(uri, &["dlq", "list", "-f", file, "--timeout", "5"]);
        let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(!output.status.success());
        assert!(!printed.contains("Q7"), "password leaked: {printed}");
    }
    // Not applied yet: the DLQ does not exist.
    let error = one_line_error(&msgpipe(
        &amqp_uri(&vhost.name),
        &["dlq", "list", "-f", file],
    ));
    assert!(
        error.contains("queue \"notes_queue_dlq\" does not exist"),
        "{error}"
    );

    // Two pipelines in one file need --pipeline.
    let two = format!(
        "{}---\n{}",
        manifest(&vhost.name, "quorum"),
        manifest(&vhost.name, "quorum").replace("name: notes,", "name: other,")
    );
    let both = dir.path().join("two.yaml");
    std::fs::write(&both, two).expect("write");
    let error = one_line_error(&msgpipe(
        &amqp_uri(&vhost.name),
        &["dlq", "list", "-f", both.to_str().expect("utf-8")],
    ));
    assert!(
        error.contains(
            "holds 2 pipelines (notes-app/notes, notes-app/other); pick one with --pipeline"
        ),
        "{error}"
    );

    // Cluster mode without any cluster.
    let home = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(["dlq", "list", "--name", "notes", "-n", "notes-app"])
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("runs");
    let error = one_line_error(&output);
    assert!(error.contains("Kubernetes"), "{error}");
}

/// A Kubernetes API server that answers GETs from a fixed map of paths (404 otherwise) and
/// records what was asked: enough for the CLI's cluster mode, run as the real binary.
fn fake_kube_api(objects: BTreeMap<String, Value>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let path = target.split('?').next().unwrap_or("/").to_string();
            record.lock().expect("lock").push(path.clone());
            let (status, body) = match objects.get(&path) {
                Some(object) => ("200 OK", object.to_string()),
                None => (
                    "404 Not Found",
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": format!("{path} not found"), "reason": "NotFound", "code": 404})
                    .to_string(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, seen)
}

#[tokio::test]
async fn cluster_mode_reads_the_pipeline_and_its_broker_secret() {
    let vhost = TestVhost::new("dlq-cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = support::test_broker(&vhost.name);
    let file = provision(&broker, dir.path(), &vhost.name, "quorum").await;
    let (_connection, channel) = amqp_channel(&vhost.name).await;
    consumer_dead_letter(&channel, "k-1", "db timeout", "max-attempts", b"x").await;

    let yaml = std::fs::read_to_string(&file).expect("manifest");
    let pipeline: Value = serde_saphyr::from_str(&yaml).expect("yaml");
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "rabbitmq", "namespace": "notes-app"},
        "data": {"uri": BASE64.encode(amqp_uri("/"))},
    });
    let objects = BTreeMap::from([
        (
            "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/notes".to_string(),
            pipeline,
        ),
        (
            "/api/v1/namespaces/notes-app/secrets/rabbitmq".to_string(),
            secret,
        ),
    ]);
    let (port, seen) = fake_kube_api(objects);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: notes-app}}}}]\ncurrent-context: fake\n"
        ),
    )
    .expect("kubeconfig");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_msgpipe"))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("MSGPIPE_BROKER_URI")
            .stdin(Stdio::null())
            .output()
            .expect("msgpipe runs")
    };

    // The namespace comes from the kubeconfig context; the vhost from spec.broker.vhost.
    let listing = json(&run(&["dlq", "list", "--name", "notes", "-o", "json"]));
    assert_eq!(listing[0]["pipeline"], "notes-app/notes");
    assert_eq!(listing[0]["deadLetters"][0]["messageId"], "k-1");
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            "/apis/msgpipe.io/v1alpha1/namespaces/notes-app/messagepipelines/notes",
            "/api/v1/namespaces/notes-app/secrets/rabbitmq"
        ]
    );
    let missing = one_line_error(&run(&["dlq", "list", "--name", "nope", "-n", "notes-app"]));
    assert!(
        missing.contains("MessagePipeline notes-app/nope does not exist"),
        "{missing}"
    );
}

// --- the broker restarted in the middle of a replay: a node of its own ---------------------

const NODE: &str = "msgpipe-replay";
const PORT: &str = "5678";
const MGMT: &str = "http://127.0.0.1:15678";
const USER: &str = "dlq-replayer";
const SECRET: &str = "Replay-Secret-51c2";
const RESTART_VHOST: &str = "replay";
const DEAD_LETTERS: usize = 1000;

fn node(command: &str, extra: &[&str]) -> bool {
    support::broker_node(command, NODE, PORT, extra, None)
}

fn restart_uri() -> String {
    format!("amqp://{USER}:{SECRET}@127.0.0.1:{PORT}/{RESTART_VHOST}")
}

/// A fresh vhost on the node, usable by USER.
fn prepare_node() {
    assert!(node("ensure", &[]), "replay node starts");
    node("ctl", &["add_user", USER, SECRET]);
    node("ctl", &["set_user_tags", USER, "administrator"]);
    let api = |method: &str, path: &str, body: Option<&Value>| {
        support::http(method, &format!("{MGMT}/api{path}"), body, true)
    };
    api("DELETE", &format!("/vhosts/{RESTART_VHOST}"), None);
    let (status, body) = api("PUT", &format!("/vhosts/{RESTART_VHOST}"), None);
    assert!((200..300).contains(&status), "vhost: {body}");
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (status, body) = api(
        "PUT",
        &format!("/permissions/{RESTART_VHOST}/{USER}"),
        Some(&all),
    );
    assert!((200..300).contains(&status), "permissions: {body}");
}

async fn fill_dlq(dir: &Path) -> PathBuf {
    let endpoint = BrokerEndpoint::new(&restart_uri(), Some(MGMT), None).expect("endpoint");
    let broker = RabbitBroker::new(endpoint, Duration::from_secs(15)).expect("client");
    let file = provision(&broker, dir, RESTART_VHOST, "quorum").await;
    broker.close().await;
    let connection =
        lapin::Connection::connect(&restart_uri(), lapin::ConnectionProperties::default())
            .await
            .expect("connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::new();
    for i in 0..DEAD_LETTERS {
        let properties = BasicProperties::default()
            .with_message_id(format!("r-{i:04}").into())
            .with_delivery_mode(2)
            .with_headers(consumer_headers("db timeout", "max-attempts", 3));
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
    assert_eq!(depth(&channel, DLQ).await as usize, DEAD_LETTERS);
    let _ = connection.close(200, "done".into()).await;
    file
}

/// Ids in the work queue and the DLQ: none missing, and how many are there twice.
struct Tally {
    work: Vec<String>,
    dlq: Vec<String>,
}

impl Tally {
    async fn read() -> Self {
        Tally {
            work: ids_in(&restart_uri(), WORK_QUEUE).await,
            dlq: ids_in(&restart_uri(), DLQ).await,
        }
    }

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

#[test]
fn replay_of_1000_dead_letters_loses_none_when_the_broker_restarts_midway() {
    prepare_node();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = runtime.block_on(fill_dlq(dir.path()));
    let replay = || {
        Command::new(env!("CARGO_BIN_EXE_msgpipe"))
            .args(["dlq", "replay", "--all", "--timeout", "5", "-f"])
            .arg(&file)
            .env("MSGPIPE_BROKER_URI", restart_uri())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("msgpipe starts")
    };

    // Stop the node (a clean shutdown) once the replay is under way, reading on meanwhile.
    let started = Instant::now();
    let mut child = replay();
    let stdout = child.stdout.take().expect("stdout");
    let mut replayed: Vec<String> = Vec::new();
    let mut stopper = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8 line");
        if let Some(rest) = line.strip_prefix("replayed #") {
            replayed.extend(rest.split_whitespace().nth(1).map(str::to_string));
        }
        if replayed.len() == 20 && stopper.is_none() {
            stopper = Some(std::thread::spawn(|| node("stop", &[])));
        }
    }
    let output = child.wait_with_output().expect("msgpipe exits");
    let stopped = stopper
        .expect("the replay got under way")
        .join()
        .expect("stop runs");
    assert!(stopped, "the node stops");
    let stderr = text(&output.stderr);
    println!(
        "first run: {} replayed in {:?} before the broker went away; stderr: {stderr}",
        replayed.len(),
        started.elapsed()
    );
    assert!(
        replayed.len() < DEAD_LETTERS,
        "the replay finished before the broker stopped: the restart proved nothing"
    );
    assert!(!output.status.success(), "a replay cut short must fail");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&format!("after {} ", replayed.len())),
        "says how far it got: {stderr}"
    );
    assert!(!stderr.contains(SECRET) && !text(&output.stdout).contains(SECRET));

    assert!(node("ensure", &[]), "the node comes back");
    let after_restart = runtime.block_on(Tally::read());
    assert_eq!(
        after_restart.missing(),
        Vec::<String>::new(),
        "dead letters lost"
    );
    let in_work: BTreeSet<&String> = after_restart.work.iter().collect();
    let unconfirmed: Vec<&String> = replayed.iter().filter(|id| !in_work.contains(id)).collect();
    assert!(
        unconfirmed.is_empty(),
        "reported replayed but not in the work queue: {unconfirmed:?}"
    );
    println!(
        "after the restart: {} in the work queue, {} still in the DLQ, {} duplicates (at-least-once window)",
        after_restart.work.len(),
        after_restart.dlq.len(),
        after_restart.duplicates()
    );

    // Running it again finishes the job.
    let again = replay().wait_with_output().expect("msgpipe exits");
    assert!(
        again.status.success(),
        "second replay: {}",
        text(&again.stderr)
    );
    let done = runtime.block_on(Tally::read());
    assert_eq!(done.missing(), Vec::<String>::new());
    assert!(done.dlq.is_empty(), "DLQ drained: {:?}", done.dlq.len());
    println!(
        "after the second run: {} in the work queue for {DEAD_LETTERS} ids: {} duplicates",
        done.work.len(),
        done.duplicates()
    );
    node("stop", &[]);
}
