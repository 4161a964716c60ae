//! Fault test on a 3-node RabbitMQ cluster (three nodes of the suite's version on loopback,
//! `scripts/test-broker.sh` `msgpipe-c1..3`, AMQP 5641-5643): the notes pipeline with quorum
//! work, retry and dead-letter queues, a consumer under load whose handler fails 30 % of
//! calls, and the node hosting the work queue's leader killed (-9) mid-run. Nothing may be
//! lost, nothing may stay stuck in a queue, and retry delays stay within 20 % of the tier's
//! (none early, 99 % of them at most 20 % late, outside the failover itself).
//!
//! The clients talk to a surviving node; the kill moves every quorum leader elsewhere.
//! Messages arrive at a steady rate the consumer keeps up with, so a retry's observed delay
//! (handler call at attempt k to the call at k + 1) is its tier's delay plus the path through
//! two quorum queues, not a backlog's drain time. The test prints messages, duplicates and the
//! retry-delay error, and stops its nodes.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msgpipe_client::{Consumer, ConsumerOptions, HandlerError, LiveConfig};
use serde_json::Value;
use support::{encode, http};

const NODES: [(&str, u16); 3] = [
    ("msgpipe-c1", 5641),
    ("msgpipe-c2", 5642),
    ("msgpipe-c3", 5643),
];
const COOKIE: &str = "msgpipe-cluster-test-cookie";
const VHOST: &str = "cluster";
const MESSAGES: usize = 3_000;
/// Messages per second: below what one consumer handles, so the work queue holds no backlog.
const PUBLISH_RATE: usize = 150;
const FAILURE_PERCENT: u64 = 30;
/// Tiers 1 s, 2 s, 4 s: long enough that a 20 % bound is not lost in scheduling noise.
const PIPELINE: &str = r#"apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: { name: notes, namespace: cluster-test }
spec:
  broker: { secretRef: { name: rabbitmq }, vhost: cluster }
  queue: { name: notes_queue, type: quorum, exchange: notes, routingKey: notes }
  retry: { maxAttempts: 4, backoff: { initialDelay: 1s, multiplier: 2, maxDelay: 4s } }
  deadLetter: { exchange: notes_dlq_exchange, queue: notes_queue_dlq }
  alerts: { enabled: false }
  clientFlags: { retryPending: true, retryIntervalSeconds: 1 }
"#;
/// Allowed error of an observed retry delay against its tier's delay.
const DELAY_TOLERANCE: f64 = 0.20;

fn script(command: &str, node: usize, extra: &[&str]) -> std::process::Output {
    let (name, port) = NODES[node];
    Command::new(support::repo_path("scripts/test-broker.sh"))
        .args([command, name, &port.to_string()])
        .args(extra)
        .env("MSGPIPE_TEST_BROKER_CLUSTER_COOKIE", COOKIE)
        .output()
        .expect("test-broker.sh runs")
}

fn ctl(node: usize, args: &[&str]) {
    let output = script("ctl", node, args);
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} on {}: {}",
        NODES[node].0,
        support::output_text(&output)
    );
}

fn mgmt_url(node: usize, path: &str) -> String {
    format!("http://127.0.0.1:{}/api{path}", NODES[node].1 + 10_000)
}

fn amqp_uri(node: usize) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/{VHOST}", NODES[node].1)
}

/// Three fresh nodes, the second and third joined to the first.
fn start_cluster() {
    let starts: Vec<_> = (0..NODES.len())
        .map(|i| {
            std::thread::spawn(move || {
                script("reset", i, &[]);
                let output = script("ensure", i, &[]);
                assert!(
                    output.status.success(),
                    "node {} did not start: {}",
                    NODES[i].0,
                    support::output_text(&output)
                );
            })
        })
        .collect();
    for start in starts {
        start.join().expect("node start");
    }
    let first = format!("{}@localhost", NODES[0].0);
    for i in 1..NODES.len() {
        ctl(i, &["stop_app"]);
        ctl(i, &["join_cluster", &first]);
        ctl(i, &["start_app"]);
    }
    let (status, body) = http("GET", &mgmt_url(0, "/nodes"), None, true);
    assert_eq!(status, 200, "{body}");
    let nodes: Value = serde_json::from_str(&body).expect("nodes json");
    let running = nodes
        .as_array()
        .map(|n| n.iter().filter(|n| n["running"] == true).count());
    assert_eq!(running, Some(3), "three running cluster members: {body}");
}

