//! Benchmark of the client library against raw lapin, measured in the same run on the same
//! broker (`make bench-client`):
//!
//! 1. consume + ack: raw lapin loop vs [`Consumer`] with a handler that succeeds;
//! 2. retry path: raw lapin (consume, confirmed mandatory publish to a retry tier, ack; the same
//!    handler concurrency as the Consumer) vs [`Consumer`] with a handler that fails;
//! 3. publish with confirms: raw lapin (C tasks, each publish then await its confirm, message
//!    id and persistence set) vs [`Publisher`] (outbox enabled, broker up) with the same C tasks;
//! 4. publish with the broker down: raw redb commits of the outbox's encoded message size in the
//!    same directory (the better of one commit per message from C threads and commits of C
//!    messages from one thread) vs [`Publisher`] appending to its outbox (fsync) with C tasks;
//! 5. drain on reconnect: raw confirmed publish (the better of C tasks publishing and awaiting
//!    each confirm, and pipelined batches of 256 on one channel) vs [`Publisher`] started on the
//!    broker with an outbox of the same number of messages (resend jitter 0), timed from start
//!    to an empty outbox.
//!
//! Each pair runs `BENCH_ROUNDS` times alternating; the medians of the rates and of the
//! per-round ratios are reported. `BENCH_ONLY=broker-down,drain` runs only the rows named.
//!
//! ```text
//! scripts/test-broker.sh ensure
//! cargo run --release -p msgpipe-client --example bench_client
//! ```
//!
//! Environment: `MSGPIPE_BENCH_URI` (default the test broker, vhost `/`), `BENCH_MESSAGES`
//! (default 20000), `BENCH_ROUNDS` (default 3), `BENCH_DIR` (where outbox and redb files go;
//! default `target/bench-client`, on the project's disk). Queues are quorum queues named
//! `msgpipe-bench-<pid>*`, deleted at the end.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use msgpipe_client::config::{DeadLetterTopology, Features, RetryTierConfig, RetryTopology};
use msgpipe_client::{
    Consumer, ConsumerOptions, HandlerError, LiveConfig, OutboxLimits, Outcome, PipelineConfig,
    Publisher, PublisherOptions,
};
use tokio::sync::Semaphore;

const PREFETCH: u16 = 64;
const CONCURRENCY: usize = 16;
const PUBLISHERS: usize = 16;
/// Nothing listens here: a publisher pointed at it starts offline and queues everything.
const BROKER_DOWN_URI: &str = "amqp://guest:guest@127.0.0.1:1/%2f";
const RESEND_BATCH: usize = 256;
const RAW_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raw");

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Bench {
    uri: String,
    messages: usize,
    config: PipelineConfig,
    admin: Channel,
    _admin_connection: Connection,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let uri = std::env::var("MSGPIPE_BENCH_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into());
    let messages = env_number("BENCH_MESSAGES", 20_000);
    let rounds = env_number("BENCH_ROUNDS", 3);
    let bench = Bench::setup(uri, messages).await?;
    println!(
        "msgpipe-client benchmark: {messages} messages per run, {rounds} rounds (median), quorum queues, \
         prefetch {PREFETCH}, {CONCURRENCY} handlers, {PUBLISHERS} publishing tasks"
    );
    let result = run_all(&bench, rounds).await;
    if let Err(error) = bench.teardown().await {
        eprintln!("cleanup failed (delete msgpipe-bench-* queues by hand): {error}");
    }
    result
}

/// Whether the row `name` runs: all rows unless `BENCH_ONLY` (comma-separated names: consume,
/// retry, publish, broker-down, drain) says otherwise.
fn selected(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|n| n.trim() == name))
}

