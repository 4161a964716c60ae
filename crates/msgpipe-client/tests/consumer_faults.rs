//! Fault test: a consumer process handling 10,000 messages, 30 % of handler calls failing at
//! random, is killed with SIGKILL several times and restarted. At the end every message is
//! either recorded as processed by a handler (fsync'd before the handler returned Ok) or in the
//! DLQ: at-least-once, duplicates counted and allowed, nothing missing.
//!
//! The consumer process is this test binary re-run as a child on the ignored test
//! `consumer_child`, which only acts when the parent's environment variables are set.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use msgpipe_client::{Consumer, ConsumerOptions, HandlerError, LiveConfig};
use support::{
    IdLog, Retry, TestVhost, amqp_channel, amqp_uri, depth, notes_pipeline, provision, spawn_child,
    write_config,
};

const MESSAGES: usize = 10_000;
const FAILURE_PERCENT: u64 = 30;
/// Processed-count thresholds at which the consumer is killed.
const KILL_AT: [usize; 4] = [500, 2_500, 5_000, 7_500];
const SHORT_TIERS: Retry = Retry {
    max_attempts: 5,
    initial_ms: 50,
    max_ms: 400,
};

const ENV_URI: &str = "MSGPIPE_TEST_CHILD_URI";
const ENV_CONFIG: &str = "MSGPIPE_TEST_CHILD_CONFIG";
const ENV_LOG: &str = "MSGPIPE_TEST_CHILD_LOG";

/// The consumer process (run by the parent test; does nothing when run on its own).
#[test]
#[ignore = "child process of consumer_killed_repeatedly_loses_no_message"]
fn consumer_child() {
    let (Ok(uri), Ok(config), Ok(log)) = (
        std::env::var(ENV_URI),
        std::env::var(ENV_CONFIG),
        std::env::var(ENV_LOG),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let config = LiveConfig::watch(&config, Duration::from_secs(1))
            .await
            .expect("pipeline.json");
        let log = IdLog::open(Path::new(&log));
        let mut options = ConsumerOptions::new(uri);
        options.prefetch = 100;
        options.concurrency = 32;
        let consumer = Consumer::new(options, config).expect("consumer");
        consumer
            .run(move |message| {
                let log = log.clone();
                async move {
                    let id = message.message_id().unwrap_or_default().to_string();
                    if random_percent() < FAILURE_PERCENT {
                        return Err(HandlerError::retryable(format!("random failure of {id}")));
                    }
                    log.record(id).await;
                    Ok(())
                }
            })
            .await;
    });
}

fn random_percent() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 100
}

struct Parent {
    uri: String,
    config: String,
    log: String,
}

impl Parent {
    fn spawn(&self) -> Child {
        spawn_child(
            "consumer_child",
            &[
                (ENV_URI, self.uri.clone()),
                (ENV_CONFIG, self.config.clone()),
                (ENV_LOG, self.log.clone()),
            ],
        )
    }
}

fn kill(mut child: Child) {
    child.kill().expect("SIGKILL the consumer"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("reap the consumer");
}

fn distinct(ids: &[String]) -> usize {
    ids.iter().collect::<BTreeSet<_>>().len()
}

/// Messages still on their way: ready in the work queue or waiting in a retry tier.
async fn in_transit(channel: &lapin::Channel, queues: &[String]) -> u32 {
    let mut total = 0;
    for queue in queues {
        total += depth(channel, queue).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_repeatedly_loses_no_message() {
    let started = Instant::now();
    let vhost = TestVhost::new("client-consumer-faults");
    let pipeline = notes_pipeline(&vhost.name, SHORT_TIERS);
    provision(&pipeline, support::shared_port()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = write_config(dir.path(), &pipeline);
    let log_path = dir.path().join("processed.log");
    let parent = Parent {
        uri: amqp_uri(&vhost.name),
        config: config_path.display().to_string(),
        log: log_path.display().to_string(),
    };
    let (conn, channel) = amqp_channel(&vhost.name).await;
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i:05}")).collect();
    support::publish_ids(&channel, "notes", "notes", &ids).await;
    println!("published {MESSAGES} in {:?}", started.elapsed());

    let mut queues = vec![pipeline.queue.clone()];
    queues.extend(pipeline.retry.tiers.iter().map(|t| t.queue.clone()));
    let dlq = pipeline.dead_letter.queue.clone();

    let mut child = parent.spawn();
    let mut kills = 0;
    for threshold in KILL_AT {
        while distinct(&IdLog::read(&log_path)) < threshold {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no progress to {threshold}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(child);
        kills += 1;
        println!(
            "SIGKILL #{kills} at {threshold}+ processed, {:?}",
            started.elapsed()
        );
        child = parent.spawn();
    }

    // Done when everything is accounted for and nothing is in transit once no consumer holds
    // unacked messages (a kill returns them to the queue).
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "did not finish in time"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let processed = distinct(&IdLog::read(&log_path));
        let dead = depth(&channel, &dlq).await as usize;
        if processed + dead < MESSAGES || in_transit(&channel, &queues).await > 0 {
            continue;
        }
        kill(child);
        tokio::time::sleep(Duration::from_millis(200)).await;
        if in_transit(&channel, &queues).await == 0 {
            break;
        }
        child = parent.spawn(); // a kill put unacked messages back: consume them too
    }

    let processed_lines = IdLog::read(&log_path);
    let processed: BTreeSet<&String> = processed_lines.iter().collect();
    let dead_letters = support::drain(&channel, &dlq).await;
    let mut dead_ids: HashMap<String, usize> = HashMap::new();
    for letter in &dead_letters {
        *dead_ids
            .entry(support::message_id(&letter.delivery.properties))
            .or_default() += 1;
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !processed.contains(id) && !dead_ids.contains_key(*id))
        .collect();
    let handled_twice = processed_lines.len() - processed.len();
    let processed_and_dead = dead_ids.keys().filter(|id| processed.contains(id)).count();
    let unknown = dead_ids.keys().filter(|id| !id.starts_with("m-")).count();
    println!(
        "{MESSAGES} messages, {kills}+ SIGKILLs: {} processed ({} distinct), {} dead letters ({} distinct), \
         duplicates: {handled_twice} handled twice, {processed_and_dead} both processed and dead-lettered; \
         missing {}; {:?}",
        processed_lines.len(),
        processed.len(),
        dead_letters.len(),
        dead_ids.len(),
        missing.len(),
        started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "lost messages: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert_eq!(unknown, 0, "dead letters without a known message id");
    assert!(
        !dead_ids.is_empty(),
        "with 30 % failures some message should exhaust 5 attempts"
    );
    let _ = conn.close(200, "test done".into()).await;
}
