//! The publisher's outbox against a broker that goes away and comes back: the outbox drains as
//! soon as the broker is back (not an interval later), and the `retry_pending` flag, flipped in a
//! watched pipeline.json the way the kubelet updates a ConfigMap volume (symlink swap), parks the
//! outbox while off (fresh publishes go straight through) and drains it, in order, once on.
//!
//! The broker "outage" is a TCP proxy in front of the shared test node that refuses and cuts
//! connections, so the shared node is never stopped.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use msgpipe_client::{
    Backoff, BasicProperties, LiveConfig, Outcome, PipelineConfig, Publisher, PublisherOptions,
};
use support::{Proxy, Retry, TestVhost, amqp_channel, depth, encode, notes_pipeline, provision};

/// A ConfigMap-style directory: `pipeline.json -> ..data/pipeline.json`, `..data -> ..gen_N`.
struct MountedConfig {
    dir: PathBuf,
    generation: u32,
}

impl MountedConfig {
    fn new(dir: &Path, config: &PipelineConfig) -> Self {
        let mut mount = Self {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        mount.write(config);
        std::os::unix::fs::symlink("..data/pipeline.json", mount.path()).expect("symlink");
        mount
    }

    fn path(&self) -> PathBuf {
        self.dir.join("pipeline.json")
    }

    fn write(&mut self, config: &PipelineConfig) {
        self.generation += 1;
        let target = self.dir.join(format!("..gen_{}", self.generation));
        std::fs::create_dir(&target).expect("mkdir");
        let text = serde_json::to_string_pretty(config).expect("json");
        std::fs::write(target.join("pipeline.json"), text).expect("write");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap");
    }
}

async fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn note(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_pending_off_parks_the_outbox_and_fresh_publishes_go_straight_through() {
    let vhost = TestVhost::new("client-flags");
    let pipeline = notes_pipeline(&vhost.name, Retry::attempts(3));
    provision(&pipeline, support::shared_port()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = pipeline.clone();
    config.features.retry_pending = true;
    config.features.retry_interval_seconds = 1;
    let mut mount = MountedConfig::new(dir.path(), &config);
    let live = LiveConfig::watch(mount.path(), Duration::from_millis(100))
        .await
        .expect("watch");

    let proxy = Proxy::start(format!("127.0.0.1:{}", support::shared_port()));
    let mut options = PublisherOptions::new(
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            proxy.port,
            encode(&vhost.name)
        ),
        dir.path().join("outbox.redb"),
    );
    options.reconnect = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(300),
    };
    options.connect_timeout = Duration::from_secs(2);
    options.confirm_timeout = Duration::from_secs(2);
    let publisher = Publisher::start(options, live.clone())
        .await
        .expect("starts offline");

    // Broker unreachable: everything is saved, and resend rounds keep trying every interval.
    let first: Vec<String> = (0..50).map(|i| format!("f-{i:02}")).collect();
    for id in &first {
        let outcome = publisher
            .publish(id.as_bytes(), note(id))
            .await
            .expect("publish");
        assert_eq!(
            outcome,
            Outcome::Queued {
                message_id: id.clone()
            }
        );
    }
    assert_eq!(publisher.outbox_len(), 50);
    wait_for("two resend rounds", Duration::from_secs(5), || {
        publisher.stats().resend_rounds >= 2
    })
    .await;

    // Flag off, broker back: the outbox stays put, and fresh messages do not wait behind it.
    config.features.retry_pending = false;
    mount.write(&config);
    let seen = wait_for("the flag off", Duration::from_secs(3), || {
        !live.features().retry_pending
    })
    .await;
    let rounds_when_off = publisher.stats().resend_rounds;
    proxy.set_up(true);
    wait_for("a connection", Duration::from_secs(5), || {
        publisher.stats().connections >= 1
    })
    .await;
    let later: Vec<String> = (0..5).map(|i| format!("g-{i}")).collect();
    for id in &later {
        let outcome = publisher
            .publish(id.as_bytes(), note(id))
            .await
            .expect("publish");
        assert_eq!(
            outcome,
            Outcome::Confirmed {
                message_id: id.clone()
            },
            "a parked outbox must not hold fresh publishes back"
        );
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await; // 2.5 intervals
    let (conn, channel) = amqp_channel(&vhost.name).await;
    assert_eq!(
        publisher.stats().resend_rounds,
        rounds_when_off,
        "no round while off"
    );
    assert_eq!(publisher.outbox_len(), 50, "the parked messages stay");
    assert_eq!(
        depth(&channel, "notes_queue").await,
        5,
        "only the fresh messages reached the broker while off"
    );
    println!("flag off seen after {seen:?}; no resend for 2.5 s with the broker up");

    // Flag on: the parked messages are resent at once, oldest first.
    config.features.retry_pending = true;
    mount.write(&config);
    let drained = wait_for("the outbox to drain", Duration::from_secs(4), || {
        publisher.outbox_len() == 0
    })
    .await;
    println!("outbox drained {drained:?} after the flag went back on");
    let arrived: Vec<String> = support::drain(&channel, "notes_queue")
        .await
        .iter()
        .map(|m| support::message_id(&m.delivery.properties))
        .collect();
    let expected: Vec<String> = later.iter().chain(&first).cloned().collect();
    assert_eq!(
        arrived, expected,
        "every message once: the fresh ones, then the parked ones in publish order"
    );

    // Outbox empty and broker up: straight through.
    let outcome = publisher
        .publish(b"direct", note("h-0"))
        .await
        .expect("publish");
    assert_eq!(
        outcome,
        Outcome::Confirmed {
            message_id: "h-0".into()
        }
    );
    publisher.close().await;
    proxy.set_up(false);
    let _ = conn.close(200, "test done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_drains_as_soon_as_the_broker_is_back_not_an_interval_later() {
    let vhost = TestVhost::new("client-drain");
    let mut pipeline = notes_pipeline(&vhost.name, Retry::attempts(3));
    provision(&pipeline, support::shared_port()).await;
    pipeline.features.retry_interval_seconds = 120; // the default: far longer than the test
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = MountedConfig::new(dir.path(), &pipeline);
    let live = LiveConfig::watch(mount.path(), Duration::from_secs(1))
        .await
        .expect("watch");
    let proxy = Proxy::start(format!("127.0.0.1:{}", support::shared_port()));
    let mut options = PublisherOptions::new(
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            proxy.port,
            encode(&vhost.name)
        ),
        dir.path().join("outbox.redb"),
    );
    options.reconnect = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(300),
    };
    options.connect_timeout = Duration::from_secs(2);
    let publisher = Publisher::start(options, live)
        .await
        .expect("starts offline");

    let outage: Vec<String> = (0..20).map(|i| format!("o-{i:02}")).collect();
    for id in &outage {
        let outcome = publisher
            .publish(id.as_bytes(), note(id))
            .await
            .expect("publish");
        assert!(matches!(outcome, Outcome::Queued { .. }), "{outcome:?}");
    }
    proxy.set_up(true);
    let drained = wait_for("the outbox to drain", Duration::from_secs(10), || {
        publisher.outbox_len() == 0
    })
    .await;
    println!("outbox of 20 drained {drained:?} after the broker came back");
    let stats = publisher.stats();
    assert_eq!(stats.resent, 20, "{stats:?}");

    let after: Vec<String> = (0..5).map(|i| format!("a-{i}")).collect();
    for id in &after {
        let outcome = publisher
            .publish(id.as_bytes(), note(id))
            .await
            .expect("publish");
        assert_eq!(
            outcome,
            Outcome::Confirmed {
                message_id: id.clone()
            }
        );
    }
    let (conn, channel) = amqp_channel(&vhost.name).await;
    let arrived: Vec<String> = support::drain(&channel, "notes_queue")
        .await
        .iter()
        .map(|m| support::message_id(&m.delivery.properties))
        .collect();
    let expected: Vec<String> = outage.iter().chain(&after).cloned().collect();
    assert_eq!(arrived, expected, "every message once, in publish order");
    publisher.close().await;
    proxy.set_up(false);
    let _ = conn.close(200, "test done".into()).await;
}
