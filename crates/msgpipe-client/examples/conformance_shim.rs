//! The Rust shim of the msgpipe conformance kit (`conformance/SHIM.md`, kit version 1): drives
//! this crate's `Publisher` and `Consumer` from JSON commands on stdin and reports what happened
//! as JSON events on stdout. Client logs go to stderr (`RUST_LOG`, default `info,lapin=off`:
//! the kit counts the client's own log lines; lapin's internal ones are the application's to
//! filter, see `conformance/README.md`).
//!
//! ```text
//! cargo build -p msgpipe-client --example conformance_shim
//! python3 conformance/runner/run.py --lang rust
//! ```
//!
//! `MSGPIPE_SHIM_BROKEN` (`ack-before-confirm` or `nack-instead-of-reject`) swaps the client's
//! consumer for a deliberately wrong one, so the kit's self-test can prove it catches both
//! mistakes (see `broken` below). Never set it otherwise.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use msgpipe_client::{
    BasicProperties, Consumer, ConsumerOptions, HandlerError, LiveConfig, Message, Outcome,
    Publisher, PublisherOptions, ShutdownHandle,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What the handler does with one attempt (SHIM.md, "Handler outcomes").
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Ok,
    Retry,
    Permanent,
    Throw,
    Hang,
    Sleep(Duration),
}

impl Step {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "ok" => Self::Ok,
            "retry" => Self::Retry,
            "permanent" => Self::Permanent,
            "throw" => Self::Throw,
            "hang" => Self::Hang,
            other => match other.strip_prefix("sleep:").map(str::parse::<u64>) {
                Some(Ok(ms)) => Self::Sleep(Duration::from_millis(ms)),
                _ => return Err(format!("unknown handler outcome {other:?}")),
            },
        })
    }

    fn name(&self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::Retry => "retry".into(),
            Self::Permanent => "permanent".into(),
            Self::Throw => "throw".into(),
            Self::Hang => "hang".into(),
            Self::Sleep(d) => format!("sleep:{}", d.as_millis()),
        }
    }

    /// Plays the step: what the client's handler returns (`throw` panics, `hang` never returns).
    async fn play(&self) -> Result<(), HandlerError> {
        match self {
            Self::Ok => Ok(()),
            Self::Retry => Err(HandlerError::retryable("scripted retry")),
            Self::Permanent => Err(HandlerError::permanent("scripted permanent")),
            Self::Throw => panic!("scripted throw"),
            Self::Hang => std::future::pending().await,
            Self::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
        }
    }
}

/// The `consume` command's script: outcomes per message id and attempt.
#[derive(Debug, Default)]
struct Script {
    by_id: HashMap<String, Vec<Step>>,
    default: Vec<Step>,
}

impl Script {
    fn parse(command: &Value) -> Result<Self, String> {
        let steps = |value: &Value| -> Result<Vec<Step>, String> {
            let list = value.as_array().ok_or("a script entry must be a list")?;
            let steps = list
                .iter()
                .map(|s| Step::parse(s.as_str().unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()?;
            if steps.is_empty() {
                return Err("a script entry must not be empty".into());
            }
            Ok(steps)
        };
        let mut script = Self {
            default: match command.get("default") {
                Some(value) => steps(value)?,
                None => vec![Step::Ok],
            },
            ..Self::default()
        };
        if let Some(map) = command.get("script").and_then(Value::as_object) {
            for (id, value) in map {
                script.by_id.insert(id.clone(), steps(value)?);
            }
        }
        Ok(script)
    }

    /// The step for `attempt` (1-based) of `id`: past the end of its list, the last entry.
    fn step(&self, id: Option<&str>, attempt: u32) -> Step {
        let list = id
            .and_then(|id| self.by_id.get(id))
            .unwrap_or(&self.default);
        let index = (attempt.max(1) as usize - 1).min(list.len() - 1);
        list[index].clone()
    }
}

/// One event line on stdout (Rust's stdout flushes at each newline).
fn emit(event: Value) {
    println!("{event}");
}

fn error_event(message: impl std::fmt::Display) {
    emit(json!({"event": "error", "message": message.to_string()}));
}

struct Env {
    uri: String,
    config_path: PathBuf,
    state_dir: PathBuf,
    flag_poll: Duration,
    broken: Option<String>,
}

impl Env {
    fn read() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        let poll_ms = std::env::var("MSGPIPE_SHIM_FLAG_POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        Ok(Self {
            uri: var("MSGPIPE_URI")?,
            config_path: var("MSGPIPE_PIPELINE_CONFIG")?.into(),
            state_dir: var("MSGPIPE_SHIM_STATE_DIR")?.into(),
            flag_poll: Duration::from_millis(poll_ms),
            broken: std::env::var("MSGPIPE_SHIM_BROKEN")
                .ok()
                .filter(|v| !v.is_empty()),
        })
    }
}

