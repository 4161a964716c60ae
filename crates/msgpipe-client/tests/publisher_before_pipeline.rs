//! A publisher started before its pipeline exists: the most common start-up order in a GitOps
//! rollout, where the application's pod and the MessagePipeline arrive together. The broker is
//! up; only the exchange (or its binding) is missing. The publisher must say so once, keep the
//! connection (no reconnect storm), and deliver its outbox within seconds of the route
//! appearing, not at the next `retry_interval_seconds`.
//!
//! Each test captures the client's own log lines (nextest runs each test in its own process, so
//! a global subscriber is this test's alone).

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msgpipe_client::{
    BasicProperties, LiveConfig, Outcome, PipelineConfig, Publisher, PublisherOptions,
};
use support::{Retry, TestVhost, amqp_channel, amqp_uri, drain, notes_pipeline, provision};

/// How long the publisher runs before the pipeline is applied (the figure): long past
/// the point where the route backoff reached its 3 s cap.
const BEFORE: Duration = Duration::from_secs(30);
const NOTES: usize = 6;
/// The bound: every message delivered within 5 s of the pipeline being applied.
const DELIVERY_BOUND: Duration = Duration::from_secs(5);

/// Log lines written by msgpipe_client at info and above, one string per line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn install() -> Self {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("msgpipe_client=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per process");
        captured
    }

    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn warnings(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The notes pipeline with the resend interval of the seed's ConfigMap (120 s): a delivery
/// within seconds cannot come from the interval.
fn pipeline(vhost: &TestVhost) -> PipelineConfig {
    let mut config = notes_pipeline(&vhost.name, Retry::attempts(3));
    config.features.retry_interval_seconds = 120;
    config
}

/// Publishes `NOTES` notes spread over `BEFORE`; none can be confirmed, all must be queued.
async fn publish_before_the_route(publisher: &Publisher) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..NOTES {
        let id = format!("note-{n}");
        let properties = BasicProperties::default().with_message_id(id.as_str().into());
        let outcome = publisher
            .publish(id.as_bytes(), properties)
            .await
            .expect("the message is safe");
        assert_eq!(
            outcome,
            Outcome::Queued {
                message_id: id.clone()
            }
        );
        ids.push(id);
        tokio::time::sleep(BEFORE / NOTES as u32).await;
    }
    ids
}

/// Applies the pipeline, then waits for the outbox to empty; returns how long that took.
async fn apply_and_wait_for_delivery(publisher: &Publisher, config: &PipelineConfig) -> Duration {
    provision(config, support::shared_port()).await;
    let applied = Instant::now();
    while publisher.outbox_len() > 0 && applied.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = applied.elapsed();
    assert_eq!(
        publisher.outbox_len(),
        0,
        "outbox not delivered 30 s after the pipeline was applied: {:?}",
        publisher.stats()
    );
    took
}

async fn queued_ids(vhost: &TestVhost, queue: &str) -> Vec<String> {
    let (connection, channel) = amqp_channel(&vhost.name).await;
    let ids = drain(&channel, queue)
        .await
        .iter()
        .map(|m| support::message_id(&m.properties))
        .collect();
    let _ = connection.close(200, "test done".into()).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_started_before_its_exchange_exists_warns_once_and_delivers_within_seconds_of_the_apply()
 {
    let logs = Captured::install();
    let vhost = TestVhost::new("client-before-exchange");
    let config = pipeline(&vhost);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = PublisherOptions::new(amqp_uri(&vhost.name), dir.path().join("outbox.redb"));
    let publisher = Publisher::start(options, LiveConfig::fixed(config.clone()))
        .await
        .expect("starts");

    let ids = publish_before_the_route(&publisher).await;
    let before = publisher.stats();
    // One connection throughout: a missing exchange closes a channel, never the connection.
    assert_eq!(before.connections, 1, "{before:?}");
    // Probes paced by the route backoff (250 ms doubling to 3 s), not a storm: over 30 s that
    // is about 14; a channel reopened per publish attempt at full speed would be thousands.
    assert!((1..=20).contains(&before.channels_reopened), "{before:?}");
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "one warning per outage: {warnings:#?}");
    assert!(
        warnings[0].contains(&format!(
            "exchange notes does not exist in vhost {}: is the pipeline applied?",
            vhost.name
        )),
        "{warnings:#?}"
    );

    let took = apply_and_wait_for_delivery(&publisher, &config).await;
    assert!(took <= DELIVERY_BOUND, "delivered {took:?} after the apply");
    assert_eq!(
        queued_ids(&vhost, &config.queue).await,
        ids,
        "all, in order"
    );
    assert_eq!(publisher.stats().connections, 1);
    assert_eq!(logs.warnings().len(), 1, "{:#?}", logs.lines());
    assert!(
        logs.lines()
            .iter()
            .any(|l| l.contains("routes this publisher's messages again")),
        "the end of the outage is said: {:#?}",
        logs.lines()
    );
    println!(
        "delivered {NOTES} notes {took:?} after the apply; {} probes while the exchange was missing",
        before.channels_reopened
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_are_retried_on_a_short_backoff_not_the_resend_interval() {
    let logs = Captured::install();
    let vhost = TestVhost::new("client-before-binding");
    let config = pipeline(&vhost);
    // The exchange exists, but no queue is bound yet (the apply is half way): returns.
    let (connection, channel) = amqp_channel(&vhost.name).await;
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the work exchange");
    let _ = connection.close(200, "declared".into()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = PublisherOptions::new(amqp_uri(&vhost.name), dir.path().join("outbox.redb"));
    let publisher = Publisher::start(options, LiveConfig::fixed(config.clone()))
        .await
        .expect("starts");

    let ids = publish_before_the_route(&publisher).await;
    let before = publisher.stats();
    assert_eq!(before.connections, 1, "{before:?}");
    assert_eq!(
        before.channels_reopened, 0,
        "a return closes nothing: {before:?}"
    );
    assert!(
        before.resend_rounds >= 3,
        "retried on the short backoff, not every 120 s: {before:?}"
    );
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("routes nothing for routing key \"notes\""),
        "{warnings:#?}"
    );

    let took = apply_and_wait_for_delivery(&publisher, &config).await;
    assert!(took <= DELIVERY_BOUND, "delivered {took:?} after the apply");
    assert_eq!(
        queued_ids(&vhost, &config.queue).await,
        ids,
        "all, in order"
    );
    assert_eq!(logs.warnings().len(), 1, "{:#?}", logs.lines());
    publisher.close().await;
}
