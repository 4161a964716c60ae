//! The seed article's notes service, consumer side: a handler that saves notes, with the
//! msgpipe retry protocol around it. It prints every attempt, the backoff delay each retried
//! note actually waited, and what gets dead-lettered.
//!
//! ```text
//! cargo run -p msgpipe-client --example notes_consumer -- \
//!     --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json
//! ```
//!
//! The handler: a note containing "flaky" fails on its first two attempts, "fail" fails every
//! time (the consumer dead-letters it after maxAttempts), "poison" fails permanently (straight
//! to the DLQ); anything else is saved. Flags (or environment): `--uri` (`MSGPIPE_BROKER_URI`),
//! `--config` (`MSGPIPE_PIPELINE_CONFIG`), `--idle-exit SECONDS` (stop after this long without
//! a message; default: the longest retry delay + 5 s; 0 = run until Ctrl-C).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use msgpipe_client::{
    Consumer, ConsumerOptions, Destination, HandlerError, LiveConfig, Message, headers,
};

struct Args {
    uri: String,
    config: String,
    idle_exit: Option<u64>,
}

fn args() -> Result<Args, String> {
    let mut parsed = Args {
        uri: std::env::var("MSGPIPE_BROKER_URI")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into()),
        config: std::env::var("MSGPIPE_PIPELINE_CONFIG")
            .unwrap_or_else(|_| "target/notes-run/pipeline.json".into()),
        idle_exit: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--uri" => parsed.uri = value()?,
            "--config" => parsed.config = value()?,
            "--idle-exit" => {
                let seconds = value()?.parse().map_err(|e| format!("--idle-exit: {e}"))?;
                parsed.idle_exit = Some(seconds);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(parsed)
}

/// The notes service's own work: save the note (here: decide by its text).
fn save_note(text: &str, attempt: u32) -> Result<(), HandlerError> {
    if text.contains("poison") {
        return Err(HandlerError::permanent("cannot parse the note"));
    }
    if text.contains("fail") {
        return Err(HandlerError::retryable("notes database refused the write"));
    }
    if text.contains("flaky") && attempt <= 2 {
        return Err(HandlerError::retryable("sync service timed out"));
    }
    Ok(())
}

/// What the consumer will do with a failure, for the printout.
fn next_step(message: &Message, error: &HandlerError) -> String {
    match message.failure_destination(error) {
        Destination::Retry { tier, delay, .. } => {
            format!("retry tier {tier} in {:.1}s", delay.as_secs_f64())
        }
        Destination::DeadLetter { reason, .. } => format!("DEAD-LETTERED ({reason})"),
    }
}

/// How long the message waited since its last failure (the backoff actually seen).
fn waited(message: &Message) -> String {
    let last = message.header_time(headers::LAST_FAILURE);
    match last.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        Some(wait) => format!(", waited {:.2}s since the last failure", wait.as_secs_f64()),
        None => String::new(),
    }
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
    let longest = pipeline
        .retry
        .tiers
        .iter()
        .map(|t| t.delay_ms)
        .max()
        .unwrap_or(0);
    let idle_exit = args.idle_exit.unwrap_or(longest / 1000 + 5);
    println!(
        "consumer: queue {:?}, {} attempts, tiers {:?} ms, DLQ {:?}",
        pipeline.queue,
        pipeline.max_attempts,
        pipeline
            .retry
            .tiers
            .iter()
            .map(|t| t.delay_ms)
            .collect::<Vec<_>>(),
        pipeline.dead_letter.queue
    );
    let consumer = Consumer::new(ConsumerOptions::new(&args.uri), config)?;
    let stop = consumer.shutdown_handle();
    let last_activity = Arc::new(Mutex::new(Instant::now()));

    let watchdog_activity = last_activity.clone();
    let watchdog_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let idle = watchdog_activity
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if idle_exit > 0 && idle > Duration::from_secs(idle_exit) {
                println!("consumer: no message for {idle_exit}s, stopping");
                break;
            }
        }
        watchdog_stop.shutdown();
    });

    let final_stats = consumer
        .run(move |message: Message| {
            let last_activity = last_activity.clone();
            async move {
                if let Ok(mut t) = last_activity.lock() {
                    *t = Instant::now();
                }
                let text = String::from_utf8_lossy(message.body()).to_string();
                let id = message.message_id().unwrap_or("?").to_string();
                let attempt = format!("attempt {}/{}", message.attempt(), message.max_attempts());
                let result = save_note(&text, message.attempt());
                match &result {
                    Ok(()) => println!(
                        "consumer: {id} {attempt} {text:?}: saved{}",
                        waited(&message)
                    ),
                    Err(error) => println!(
                        "consumer: {id} {attempt} {text:?}: failed ({error}){} -> {}",
                        waited(&message),
                        next_step(&message, error)
                    ),
                }
                result
            }
        })
        .await;
    println!(
        "consumer: saved {}, retried {}, dead-lettered {}, requeued {}",
        final_stats.acked, final_stats.retried, final_stats.dead_lettered, final_stats.requeued
    );
    Ok(())
}
