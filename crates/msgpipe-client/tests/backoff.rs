//! The client consumer against a real broker (shared test node, a vhost per test): retry tiers
//! give the backoff the spec promises, dead letters carry every explaining header, and a copy
//! the broker does not take is never acked.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use msgpipe_client::{
    Consumer, ConsumerOptions, ConsumerStats, HandlerError, LiveConfig, Message, PipelineConfig,
    headers,
};
use support::{Retry, TestVhost, amqp_channel, amqp_uri, depth, notes_pipeline, provision};

const NOTES_RETRY: Retry = Retry {
    max_attempts: 5,
    initial_ms: 1_000,
    max_ms: 60_000,
};

/// Publishes one message with a message id to the notes work exchange.
async fn publish_note(channel: &lapin::Channel, id: &str, body: &[u8]) {
    let properties = lapin::BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2);
    support::publish_with(channel, "notes", "notes", body, properties).await;
}

/// Runs a consumer until `done` holds (checked every 50 ms) or `limit` passes.
async fn consume_until(
    vhost: &str,
    config: PipelineConfig,
    handler: impl Fn(Message) -> Result<(), HandlerError> + Send + Sync + 'static,
    limit: Duration,
    done: impl Fn(&ConsumerStats) -> bool,
) -> ConsumerStats {
    let consumer = Consumer::new(
        ConsumerOptions::new(amqp_uri(vhost)),
        LiveConfig::fixed(config),
    )
    .expect("consumer");
    let stop = consumer.shutdown_handle();
    let stats = consumer.stats();
    let handler = Arc::new(handler);
    let running = tokio::spawn(consumer.run(move |message| {
        let handler = handler.clone();
        async move { handler(message) }
    }));
    let start = Instant::now();
    while !done(&stats.get()) && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.shutdown();
    running.await.expect("consumer task")
}

fn text(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: expected a string header, got {other:?}"),
    }
}

fn int(headers: &FieldTable, name: &str) -> i64 {
    match headers.inner().get(name) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("{name}: expected an integer header, got {other:?}"),
    }
}

