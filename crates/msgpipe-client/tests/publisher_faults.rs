//! Fault test: a publisher process sends 10,000 messages while its broker is stopped for 20 s,
//! and is SIGKILLed once during the outage and restarted. After the broker is back every one
//! of the 10,000 message ids is in the queue (duplicates allowed: at-least-once).
//!
//! Runs on a broker node of its own (msgpipe-client, AMQP port 5677) so that stopping it does
//! not disturb the shared test node. The publisher process is this test binary re-run on the
//! ignored test `publisher_child`.

mod support;

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use msgpipe_client::{
    Backoff, BasicProperties, LiveConfig, PublishError, Publisher, PublisherOptions,
};
use support::{IdLog, Retry, encode, http, notes_pipeline, provision, spawn_child, write_config};

const NODE: &str = "msgpipe-client";
const PORT: u16 = 5677;
const MESSAGES: usize = 10_000;
/// Publishes per second of the child (so that most of them happen during the outage).
const RATE: u64 = 500;
const OUTAGE: Duration = Duration::from_secs(20);

const ENV_URI: &str = "MSGPIPE_TEST_CHILD_URI";
const ENV_CONFIG: &str = "MSGPIPE_TEST_CHILD_CONFIG";
const ENV_OUTBOX: &str = "MSGPIPE_TEST_CHILD_OUTBOX";
const ENV_DONE: &str = "MSGPIPE_TEST_CHILD_DONE";

fn node(command: &str) -> bool {
    support::broker_node(command, NODE, &PORT.to_string(), &[], None)
}

/// The publisher process (run by the parent test; does nothing when run on its own).
#[test]
#[ignore = "child process of publisher_killed_during_a_broker_outage_loses_no_message"]
fn publisher_child() {
    let vars = [ENV_URI, ENV_CONFIG, ENV_OUTBOX, ENV_DONE].map(std::env::var);
    let [Ok(uri), Ok(config), Ok(outbox), Ok(done)] = vars else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(publish_all(uri, config, outbox, done));
}

async fn publish_all(uri: String, config: String, outbox: String, done: String) {
    let config = LiveConfig::watch(&config, Duration::from_millis(200))
        .await
        .expect("pipeline.json");
    let mut options = PublisherOptions::new(uri, outbox);
    options.reconnect = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    options.connect_timeout = Duration::from_secs(2);
    options.confirm_timeout = Duration::from_secs(2);
    let publisher = Publisher::start(options, config).await.expect("publisher");
    let already: BTreeSet<String> = IdLog::read(Path::new(&done)).into_iter().collect();
    let todo: VecDeque<String> = (0..MESSAGES)
        .map(|i| format!("p-{i:05}"))
        .filter(|id| !already.contains(id))
        .collect();
    println!(
        "child: {} already published, {} to go",
        already.len(),
        todo.len()
    );
    let todo = Arc::new(Mutex::new(todo));
    let pace = Arc::new(tokio::sync::Mutex::new(tokio::time::interval(
        Duration::from_micros(1_000_000 / RATE),
    )));
    let log = IdLog::open(Path::new(&done));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (publisher, todo, pace, log) =
            (publisher.clone(), todo.clone(), pace.clone(), log.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(id) = todo.lock().expect("lock").pop_front() else {
                    return;
                };
                pace.lock().await.tick().await;
                let properties = BasicProperties::default().with_message_id(id.as_str().into());
                loop {
                    match publisher.publish(id.as_bytes(), properties.clone()).await {
                        Ok(_) => break,
                        Err(PublishError::OutboxFull(_)) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(error) => panic!("publish {id}: {error}"),
                    }
                }
                log.record(id).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let start = Instant::now();
    while publisher.outbox_len() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "outbox never drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("child: done, {:?}", publisher.stats());
    publisher.close().await;
}

struct Parent {
    envs: Vec<(&'static str, String)>,
    done: std::path::PathBuf,
}

impl Parent {
    fn spawn(&self) -> Child {
        spawn_child("publisher_child", &self.envs)
    }

    fn published(&self) -> usize {
        IdLog::read(&self.done).len()
    }

    async fn wait_published(&self, count: usize, started: Instant) {
        while self.published() < count {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "stuck before {count} publishes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every message id in `queue`, read with a consumer until the queue stays quiet.
async fn read_all(uri: &str, queue: &str) -> Vec<String> {
    let connection = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(1_000, lapin::options::BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "count".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut ids = Vec::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        let delivery = delivery.expect("delivery");
        ids.push(support::message_id(&delivery.properties));
        delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let _ = connection.close(200, "counted".into()).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_killed_during_a_broker_outage_loses_no_message() {
    support::install_crypto_provider();
    assert!(node("ensure"), "broker node {NODE} starts");
    let started = Instant::now();
    let vhost = format!("client-publisher-{}", std::process::id());
    let mgmt = format!("http://127.0.0.1:{}/api", PORT + 10000);
    let (status, body) = http(
        "PUT",
        &format!("{mgmt}/vhosts/{}", encode(&vhost)),
        None,
        true,
    );
    assert!(
        (200..300).contains(&status),
        "create vhost: {status} {body}"
    );
    let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (status, _) = http(
        "PUT",
        &format!("{mgmt}/permissions/{}/guest", encode(&vhost)),
        Some(&permissions),
        true,
    );
    assert!((200..300).contains(&status));
    let pipeline = notes_pipeline(&vhost, Retry::attempts(3));
    provision(&pipeline, PORT).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pipeline); // retry interval 1 s
    let uri = format!("amqp://guest:guest@127.0.0.1:{PORT}/{}", encode(&vhost));
    let done = dir.path().join("published.log");
    let parent = Parent {
        envs: vec![
            (ENV_URI, uri.clone()),
            (ENV_CONFIG, config.display().to_string()),
            (
                ENV_OUTBOX,
                dir.path().join("outbox.redb").display().to_string(),
            ),
            (ENV_DONE, done.display().to_string()),
        ],
        done,
    };

    let child = parent.spawn();
    parent.wait_published(1_500, started).await;
    let stopped_at = Instant::now();
    assert!(node("stop"), "broker node stops");
    let at_stop = parent.published();
    println!(
        "broker stopped after {at_stop} publishes ({:?})",
        started.elapsed()
    );
    parent.wait_published(at_stop + 2_000, started).await;
    let mut child = child;
    child.kill().expect("SIGKILL the publisher");
    child.wait().expect("reap");
    println!(
        "publisher SIGKILLed after {} publishes ({:?})",
        parent.published(),
        started.elapsed()
    );
    let mut child = parent.spawn();

    tokio::time::sleep(OUTAGE.saturating_sub(stopped_at.elapsed())).await;
    assert!(node("ensure"), "broker node restarts");
    println!("broker back after {:?} down", stopped_at.elapsed());
    let exit = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "publisher did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "publisher child failed: {exit}");

    let ids = read_all(&uri, &pipeline.queue).await;
    let distinct: BTreeSet<&String> = ids.iter().collect();
    println!(
        "{} messages in the queue, {} distinct ids, {} duplicates; {:?}",
        ids.len(),
        distinct.len(),
        ids.len() - distinct.len(),
        started.elapsed()
    );
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("p-{i:05}"))
        .filter(|id| !distinct.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "missing {} ids: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(distinct.len(), MESSAGES);
    http(
        "DELETE",
        &format!("{mgmt}/vhosts/{}", encode(&vhost)),
        None,
        true,
    );
    node("stop");
}
