//! A message the consumer can never move (its retry exchange is missing from the broker) must
//! neither loop forever nor loop hot: every give-back is a `basic.reject(requeue)`, which every
//! supported RabbitMQ version counts toward the quorum work queue's `delivery-limit`, and comes
//! after a pause. The consumer reopens the confirm channel the failed publish closed and keeps
//! its connection, so only the rejects count here: with `basic.nack(requeue)` instead, RabbitMQ
//! 4.3 never dead-letters the message and this test times out (checked). Version-agnostic: run it with
//! `MSGPIPE_RABBITMQ=3.10|4.0|4.3` (the shared test node is started at that version).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use msgpipe_client::{Consumer, ConsumerOptions, HandlerError, LiveConfig, headers};
use support::{
    Retry, TestVhost, amqp_channel, amqp_uri, depth, notes_pipeline, process_cpu_time, provision,
    server_major,
};

const MAX_ATTEMPTS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_with_the_retry_exchange_missing_ends_in_dlq_after_delivery_limit_with_bounded_cpu() {
    let vhost = TestVhost::new("client-give-back");
    let pipeline = notes_pipeline(&vhost.name, Retry::attempts(MAX_ATTEMPTS));
    provision(&pipeline, support::shared_port()).await;
    let major = server_major(&support::mgmt_url());
    let (conn, channel) = amqp_channel(&vhost.name).await;
    channel
        .exchange_delete(
            pipeline.retry.exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete the retry exchange");
    let properties = lapin::BasicProperties::default()
        .with_message_id("stuck-1".into())
        .with_delivery_mode(2);
    support::publish_with(&channel, "notes", "notes", b"retry me", properties).await;

    let calls = Arc::new(AtomicU32::new(0));
    let consumer = Consumer::new(
        ConsumerOptions::new(amqp_uri(&vhost.name)),
        LiveConfig::fixed(pipeline.clone()),
    )
    .expect("consumer");
    let stop = consumer.shutdown_handle();
    let stats = consumer.stats();
    let counted = calls.clone();
    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let running = tokio::spawn(consumer.run(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        async { Err(HandlerError::retryable("flaky dependency")) }
    }));
    while depth(&channel, &pipeline.dead_letter.queue).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not dead-lettered after 90 s: {:?}, {} handler calls",
            stats.get(),
            calls.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu_before);
    stop.shutdown();
    let final_stats = running.await.expect("consumer task");
    let handler_calls = calls.load(Ordering::Relaxed);
    println!(
        "RabbitMQ {major}.x: dead-lettered after {wall:?}, {handler_calls} handler calls, \
         process CPU {cpu:?} ({:.1} % of wall), {final_stats:?}",
        cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
    );

    let letters = support::drain(&channel, &pipeline.dead_letter.queue).await;
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0].delivery;
    assert_eq!(support::message_id(&letter.properties), "stuck-1");
    let reason = letter
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(headers::BROKER_FIRST_DEATH_REASON).cloned());
    assert!(
        matches!(&reason, Some(lapin::types::AMQPValue::LongString(r)) if r.to_string() == "delivery_limit"),
        "dead-lettered by the broker's delivery limit: {reason:?}"
    );
    assert_eq!(
        depth(&channel, &pipeline.queue).await,
        0,
        "the work queue is empty"
    );
    assert_eq!(
        (
            final_stats.retried,
            final_stats.dead_lettered,
            final_stats.acked
        ),
        (0, 0, 0),
        "nothing was ever acked: {final_stats:?}"
    );
    // The delivery limit counts every give-back: no more handler calls than deliveries allowed.
    assert!(
        handler_calls <= MAX_ATTEMPTS + 1,
        "{handler_calls} handler calls for a delivery limit of {MAX_ATTEMPTS}"
    );
    // No hot loop: a spinning give-back burns a whole core for the run.
    assert!(
        cpu < Duration::from_secs(2) && cpu.as_secs_f64() < 0.25 * wall.as_secs_f64(),
        "process CPU {cpu:?} over {wall:?}"
    );
    let _ = conn.close(200, "test done".into()).await;
}
