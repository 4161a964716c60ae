//! The client consumer's connection handling against a real broker: it reconnects by itself
//! after outages longer than lapin's own auto-recovery survives, and a graceful shutdown
//! finishes the handlers in flight and leaves everything else queued.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msgpipe_client::{Backoff, Consumer, ConsumerOptions, HandlerError, LiveConfig};
use support::{
    Proxy, Retry, TestVhost, amqp_channel, amqp_uri, depth, encode, notes_pipeline, provision,
};

const RETRY: Retry = Retry {
    max_attempts: 3,
    initial_ms: 100,
    max_ms: 1_000,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_reconnects_after_repeated_outages_and_loses_nothing() {
    const MESSAGES: usize = 3_000;
    let vhost = TestVhost::new("client-reconnect");
    let pipeline = notes_pipeline(&vhost.name, RETRY);
    provision(&pipeline, support::shared_port()).await;
    let (conn, channel) = amqp_channel(&vhost.name).await;
    let ids: Vec<String> = (0..MESSAGES).map(|i| format!("r-{i:04}")).collect();
    support::publish_ids(&channel, "notes", "notes", &ids).await;

    let proxy = Proxy::start(format!("127.0.0.1:{}", support::shared_port()));
    proxy.set_up(true);
    let mut options = ConsumerOptions::new(format!(
        "amqp://guest:guest@127.0.0.1:{}/{}",
        proxy.port,
        encode(&vhost.name)
    ));
    options.prefetch = 20;
    options.concurrency = 8;
    options.connect_timeout = Duration::from_secs(2);
    options.reconnect = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let consumer = Consumer::new(options, LiveConfig::fixed(pipeline.clone())).expect("consumer");
    let stop = consumer.shutdown_handle();
    let stats = consumer.stats();
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = handled.clone();
    let running = tokio::spawn(consumer.run(move |message| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let id = message.message_id().unwrap_or_default().to_string();
            seen.lock().expect("lock").push(id);
            Ok::<(), HandlerError>(())
        }
    }));

    let started = Instant::now();
    let count = || handled.lock().expect("lock").len();
    // Two outages of 4 s each (lapin 4.12's auto-recovery gives up on an outage this long).
    for threshold in [500, 1_500] {
        while count() < threshold {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "stuck before {threshold}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.set_up(false);
        tokio::time::sleep(Duration::from_secs(4)).await;
        proxy.set_up(true);
    }
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    loop {
        let distinct: BTreeSet<String> = handled.lock().expect("lock").iter().cloned().collect();
        if distinct == all {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {MESSAGES} handled",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.shutdown();
    let final_stats = running.await.expect("consumer task");
    let handled = handled.lock().expect("lock").len();
    println!(
        "{MESSAGES} messages, 2 outages of 4 s: handled {handled} times ({} redelivered duplicates), {:?}, {:?}",
        handled - MESSAGES,
        final_stats,
        started.elapsed()
    );
    assert!(
        stats.get().connections >= 3,
        "reconnected after each outage"
    );
    assert_eq!(depth(&channel, "notes_queue").await, 0, "everything acked");
    let _ = conn.close(200, "test done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_handlers_and_leaves_the_rest_queued() {
    let vhost = TestVhost::new("client-shutdown");
    let pipeline = notes_pipeline(&vhost.name, RETRY);
    provision(&pipeline, support::shared_port()).await;
    let (conn, channel) = amqp_channel(&vhost.name).await;
    let ids: Vec<String> = (0..20).map(|i| format!("s-{i:02}")).collect();
    support::publish_ids(&channel, "notes", "notes", &ids).await;

    let mut options = ConsumerOptions::new(amqp_uri(&vhost.name));
    options.prefetch = 4;
    options.concurrency = 4;
    let consumer = Consumer::new(options, LiveConfig::fixed(pipeline.clone())).expect("consumer");
    let stop = consumer.shutdown_handle();
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let (s, f) = (started.clone(), finished.clone());
    let running = tokio::spawn(consumer.run(move |_message| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(800)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    }));
    let begin = Instant::now();
    while started.load(Ordering::SeqCst) < 4 {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "handlers never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.shutdown();
    let stats = running.await.expect("consumer task");
    assert_eq!(
        started.load(Ordering::SeqCst),
        4,
        "no handler started after shutdown"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        4,
        "run returned after its handlers finished"
    );
    assert_eq!(stats.acked, 4, "{stats:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        depth(&channel, "notes_queue").await,
        16,
        "the rest is still queued"
    );
    let _ = conn.close(200, "test done".into()).await;
}