fn stop_cluster() {
    for i in 0..NODES.len() {
        script("reset", i, &[]);
    }
}

fn msgpipe(args: &[&str], dir: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_msgpipe"))
        .args(args)
        .current_dir(dir)
        .env("MSGPIPE_BROKER_URI", amqp_uri(0))
        .env(
            "MSGPIPE_MANAGEMENT_URI",
            format!("http://127.0.0.1:{}", NODES[0].1 + 10_000),
        )
        .output()
        .expect("msgpipe runs");
    assert!(
        output.status.success(),
        "msgpipe {args:?}: {}",
        support::output_text(&output)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The vhost, the pipeline applied through the first node, and its pipeline.json.
fn provision(dir: &Path) -> std::path::PathBuf {
    let vhost = mgmt_url(0, &format!("/vhosts/{VHOST}"));
    assert!((200..300).contains(&http("PUT", &vhost, None, true).0));
    let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let url = mgmt_url(0, &format!("/permissions/{VHOST}/guest"));
    assert!((200..300).contains(&http("PUT", &url, Some(&permissions), true).0));
    std::fs::write(dir.join("pipeline.yaml"), PIPELINE).expect("write pipeline");
    msgpipe(&["apply", "-f", "pipeline.yaml"], dir);
    let rendered: Value = serde_json::from_str(&msgpipe(
        &[
            "render",
            "-f",
            "pipeline.yaml",
            "-o",
            "json",
            "--vhost",
            VHOST,
        ],
        dir,
    ))
    .expect("render json");
    let config = rendered
        .as_array()
        .and_then(|docs| docs.iter().find(|d| d["kind"] == "ConfigMap"))
        .and_then(|cm| cm["data"]["pipeline.json"].as_str())
        .expect("pipeline.json in the rendered ConfigMap")
        .to_string();
    let path = dir.join("pipeline.json");
    std::fs::write(&path, config).expect("write pipeline.json");
    path
}

/// Index of the node hosting the leader of `queue` (quorum queues report `leader`).
fn leader_of(queue: &str, asked: usize) -> usize {
    let url = mgmt_url(asked, &format!("/queues/{VHOST}/{}", encode(queue)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http("GET", &url, None, true);
        let info: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let leader = info["leader"].as_str().or(info["node"].as_str());
        if status == 200
            && let Some(leader) = leader
            && let Some(i) = NODES
                .iter()
                .position(|(name, _)| leader == format!("{name}@localhost"))
        {
            return i;
        }
        assert!(Instant::now() < deadline, "no leader for {queue}: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn random_percent() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 100
}

/// Every handler call: message id -> (attempt, when) in call order.
type Calls = Arc<Mutex<BTreeMap<String, Vec<(u32, Instant)>>>>;

async fn confirm_channel(node: usize) -> (lapin::Connection, lapin::Channel) {
    msgpipe::broker::install_crypto_provider();
    let connection =
        lapin::Connection::connect(&amqp_uri(node), lapin::ConnectionProperties::default())
            .await
            .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Publishes `ids` at a steady [`PUBLISH_RATE`] (confirmed), so the consumer keeps up and a
/// retried message's wait is its tier's delay, not the time a backlog takes to drain.
async fn publish_steadily(channel: lapin::Channel, ids: Vec<String>) {
    let batch = PUBLISH_RATE / 10;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in ids.chunks(batch) {
        tick.tick().await;
        let mut confirms = Vec::with_capacity(chunk.len());
        for id in chunk {
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            let options = lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let confirm = channel
                .basic_publish(
                    "notes".into(),
                    "notes".into(),
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
            assert!(confirmation.is_ack() && confirmation.take_message().is_none());
        }
    }
}

/// Ready plus unacknowledged messages of `queue`, from the management API of `node`
/// (a passive declare does not count unacked messages).
fn queue_total(node: usize, queue: &str) -> Option<u64> {
    let url = mgmt_url(node, &format!("/queues/{VHOST}/{}", encode(queue)));
    let (status, body) = http("GET", &url, None, true);
    let info: Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| info["messages"].as_u64())?
}

/// Observed retry delays as (tier delay, observed gap, gap began at) per retried attempt.
fn retry_gaps(calls: &Calls, tiers_ms: &[u64]) -> Vec<(u64, Duration, Instant)> {
    let calls = calls.lock().expect("calls");
    let mut gaps = Vec::new();
    for attempts in calls.values() {
        // The first call of each attempt (a redelivered copy of the same attempt is a duplicate).
        let mut first: BTreeMap<u32, Instant> = BTreeMap::new();
        for (attempt, at) in attempts {
            first.entry(*attempt).or_insert(*at);
        }
        for (attempt, at) in &first {
            let (Some(next), Some(delay)) = (
                first.get(&(attempt + 1)),
                tiers_ms.get(*attempt as usize - 1),
            ) else {
                continue;
            };
            gaps.push((*delay, next.duration_since(*at), *at));
        }
    }
    gaps
}

/// When every queue in `queues` has a leader on another node than `killed` (polled on
/// `asked`): the end of the failover.
fn leaders_moved(queues: &[String], killed: usize, asked: usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let moved = queues.iter().all(|queue| {
            let url = mgmt_url(asked, &format!("/queues/{VHOST}/{}", encode(queue)));
            let (status, body) = http("GET", &url, None, true);
            let info: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let leader = info["leader"].as_str().unwrap_or_default();
            status == 200
                && !leader.is_empty()
                && leader != format!("{}@localhost", NODES[killed].0)
                && info["state"] == "running"
        });
        if moved {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "quorum leaders did not move off the killed node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_node_killed_under_load_loses_nothing_and_keeps_retry_delays() {
    let started = Instant::now();
    start_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = provision(dir.path());
    println!("cluster of 3 up and provisioned in {:?}", started.elapsed());
    let leader = leader_of("notes_queue", 1);
    let survivor = (leader + 1) % NODES.len();
    let (conn, channel) = confirm_channel(survivor).await;

    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i:05}")).collect();
    let (publish_conn, publish_channel) = confirm_channel(survivor).await;
    let publishing = tokio::spawn(publish_steadily(publish_channel, ids.clone()));

    let config = LiveConfig::watch(config_path.to_str().expect("utf-8"), Duration::from_secs(1))
        .await
        .expect("pipeline.json");
    let tiers_ms: Vec<u64> = config
        .current()
        .retry
        .tiers
        .iter()
        .map(|t| t.delay_ms)
        .collect();
    let tier_queues: Vec<String> = config
        .current()
        .retry
        .tiers
        .iter()
        .map(|t| t.queue.clone())
        .collect();
    let mut options = ConsumerOptions::new(amqp_uri(survivor));
    options.prefetch = 100;
    options.concurrency = 32;
    let consumer = Consumer::new(options, config).expect("consumer");
    let stop = consumer.shutdown_handle();
    let calls: Calls = Arc::default();
    let processed: Arc<Mutex<Vec<String>>> = Arc::default();
    let (calls2, processed2) = (calls.clone(), processed.clone());
    let running = tokio::spawn(consumer.run(move |message| {
        let (calls, processed) = (calls2.clone(), processed2.clone());
        async move {
            let id = message.message_id().unwrap_or_default().to_string();
            calls
                .lock()
                .expect("calls")
                .entry(id.clone())
                .or_default()
                .push((message.attempt(), Instant::now()));
            if random_percent() < FAILURE_PERCENT {
                return Err(HandlerError::retryable(format!("random failure of {id}")));
            }
            processed.lock().expect("processed").push(id);
            Ok(())
        }
    }));

    let distinct = |p: &Arc<Mutex<Vec<String>>>| {
        p.lock()
            .expect("processed")
            .iter()
            .collect::<HashSet<_>>()
            .len()
    };
    while distinct(&processed) < MESSAGES / 3 {
        assert!(started.elapsed() < Duration::from_secs(240), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut queues = vec!["notes_queue".to_string()];
    queues.extend(tier_queues);
    let killed_at = Instant::now();
    let output = script("kill", leader, &[]);
    assert!(output.status.success(), "kill -9 the leader's node");
    let watched = queues.clone();
    let failover = tokio::task::spawn_blocking(move || leaders_moved(&watched, leader, survivor));
    println!(
        "killed {} (leader of notes_queue) at {} processed, {:?}",
        NODES[leader].0,
        distinct(&processed),
        started.elapsed()
    );

    publishing
        .await
        .expect("every message published and confirmed");
    let _ = publish_conn.close(200, "published".into()).await;
    let finish_by = Instant::now() + Duration::from_secs(180);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let dead = support::depth(&channel, "notes_queue_dlq").await as usize;
        let mut in_transit = 0;
        for queue in &queues {
            in_transit += queue_total(survivor, queue).unwrap_or(1);
        }
        if distinct(&processed) + dead >= MESSAGES && in_transit == 0 {
            break;
        }
        assert!(
            Instant::now() < finish_by,
            "stuck: {} processed, {dead} dead, {in_transit} in transit",
            distinct(&processed)
        );
    }
    stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;

    let processed_ids = processed.lock().expect("processed").clone();
    let processed_set: HashSet<&String> = processed_ids.iter().collect();
    let mut dead_ids = HashSet::new();
    while let Some(letter) = channel
        .basic_get(
            "notes_queue_dlq".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let id = letter
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        dead_ids.insert(id);
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !processed_set.contains(id) && !dead_ids.contains(*id))
        .collect();
    let gaps = retry_gaps(&calls, &tiers_ms);
    let error = |(delay, gap, _): &(u64, Duration, Instant)| {
        (gap.as_secs_f64() * 1000.0 - *delay as f64) / *delay as f64
    };
    // The failover: from the kill until every queue has a new leader.
    let recovered_at = failover.await.expect("failover watch");
    let outage = recovered_at.duration_since(killed_at);
    // Retries whose wait overlapped the failover waited for the election too.
    let overlaps =
        |(_, gap, at): &&(u64, Duration, Instant)| *at <= recovered_at && *at + *gap >= killed_at;
    let steady: Vec<_> = gaps.iter().filter(|g| !overlaps(g)).collect();
    let mut errors: Vec<f64> = steady.iter().map(|g| error(g)).collect();
    errors.sort_by(f64::total_cmp);
    let at = |q: f64| errors[((errors.len() - 1) as f64 * q) as usize] * 100.0;
    let (min_error, max_error) = (errors[0], errors[errors.len() - 1]);
    let across: Vec<f64> = gaps.iter().filter(|g| overlaps(g)).map(error).collect();
    let max_across = across.iter().copied().fold(0.0, f64::max);
    println!(
        "{MESSAGES} messages: {} handled ok ({} distinct, {} duplicates), {} dead-lettered ({} of them \
         also handled: at-least-once copies), {} missing; \
         failover {outage:?}; {} retries outside it: delay error min {:+.1}%, p50 {:+.1}%, p99 {:+.1}%, \
         max {:+.1}%; {} retries overlapping it: up to {:+.1}%; {:?}",
        processed_ids.len(),
        processed_set.len(),
        processed_ids.len() - processed_set.len(),
        dead_ids.len(),
        dead_ids
            .iter()
            .filter(|id| processed_set.contains(id))
            .count(),
        missing.len(),
        steady.len(),
        min_error * 100.0,
        at(0.5),
        at(0.99),
        max_error * 100.0,
        across.len(),
        max_across * 100.0,
        started.elapsed()
    );
    let _ = conn.close(200, "test done".into()).await;
    stop_cluster();

    assert!(
        missing.is_empty(),
        "lost: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert!(!steady.is_empty(), "some messages were retried");
    // Never early; late by at most 20 % for 99 % of retries. The rest is the scheduler of a
    // small shared machine running three nodes (single retries a few hundred ms late were
    // seen with the load average at 12); the maximum is printed above.
    assert!(
        min_error >= -DELAY_TOLERANCE && at(0.99) <= DELAY_TOLERANCE * 100.0,
        "retry delays off by {:+.1}% (min) and {:+.1}% (p99); allowed ±{:.0}%",
        min_error * 100.0,
        at(0.99),
        DELAY_TOLERANCE * 100.0
    );
}