/// The clients the commands have started so far.
struct Shim {
    env: Env,
    config: Option<LiveConfig>,
    publisher: Option<Publisher>,
    /// The consumer's task, and how to stop it gracefully (none: a broken one, aborted).
    consumer: Option<(Option<ShutdownHandle>, tokio::task::JoinHandle<()>)>,
}

impl Shim {
    async fn config(&mut self) -> Result<LiveConfig, String> {
        if let Some(config) = &self.config {
            return Ok(config.clone());
        }
        let config = LiveConfig::watch(&self.env.config_path, self.env.flag_poll)
            .await
            .map_err(|e| e.to_string())?;
        self.config = Some(config.clone());
        Ok(config)
    }

    async fn publisher(&mut self) -> Result<(Publisher, bool), String> {
        if let Some(publisher) = &self.publisher {
            return Ok((publisher.clone(), false));
        }
        let config = self.config().await?;
        let outbox = self.env.state_dir.join("outbox.redb");
        let options = PublisherOptions::new(self.env.uri.clone(), outbox);
        let publisher = Publisher::start(options, config)
            .await
            .map_err(|e| e.to_string())?;
        self.publisher = Some(publisher.clone());
        Ok((publisher, true))
    }

    async fn publish(&mut self, command: &Value) {
        let id = command
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let body = command
            .get("body")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let publisher = match self.publisher().await {
            Ok((publisher, _)) => publisher,
            Err(error) => return error_event(format!("publisher did not start: {error}")),
        };
        let mut properties = BasicProperties::default().with_message_id(id.into());
        if let Some(headers) = command.get("headers").and_then(Value::as_object) {
            let mut table = lapin::types::FieldTable::default();
            for (name, value) in headers {
                let text = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string);
                table.insert(
                    name.as_str().into(),
                    lapin::types::AMQPValue::LongString(text.into()),
                );
            }
            properties = properties.with_headers(table);
        }
        let event = match publisher.publish(body.as_bytes(), properties).await {
            Ok(Outcome::Confirmed { message_id }) => {
                json!({"event": "published", "id": message_id, "result": "confirmed"})
            }
            Ok(Outcome::Queued { message_id }) => {
                json!({"event": "published", "id": message_id, "result": "queued"})
            }
            Err(error) => json!({"event": "published", "id": id, "result": "error",
                                 "error": error.to_string()}),
        };
        emit(event);
    }

    async fn start_publisher(&mut self) {
        match self.publisher().await {
            Ok((publisher, _)) => {
                emit(json!({"event": "publisher_started", "outbox": publisher.outbox_len()}));
            }
            Err(error) => error_event(format!("publisher did not start: {error}")),
        }
    }

    async fn consume(&mut self, command: &Value) {
        if self.consumer.is_some() {
            return error_event("already consuming");
        }
        let script = match Script::parse(command) {
            Ok(script) => Arc::new(script),
            Err(error) => return error_event(error),
        };
        let config = match self.config().await {
            Ok(config) => config,
            Err(error) => return error_event(error),
        };
        if let Some(mode) = self.env.broken.clone() {
            self.consumer = Some((None, broken::consume(&self.env.uri, config, script, mode)));
            return;
        }
        let consumer = match Consumer::new(ConsumerOptions::new(self.env.uri.clone()), config) {
            Ok(consumer) => consumer,
            Err(error) => return error_event(error),
        };
        let stats = consumer.stats();
        let stop = consumer.shutdown_handle();
        let task = tokio::spawn(async move {
            consumer
                .run(move |message: Message| {
                    let step = script.step(message.message_id(), message.attempt());
                    emit(json!({
                        "event": "delivery",
                        "id": message.message_id(),
                        "attempt": message.attempt(),
                        "redelivered": message.redelivered(),
                        "outcome": step.name(),
                    }));
                    async move { step.play().await }
                })
                .await;
        });
        // `connections` counts sessions whose basic.consume the broker answered.
        while stats.get().connections == 0 && !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        emit(json!({"event": "consuming"}));
        self.consumer = Some((Some(stop), task));
    }

    async fn stop(&mut self) {
        match self.consumer.take() {
            Some((Some(stop), task)) => {
                stop.shutdown();
                let _ = task.await;
            }
            Some((None, task)) => task.abort(),
            None => {}
        }
        if let Some(publisher) = self.publisher.take() {
            publisher.close().await;
        }
        emit(json!({"event": "stopped"}));
    }
}

