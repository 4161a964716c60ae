//! The seed article's notes service, producer side: publishes notes to the notes pipeline with
//! the msgpipe publisher (confirms, and a durable outbox when the broker is away).
//!
//! ```text
//! cargo run -p msgpipe-client --example notes_producer -- \
//!     --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json
//! ```
//!
//! Flags (or environment): `--uri` (`MSGPIPE_BROKER_URI`), `--config` (`MSGPIPE_PIPELINE_CONFIG`),
//! `--outbox` (`MSGPIPE_OUTBOX`, default `target/notes-run/outbox.redb`), `--count` (notes to
//! send, default 6). Notes whose text contains "flaky" fail twice in the consumer, "fail" always
//! fails (dead-lettered after maxAttempts), "poison" fails permanently (dead-lettered at once).

use std::time::{Duration, Instant};

use msgpipe_client::{BasicProperties, LiveConfig, Outcome, Publisher, PublisherOptions};

const NOTES: [&str; 6] = [
    "buy milk",
    "flaky: sync lecture 3 notes",
    "call the dentist",
    "this note will fail every time",
    "poison: {not json",
    "review chapter 7",
];

struct Args {
    uri: String,
    config: String,
    outbox: String,
    count: usize,
}

fn args() -> Result<Args, String> {
    let mut parsed = Args {
        uri: std::env::var("MSGPIPE_BROKER_URI")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into()),
        config: std::env::var("MSGPIPE_PIPELINE_CONFIG")
            .unwrap_or_else(|_| "target/notes-run/pipeline.json".into()),
        outbox: std::env::var("MSGPIPE_OUTBOX")
            .unwrap_or_else(|_| "target/notes-run/outbox.redb".into()),
        count: NOTES.len(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--uri" => parsed.uri = value()?,
            "--config" => parsed.config = value()?,
            "--outbox" => parsed.outbox = value()?,
            "--count" => {
                parsed.count = value()?.parse().map_err(|e| format!("--count: {e}"))?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // lapin logs every channel the broker closes at ERROR and every returned message at
            // WARN (with its body); the client reports both itself, once per outage.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        // Colour codes only on a terminal, not in a piped or captured log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = args()?;
    let config = LiveConfig::watch(&args.config, Duration::from_secs(2)).await?;
    let pipeline = config.current();
    println!(
        "producer: pipeline {} -> exchange {:?}, routing key {:?}; outbox {}",
        pipeline.pipeline, pipeline.exchange, pipeline.routing_key, args.outbox
    );
    let publisher = Publisher::start(
        PublisherOptions::new(&args.uri, &args.outbox),
        config.clone(),
    )
    .await?;
    if publisher.outbox_len() > 0 {
        println!(
            "producer: {} notes saved by an earlier run are waiting in the outbox",
            publisher.outbox_len()
        );
    }
    for n in 0..args.count {
        let text = format!("note {}: {}", n + 1, NOTES[n % NOTES.len()]);
        let properties = BasicProperties::default().with_content_type("text/plain".into());
        match publisher.publish(text.as_bytes(), properties).await? {
            Outcome::Confirmed { message_id } => {
                println!("producer: sent   {message_id}  {text:?} (confirmed)");
            }
            Outcome::Queued { message_id } => {
                println!(
                    "producer: saved  {message_id}  {text:?} (not confirmed yet: in the outbox, resent automatically)"
                );
            }
        }
    }
    if publisher.outbox_len() > 0 {
        let features = config.features();
        println!(
            "producer: {} notes in the outbox; retry_pending={} resends every {}s",
            publisher.outbox_len(),
            features.retry_pending,
            features.retry_interval_seconds
        );
        let start = Instant::now();
        let limit = Duration::from_secs(u64::from(features.retry_interval_seconds) * 2 + 5);
        while publisher.outbox_len() > 0 && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "producer: {} notes still in the outbox (kept on disk for the next run)",
            publisher.outbox_len()
        );
    }
    println!("producer: {:?}", publisher.stats());
    publisher.close().await;
    Ok(())
}