fn time(headers: &FieldTable, name: &str) -> std::time::SystemTime {
    let value = text(headers, name);
    msgpipe_client::headers::parse_time(&value)
        .unwrap_or_else(|| panic!("{name} = {value:?} is not RFC 3339"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_message_waits_each_tier_then_lands_in_dlq_with_every_header() {
    let vhost = TestVhost::new("client-backoff");
    let pipeline = notes_pipeline(&vhost.name, NOTES_RETRY);
    provision(&pipeline, support::shared_port()).await;
    let (_conn, channel) = amqp_channel(&vhost.name).await;
    publish_note(&channel, "note-backoff-1", b"always fails").await;

    let calls: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
    let seen = calls.clone();
    let stats = consume_until(
        &vhost.name,
        pipeline.clone(),
        move |message| {
            seen.lock()
                .expect("lock")
                .push((Instant::now(), message.attempt()));
            Err(HandlerError::Retryable(format!(
                "db timeout at attempt {}",
                message.attempt()
            )))
        },
        Duration::from_secs(40),
        |s| s.dead_lettered == 1,
    )
    .await;

    let calls = calls.lock().expect("lock").clone();
    let attempts: Vec<u32> = calls.iter().map(|(_, a)| *a).collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5], "handled once per attempt");
    assert_eq!(
        (
            stats.retried,
            stats.dead_lettered,
            stats.requeued,
            stats.acked
        ),
        (4, 1, 0, 0)
    );
    for (k, (pair, expected_ms)) in calls
        .windows(2)
        .zip([1_000u64, 2_000, 4_000, 8_000])
        .enumerate()
    {
        let gap = pair[1].0.duration_since(pair[0].0).as_millis() as u64;
        println!(
            "gap after attempt {}: {gap} ms (tier {} = {expected_ms} ms)",
            k + 1,
            k + 1
        );
        assert!(
            (expected_ms * 8 / 10..=expected_ms * 12 / 10).contains(&gap),
            "gap after attempt {} was {gap} ms, tier delay {expected_ms} ms ±20 %",
            k + 1
        );
    }

    assert_eq!(depth(&channel, "notes_queue").await, 0);
    let dead = support::drain(&channel, "notes_queue_dlq").await;
    assert_eq!(dead.len(), 1, "exactly one dead letter");
    let letter = &dead[0].delivery;
    assert_eq!(letter.data, b"always fails", "body kept");
    assert_eq!(
        support::message_id(&letter.properties),
        "note-backoff-1",
        "message id kept"
    );
    assert_eq!(letter.properties.delivery_mode(), &Some(2));
    let h = letter.properties.headers().clone().expect("headers");
    assert_eq!(text(&h, headers::ERROR), "db timeout at attempt 5");
    assert_eq!(text(&h, headers::REASON), headers::REASON_EXHAUSTED);
    assert_eq!(int(&h, headers::ATTEMPTS), 5);
    assert_eq!(int(&h, headers::RETRY_COUNT), 4);
    assert_eq!(text(&h, headers::ORIGINAL_EXCHANGE), "notes");
    assert_eq!(text(&h, headers::ORIGINAL_ROUTING_KEY), "notes");
    let first = time(&h, headers::FIRST_FAILURE);
    let last = time(&h, headers::LAST_FAILURE);
    let span = last
        .duration_since(first)
        .expect("first <= last")
        .as_secs_f64();
    assert!(
        (12.0..=18.0).contains(&span),
        "first to last failure: {span} s, tiers sum to 15 s"
    );
    vhost_cleanup(_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_goes_straight_to_dlq_and_success_is_acked() {
    let vhost = TestVhost::new("client-permanent");
    let pipeline = notes_pipeline(&vhost.name, NOTES_RETRY);
    provision(&pipeline, support::shared_port()).await;
    let (conn, channel) = amqp_channel(&vhost.name).await;
    publish_note(&channel, "bad-1", b"malformed").await;
    publish_note(&channel, "good-1", b"fine").await;

    let stats = consume_until(
        &vhost.name,
        pipeline.clone(),
        |message| match message.body() {
            b"fine" => Ok(()),
            _ => Err(HandlerError::permanent("not a note")),
        },
        Duration::from_secs(15),
        |s| s.dead_lettered == 1 && s.acked == 1,
    )
    .await;
    assert_eq!((stats.acked, stats.dead_lettered, stats.retried), (1, 1, 0));
    let dead = support::drain(&channel, "notes_queue_dlq").await;
    assert_eq!(dead.len(), 1);
    let h = dead[0]
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers");
    assert_eq!(text(&h, headers::REASON), headers::REASON_PERMANENT);
    assert_eq!(int(&h, headers::ATTEMPTS), 1);
    assert_eq!(text(&h, headers::ERROR), "not a note");
    assert_eq!(depth(&channel, "notes_queue").await, 0);
    vhost_cleanup(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_broker_returns_is_never_acked_the_original_is_requeued() {
    let vhost = TestVhost::new("client-unroutable");
    let pipeline = notes_pipeline(&vhost.name, NOTES_RETRY);
    provision(&pipeline, support::shared_port()).await;
    let (conn, channel) = amqp_channel(&vhost.name).await;
    publish_note(&channel, "stuck-1", b"retry me").await;

    // A pipeline.json whose tier key has no binding: the broker returns the copy (mandatory).
    let mut config = pipeline.clone();
    for tier in &mut config.retry.tiers {
        tier.routing_key = "no-such-tier".into();
    }
    let stats = consume_until(
        &vhost.name,
        config,
        |_| Err(HandlerError::retryable("flaky dependency")),
        Duration::from_secs(10),
        |s| s.requeued >= 2,
    )
    .await;
    assert!(stats.requeued >= 2, "{stats:?}");
    assert_eq!(
        (stats.acked, stats.retried, stats.dead_lettered),
        (0, 0, 0),
        "{stats:?}"
    );
    // Not lost: still in the work queue (the operator's delivery limit would, after enough
    // requeues, dead-letter it broker-side), or already dead-lettered by that limit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = depth(&channel, "notes_queue").await + depth(&channel, "notes_queue_dlq").await;
    assert_eq!(kept, 1, "the message is still on the broker");
    vhost_cleanup(conn).await;
}

async fn vhost_cleanup(connection: lapin::Connection) {
    let _ = connection.close(200, "test done".into()).await;
}
