//! The publisher against a running broker (shared test node, a vhost per test).

mod support;

use std::time::Instant;

use msgpipe_client::{BasicProperties, LiveConfig, Outcome, Publisher, PublisherOptions};
use support::{Retry, TestVhost, amqp_channel, amqp_uri, depth, notes_pipeline, provision};

const STARTS: usize = 50;
const PUBLISHES: usize = 100;

/// `make run` once printed "broker unavailable; in the outbox" for every note although the
/// broker was up: the first link was handed to a background task, so the first publish raced
/// it. Start-up must return with the link usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_hundred_publishes_after_start_are_confirmed_fifty_starts_in_a_row() {
    let vhost = TestVhost::new("client-first-publish");
    let pipeline = notes_pipeline(&vhost.name, Retry::attempts(3));
    provision(&pipeline, support::shared_port()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    for run in 0..STARTS {
        let options = PublisherOptions::new(
            amqp_uri(&vhost.name),
            dir.path().join(format!("outbox-{run}.redb")),
        );
        let publisher = Publisher::start(options, LiveConfig::fixed(pipeline.clone()))
            .await
            .expect("start");
        for n in 0..PUBLISHES {
            let id = format!("r{run:02}-{n:03}");
            let properties = BasicProperties::default().with_message_id(id.as_str().into());
            let outcome = publisher
                .publish(id.as_bytes(), properties)
                .await
                .expect("publish");
            assert_eq!(
                outcome,
                Outcome::Confirmed { message_id: id },
                "run {run}, publish {n}: {:?}",
                publisher.stats()
            );
        }
        assert_eq!(publisher.outbox_len(), 0);
        publisher.close().await;
    }
    let (conn, channel) = amqp_channel(&vhost.name).await;
    assert_eq!(
        depth(&channel, &pipeline.queue).await as usize,
        STARTS * PUBLISHES
    );
    println!(
        "{STARTS} starts x {PUBLISHES} publishes, all confirmed, in {:?}",
        started.elapsed()
    );
    let _ = conn.close(200, "test done".into()).await;
}