/// One result row: path, baseline name and rate, library name and rate, paired ratio, target.
type Row = (&'static str, &'static str, f64, &'static str, f64, f64, f64);

async fn run_all(bench: &Bench, rounds: usize) -> Result<(), Error> {
    let mut rows: Vec<Row> = Vec::new();
    if selected("consume") {
        let (raw, lib, ratio) =
            pair(rounds, || bench.raw_consume_ack(), || bench.consumer_ack()).await?;
        rows.push((
            "consume + ack",
            "raw lapin consume+ack",
            raw,
            "Consumer, handler Ok",
            lib,
            ratio,
            0.9,
        ));
    }
    if selected("retry") {
        let (raw, lib, ratio) =
            pair(rounds, || bench.raw_retry(), || bench.consumer_retry()).await?;
        rows.push((
            "retry path",
            "raw consume+confirmed publish+ack",
            raw,
            "Consumer, handler Err(Retryable)",
            lib,
            ratio,
            0.9,
        ));
    }
    if selected("publish") {
        let (raw, lib, ratio) = pair(rounds, || bench.raw_publish(), || bench.publisher()).await?;
        rows.push((
            "publish",
            "raw lapin publish+confirm",
            raw,
            "Publisher (outbox on)",
            lib,
            ratio,
            0.7,
        ));
    }
    if selected("broker-down") {
        let size = bench.outbox_entry_size().await?;
        println!("  (outbox entry: {size} bytes encoded; raw redb values of the same size)");
        let (raw, lib, ratio) = pair(
            rounds,
            || bench.raw_redb_commits(size),
            || bench.outbox_append(),
        )
        .await?;
        rows.push((
            "broker down",
            "raw redb commits (fsync), same size",
            raw,
            "Publisher -> outbox (fsync)",
            lib,
            ratio,
            0.8,
        ));
    }
    if selected("drain") {
        let (raw, lib, ratio) = pair(rounds, || bench.raw_publish_best(), || bench.drain()).await?;
        rows.push((
            "drain",
            "raw lapin publish+confirm",
            raw,
            "Publisher drains outbox on connect",
            lib,
            ratio,
            0.7,
        ));
    }
    println!();
    println!(
        "msg/s are medians over the rounds; ratio is the median of the per-round ratios (each"
    );
    println!("round runs baseline and library back to back, so a busy machine slows both alike).");
    println!(
        "{:<14} {:<36} {:>10}   {:<34} {:>10}   {:>6}  {:>6}",
        "path", "baseline", "msg/s", "msgpipe-client", "msg/s", "ratio", "target"
    );
    for (path, base_name, base, lib_name, lib, ratio, target) in rows {
        println!(
            "{path:<14} {base_name:<36} {base:>10.0}   {lib_name:<34} {lib:>10.0}   {ratio:>6.2}  {:>5.2}{}",
            target,
            if ratio >= target {
                ""
            } else {
                "  BELOW TARGET"
            }
        );
    }
    Ok(())
}

/// Runs baseline and library alternately `rounds` times; returns the median rates.
async fn pair<A, B, FA, FB>(rounds: usize, mut raw: A, mut lib: B) -> Result<(f64, f64, f64), Error>
where
    A: FnMut() -> FA,
    B: FnMut() -> FB,
    FA: Future<Output = Result<f64, Error>>,
    FB: Future<Output = Result<f64, Error>>,
{
    let (mut raws, mut libs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let r = raw().await?;
        let l = lib().await?;
        println!(
            "  round {round}: baseline {r:>8.0} msg/s   msgpipe-client {l:>8.0} msg/s   ratio {:.2}",
            l / r
        );
        raws.push(r);
        libs.push(l);
        ratios.push(l / r);
    }
    Ok((median(raws), median(libs), median(ratios)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn bench_dir() -> Result<PathBuf, Error> {
    let dir = std::env::var_os("BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench-client"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn unlimited() -> OutboxLimits {
    OutboxLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
    }
}

fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}

fn note_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
}

async fn connect(uri: &str) -> Result<Connection, Error> {
    Ok(Connection::connect(uri, ConnectionProperties::default()).await?)
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn confirm_ok(confirm: lapin::PublisherConfirm) -> Result<(), Error> {
    let confirmation = confirm.await?;
    if confirmation.is_ack() && confirmation.take_message().is_none() {
        Ok(())
    } else {
        Err("publish not confirmed".into())
    }
}

impl Bench {
    async fn setup(uri: String, messages: usize) -> Result<Self, Error> {
        let prefix = format!("msgpipe-bench-{}", std::process::id());
        let config = PipelineConfig {
            version: msgpipe_client::config::CONFIG_VERSION,
            pipeline: "bench/bench".into(),
            vhost: "/".into(),
            exchange: format!("{prefix}.work"),
            routing_key: "work".into(),
            queue: prefix.clone(),
            max_attempts: 5,
            retry: RetryTopology {
                exchange: format!("{prefix}.retry"),
                tiers: vec![RetryTierConfig {
                    index: 1,
                    routing_key: "1".into(),
                    queue: format!("{prefix}.retry.1"),
                    delay_ms: 3_600_000,
                    first_attempt: 1,
                    last_attempt: 4,
                }],
            },
            dead_letter: DeadLetterTopology {
                exchange: format!("{prefix}.dlx"),
                queue: format!("{prefix}.dlq"),
            },
            features: Features {
                retry_pending: true,
                retry_interval_seconds: 1,
            },
        };
        let connection = connect(&uri).await?;
        let admin = confirm_channel(&connection).await?;
        let quorum = {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            args
        };
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (ex, queue, key) in [
            (&config.exchange, &config.queue, "work"),
            (&config.retry.exchange, &config.retry.tiers[0].queue, "1"),
            (&config.dead_letter.exchange, &config.dead_letter.queue, "#"),
        ] {
            let kind = if key == "#" {
                ExchangeKind::Fanout
            } else {
                ExchangeKind::Direct
            };
            admin
                .exchange_declare(ex.as_str().into(), kind, exchange, FieldTable::default())
                .await?;
            admin
                .queue_declare(queue.as_str().into(), durable, quorum.clone())
                .await?;
            admin
                .queue_bind(
                    queue.as_str().into(),
                    ex.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(Self {
            uri,
            messages,
            config,
            admin,
            _admin_connection: connection,
        })
    }

    async fn teardown(&self) -> Result<(), Error> {
        let queues = [
            &self.config.queue,
            &self.config.retry.tiers[0].queue,
            &self.config.dead_letter.queue,
        ];
        for queue in queues {
            self.admin
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [
            &self.config.exchange,
            &self.config.retry.exchange,
            &self.config.dead_letter.exchange,
        ] {
            self.admin
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await?;
        }
        Ok(())
    }

    async fn purge(&self) -> Result<(), Error> {
        for queue in [&self.config.queue, &self.config.retry.tiers[0].queue] {
            self.admin
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Fills the work queue with `messages` messages (pipelined, confirmed).
    async fn preload(&self) -> Result<(), Error> {
        self.purge().await?;
        let body = vec![b'n'; 200];
        for chunk in (0..self.messages).collect::<Vec<_>>().chunks(1_000) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for _ in chunk {
                confirms.push(
                    self.admin
                        .basic_publish(
                            self.config.exchange.as_str().into(),
                            "work".into(),
                            BasicPublishOptions::default(),
                            &body,
                            note_properties(),
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                confirm_ok(confirm).await?;
            }
        }
        Ok(())
    }

    async fn raw_consume(&self, connection: &Connection) -> Result<lapin::Consumer, Error> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        Ok(channel
            .basic_consume(
                self.config.queue.as_str().into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// The better of two raw loops: ack awaited in the loop, and acks spawned with the same
    /// concurrency bound as the Consumer.
    async fn raw_consume_ack(&self) -> Result<f64, Error> {
        let sequential = self.raw_consume_ack_sequential().await?;
        let concurrent = self.raw_consume_ack_concurrent().await?;
        println!(
            "  (raw consume+ack: sequential {sequential:.0} msg/s, {CONCURRENCY} concurrent {concurrent:.0} msg/s; baseline = the better)"
        );
        Ok(sequential.max(concurrent))
    }

    async fn raw_consume_ack_sequential(&self) -> Result<f64, Error> {
        self.preload().await?;
        let start = Instant::now();
        let connection = connect(&self.uri).await?;
        let mut deliveries = self.raw_consume(&connection).await?;
        for _ in 0..self.messages {
            let delivery = deliveries.next().await.ok_or("consumer ended")??;
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        let elapsed = start.elapsed();
        let _ = connection.close(200, "done".into()).await;
        Ok(rate(self.messages, elapsed))
    }

    async fn raw_consume_ack_concurrent(&self) -> Result<f64, Error> {
        self.preload().await?;
        let start = Instant::now();
        let connection = connect(&self.uri).await?;
        let mut deliveries = self.raw_consume(&connection).await?;
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        for _ in 0..self.messages {
            let slot = slots.clone().acquire_owned().await?;
            let delivery = deliveries.next().await.ok_or("consumer ended")??;
            tokio::spawn(async move {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                drop(slot);
            });
        }
        drop(slots.acquire_many(u32::try_from(CONCURRENCY)?).await?);
        let elapsed = start.elapsed();
        let _ = connection.close(200, "done".into()).await;
        Ok(rate(self.messages, elapsed))
    }

    async fn raw_retry(&self) -> Result<f64, Error> {
        self.preload().await?;
        let start = Instant::now();
        let connection = connect(&self.uri).await?;
        let publish = confirm_channel(&connection).await?;
        let mut deliveries = self.raw_consume(&connection).await?;
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let exchange = self.config.retry.exchange.clone();
        for _ in 0..self.messages {
            let slot = slots.clone().acquire_owned().await?;
            let delivery = deliveries.next().await.ok_or("consumer ended")??;
            let (publish, exchange) = (publish.clone(), exchange.clone());
            tokio::spawn(async move {
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let sent = publish
                    .basic_publish(
                        exchange.as_str().into(),
                        "1".into(),
                        options,
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await;
                if let Ok(confirm) = sent
                    && confirm_ok(confirm).await.is_ok()
                {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                drop(slot);
            });
        }
        let all = u32::try_from(CONCURRENCY)?;
        drop(slots.acquire_many(all).await?);
        let elapsed = start.elapsed();
        let _ = connection.close(200, "done".into()).await;
        Ok(rate(self.messages, elapsed))
    }

    async fn run_consumer(
        &self,
        fail: bool,
        done: impl Fn(&msgpipe_client::ConsumerStats) -> bool,
    ) -> Result<f64, Error> {
        self.preload().await?;
        let mut options = ConsumerOptions::new(&self.uri);
        options.prefetch = PREFETCH;
        options.concurrency = CONCURRENCY;
        let start = Instant::now();
        let consumer = Consumer::new(options, LiveConfig::fixed(self.config.clone()))?;
        let stats = consumer.stats();
        let stop = consumer.shutdown_handle();
        let running = tokio::spawn(consumer.run(move |_message| async move {
            if fail {
                Err(HandlerError::Retryable("bench".into()))
            } else {
                Ok(())
            }
        }));
        while !done(&stats.get()) {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let elapsed = start.elapsed();
        stop.shutdown();
        running.await?;
        Ok(rate(self.messages, elapsed))
    }

    async fn consumer_ack(&self) -> Result<f64, Error> {
        let n = self.messages as u64;
        self.run_consumer(false, |s| s.acked >= n).await
    }

    async fn consumer_retry(&self) -> Result<f64, Error> {
        let n = self.messages as u64;
        self.run_consumer(true, |s| s.retried >= n).await
    }

    /// `PUBLISHERS` tasks share the messages; each publishes and awaits its confirm.
    async fn publish_with<F, Fut>(&self, publish_one: F) -> Result<f64, Error>
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<(), Error>> + Send,
    {
        let per_task = self.messages / PUBLISHERS;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..PUBLISHERS {
            let publish_one = publish_one.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    publish_one().await?;
                }
                Ok::<_, Error>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(rate(per_task * PUBLISHERS, start.elapsed()))
    }

    async fn raw_publish(&self) -> Result<f64, Error> {
        self.purge().await?;
        let connection = connect(&self.uri).await?;
        let channel = confirm_channel(&connection).await?;
        let exchange = self.config.exchange.clone();
        let body: Arc<[u8]> = vec![b'n'; 200].into();
        let rate = self
            .publish_with(move || {
                let (channel, exchange, body) = (channel.clone(), exchange.clone(), body.clone());
                async move {
                    let options = BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    };
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "work".into(),
                            options,
                            &body,
                            note_properties(),
                        )
                        .await?;
                    confirm_ok(confirm).await
                }
            })
            .await?;
        let _ = connection.close(200, "done".into()).await;
        Ok(rate)
    }

    async fn publisher(&self) -> Result<f64, Error> {
        self.purge().await?;
        let dir = tempfile::tempdir()?;
        let options = PublisherOptions::new(&self.uri, dir.path().join("outbox.redb"));
        let publisher = Publisher::start(options, LiveConfig::fixed(self.config.clone())).await?;
        let body: Arc<[u8]> = vec![b'n'; 200].into();
        let p = publisher.clone();
        let rate = self
            .publish_with(move || {
                let (publisher, body) = (p.clone(), body.clone());
                async move {
                    match publisher.publish(&body, BasicProperties::default()).await? {
                        msgpipe_client::Outcome::Confirmed { .. } => Ok(()),
                        msgpipe_client::Outcome::Queued { .. } => {
                            Err("queued: the broker did not confirm".into())
                        }
                    }
                }
            })
            .await?;
        publisher.close().await;
        Ok(rate)
    }

    /// A publisher with the broker down (starts offline).
    async fn offline_publisher(&self, outbox: &Path) -> Result<Publisher, Error> {
        let mut options = PublisherOptions::new(BROKER_DOWN_URI, outbox);
        options.outbox_limits = unlimited();
        options.connect_timeout = Duration::from_millis(500);
        Ok(Publisher::start(options, LiveConfig::fixed(self.config.clone())).await?)
    }

    /// The outbox's encoded size of one bench message (body, properties, route).
    async fn outbox_entry_size(&self) -> Result<usize, Error> {
        let dir = tempfile::tempdir_in(bench_dir()?)?;
        let publisher = self
            .offline_publisher(&dir.path().join("size.redb"))
            .await?;
        let outcome = publisher
            .publish(&[b'n'; 200], BasicProperties::default())
            .await?;
        if !matches!(outcome, Outcome::Queued { .. }) {
            return Err("the broker-down publisher reached a broker".into());
        }
        let size = publisher.stats().outbox_bytes;
        publisher.close().await;
        Ok(usize::try_from(size)?)
    }

    /// `PUBLISHERS` tasks publish with the broker down: every message is appended (fsync).
    async fn queue_all(&self, publisher: &Publisher) -> Result<f64, Error> {
        let body: Arc<[u8]> = vec![b'n'; 200].into();
        let p = publisher.clone();
        self.publish_with(move || {
            let (publisher, body) = (p.clone(), body.clone());
            async move {
                match publisher.publish(&body, BasicProperties::default()).await? {
                    Outcome::Queued { .. } => Ok(()),
                    Outcome::Confirmed { .. } => Err("confirmed with the broker down".into()),
                }
            }
        })
        .await
    }

    async fn outbox_append(&self) -> Result<f64, Error> {
        let dir = tempfile::tempdir_in(bench_dir()?)?;
        let publisher = self
            .offline_publisher(&dir.path().join("outbox.redb"))
            .await?;
        let rate = self.queue_all(&publisher).await?;
        publisher.close().await;
        Ok(rate)
    }

    /// The better of: one redb write transaction (fsync) per message from `PUBLISHERS` threads,
    /// and transactions of `PUBLISHERS` messages from one thread.
    async fn raw_redb_commits(&self, size: usize) -> Result<f64, Error> {
        let messages = self.messages;
        let (each, grouped) = tokio::task::spawn_blocking(move || {
            let each = raw_redb_each(messages, size)?;
            let grouped = raw_redb_grouped(messages, size)?;
            Ok::<_, Error>((each, grouped))
        })
        .await??;
        println!(
            "  (raw redb: a commit per message from {PUBLISHERS} threads {each:.0} msg/s, \
             commits of {PUBLISHERS} from one thread {grouped:.0} msg/s; baseline = the better)"
        );
        Ok(each.max(grouped))
    }

    async fn raw_publish_best(&self) -> Result<f64, Error> {
        let tasks = self.raw_publish().await?;
        let pipelined = self.raw_publish_pipelined().await?;
        println!(
            "  (raw publish: {PUBLISHERS} tasks {tasks:.0} msg/s, pipelined batches of \
             {RESEND_BATCH} {pipelined:.0} msg/s; baseline = the better)"
        );
        Ok(tasks.max(pipelined))
    }

    /// Batches of `RESEND_BATCH` publishes on one channel, then their confirms.
    async fn raw_publish_pipelined(&self) -> Result<f64, Error> {
        self.purge().await?;
        let connection = connect(&self.uri).await?;
        let channel = confirm_channel(&connection).await?;
        let body = vec![b'n'; 200];
        let start = Instant::now();
        let mut left = self.messages;
        while left > 0 {
            let batch = left.min(RESEND_BATCH);
            let mut confirms = Vec::with_capacity(batch);
            for _ in 0..batch {
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                confirms.push(
                    channel
                        .basic_publish(
                            self.config.exchange.as_str().into(),
                            "work".into(),
                            options,
                            &body,
                            note_properties(),
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                confirm_ok(confirm).await?;
            }
            left -= batch;
        }
        let elapsed = start.elapsed();
        let _ = connection.close(200, "done".into()).await;
        Ok(rate(self.messages, elapsed))
    }

    /// Fills an outbox with the broker down, then starts a publisher on the broker with it and
    /// times from start to an empty outbox.
    async fn drain(&self) -> Result<f64, Error> {
        self.purge().await?;
        let dir = tempfile::tempdir_in(bench_dir()?)?;
        let path = dir.path().join("outbox.redb");
        let offline = self.offline_publisher(&path).await?;
        self.queue_all(&offline).await?;
        let queued = offline.outbox_len();
        offline.close().await;
        let mut options = PublisherOptions::new(&self.uri, &path);
        options.outbox_limits = unlimited();
        options.resend_batch = RESEND_BATCH;
        options.resend_jitter = Duration::ZERO;
        let publisher = Publisher::start(options, LiveConfig::fixed(self.config.clone())).await?;
        let start = Instant::now();
        // `resent` counts a batch once its removal is committed, just after the outbox shrinks.
        while publisher.stats().resent < queued {
            if start.elapsed() > Duration::from_secs(600) {
                return Err("the outbox did not drain in 10 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = start.elapsed();
        let left = publisher.outbox_len();
        publisher.close().await;
        if left != 0 {
            return Err(format!("{left} messages left in the outbox after the drain").into());
        }
        Ok(rate(usize::try_from(queued)?, elapsed))
    }
}

/// One redb write transaction (fsync) per message, from `PUBLISHERS` threads.
fn raw_redb_each(messages: usize, size: usize) -> Result<f64, Error> {
    let dir = tempfile::tempdir_in(bench_dir()?)?;
    let db = Arc::new(redb::Database::create(dir.path().join("raw.redb"))?);
    let next = Arc::new(AtomicU64::new(1));
    let per_thread = messages / PUBLISHERS;
    let start = Instant::now();
    let threads: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (db, next) = (db.clone(), next.clone());
            std::thread::spawn(move || -> Result<(), Error> {
                let value = vec![b'n'; size];
                for _ in 0..per_thread {
                    let txn = db.begin_write()?;
                    {
                        let mut table = txn.open_table(RAW_TABLE)?;
                        table.insert(next.fetch_add(1, Ordering::Relaxed), value.as_slice())?;
                    }
                    txn.commit()?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "raw redb thread panicked")??;
    }
    Ok(rate(per_thread * PUBLISHERS, start.elapsed()))
}

/// redb write transactions of `PUBLISHERS` messages each, from one thread.
fn raw_redb_grouped(messages: usize, size: usize) -> Result<f64, Error> {
    let dir = tempfile::tempdir_in(bench_dir()?)?;
    let db = redb::Database::create(dir.path().join("raw.redb"))?;
    let value = vec![b'n'; size];
    let mut key = 1u64;
    let start = Instant::now();
    for _ in 0..messages / PUBLISHERS {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(RAW_TABLE)?;
            for _ in 0..PUBLISHERS {
                table.insert(key, value.as_slice())?;
                key += 1;
            }
        }
        txn.commit()?;
    }
    Ok(rate(messages / PUBLISHERS * PUBLISHERS, start.elapsed()))
}