/// Commands from stdin, one JSON object per line, read on a thread of their own.
fn commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off")),
        )
        .init();
    let env = match Env::read() {
        Ok(env) => env,
        Err(error) => {
            error_event(error);
            std::process::exit(2);
        }
    };
    let mut shim = Shim {
        env,
        config: None,
        publisher: None,
        consumer: None,
    };
    let mut lines = commands();
    emit(json!({"event": "ready"}));
    while let Some(line) = lines.recv().await {
        if line.trim().is_empty() {
            continue;
        }
        let command: Value = match serde_json::from_str(&line) {
            Ok(command) => command,
            Err(error) => {
                error_event(format!("not a JSON command: {error}"));
                continue;
            }
        };
        match command.get("op").and_then(Value::as_str) {
            Some("publish") => shim.publish(&command).await,
            Some("start_publisher") => shim.start_publisher().await,
            Some("consume") => shim.consume(&command).await,
            Some("stop") => break,
            other => error_event(format!("unknown op {other:?}")),
        }
    }
    // `stop`, or stdin closed: shut down gracefully either way.
    shim.stop().await;
}

/// Deliberately wrong consumers for the kit's self-test, straight on lapin (the client itself
/// has no way to misbehave like this). Minimal: they only need to be wrong in one place.
mod broken {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Confirmation, Connection, ConnectionProperties};
    use msgpipe_client::{LiveConfig, headers};
    use serde_json::json;

    use super::{Script, emit, error_event};

    /// `ack-before-confirm`: acks a failed message, then publishes its copy (lost if the copy
    /// is refused). `nack-instead-of-reject`: gives a refused message back with
    /// `basic.nack(requeue)`, which RabbitMQ 4.3 does not count toward `delivery-limit`.
    pub fn consume(
        uri: &str,
        config: LiveConfig,
        script: Arc<Script>,
        mode: String,
    ) -> tokio::task::JoinHandle<()> {
        tracing::warn!(%mode, "BROKEN consumer (conformance self-test only)");
        let uri = uri.to_string();
        tokio::spawn(async move {
            if let Err(error) = run(&uri, config, script, &mode).await {
                error_event(format!("broken consumer: {error}"));
            }
        })
    }

    async fn run(
        uri: &str,
        config: LiveConfig,
        script: Arc<Script>,
        mode: &str,
    ) -> Result<(), lapin::Error> {
        let connection = Connection::connect(uri, ConnectionProperties::default()).await?;
        let consume = connection.create_channel().await?;
        consume.basic_qos(16, BasicQosOptions::default()).await?;
        let mut publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = config.current().queue.clone();
        let mut deliveries = consume
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        emit(json!({"event": "consuming"}));
        let mut pause = Duration::from_millis(500);
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let pipeline = config.current();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string());
            let retries = match delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(headers::RETRY_COUNT))
            {
                Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            let attempt = retries + 1;
            let step = script.step(id.as_deref(), attempt);
            emit(json!({"event": "delivery", "id": id, "attempt": attempt,
                        "redelivered": delivery.redelivered, "outcome": step.name()}));
            let failed = std::panic::AssertUnwindSafe(step.play());
            let failed = futures_util::FutureExt::catch_unwind(failed)
                .await
                .map_or(true, |r| r.is_err());
            if !failed {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                continue;
            }
            let (exchange, routing_key) = match pipeline.tier_for_attempt(attempt) {
                Some(tier) if step != super::Step::Permanent => {
                    (pipeline.retry.exchange.clone(), tier.routing_key.clone())
                }
                _ => (
                    pipeline.dead_letter.exchange.clone(),
                    delivery.routing_key.to_string(),
                ),
            };
            let mut table = delivery.properties.headers().clone().unwrap_or_default();
            table.insert(
                headers::RETRY_COUNT.into(),
                AMQPValue::LongLongInt(attempt.into()),
            );
            let properties = delivery.properties.clone().with_headers(table);
            if mode == "ack-before-confirm" {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            if !publish.status().connected() {
                publish = connection.create_channel().await?;
                publish
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let sent = publish
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    options,
                    &delivery.data,
                    properties,
                )
                .await;
            let confirmed = match sent {
                Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(None))),
                Err(_) => false,
            };
            if mode == "ack-before-confirm" {
                continue;
            }
            if confirmed {
                pause = Duration::from_millis(500);
                delivery.acker.ack(BasicAckOptions::default()).await?;
            } else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                delivery.acker.nack(requeue).await?;
            }
        }
        Ok(())
    }
}
