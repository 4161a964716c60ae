//! The consumer: runs a handler per message and settles every delivery by the retry protocol.
//!
//! Success acks. A failure republishes a copy (to the retry tier of this attempt, or to the
//! dead-letter exchange) on a confirm channel with `mandatory`, and acks the original only
//! once the broker confirmed the copy and did not return it. If the copy is nacked, returned,
//! times out or the channel dies, the original is *given back*: after a pause
//! ([`ConsumerOptions::give_back_backoff`], growing while give-backs continue) it is rejected
//! with `requeue = true`. It is never acked before it is safely elsewhere.
//!
//! Why `basic.reject` and not `basic.nack`: on a quorum queue the broker's `delivery-limit`
//! must count every give-back, or a message the client can never move (a retry tier missing
//! from the broker) loops forever. RabbitMQ 4.3 does not count `basic.nack(requeue)` toward
//! `delivery-limit`; `basic.reject(requeue)` and a closed channel count on every supported
//! version (3.10, 4.0, 4.3). The pause keeps a broken topology from becoming a hot loop.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};
use tokio::sync::{Semaphore, watch};

use crate::config::PipelineConfig;
use crate::connection::{self, Backoff, BackoffState, InvalidUri};
use crate::live::LiveConfig;
use crate::publish::{PublishFailure, publish_confirmed};
use crate::retry::{self, Destination, Failure, FailureKind};

/// What a handler reports when it could not process a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Try again later: the message goes to the retry tier of this attempt, or to the DLQ after
    /// the last attempt.
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help: the message goes to the DLQ now.
    #[error("{0}")]
    Permanent(String),
}

impl HandlerError {
    /// A failure worth retrying, with `error`'s text.
    pub fn retryable(error: impl std::fmt::Display) -> Self {
        Self::Retryable(error.to_string())
    }

    /// A failure retrying cannot fix, with `error`'s text.
    pub fn permanent(error: impl std::fmt::Display) -> Self {
        Self::Permanent(error.to_string())
    }

    fn kind(&self) -> FailureKind {
        match self {
            Self::Retryable(_) => FailureKind::Retryable,
            Self::Permanent(_) => FailureKind::Permanent,
        }
    }

    fn text(&self) -> &str {
        match self {
            Self::Retryable(text) | Self::Permanent(text) => text,
        }
    }
}

/// A delivered message, as the handler sees it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Message {
    inner: Arc<MessageInner>,
}

#[derive(Debug)]
struct MessageInner {
    body: Vec<u8>,
    properties: BasicProperties,
    exchange: ShortString,
    routing_key: ShortString,
    redelivered: bool,
    attempt: u32,
    /// The pipeline as it was when the message was delivered: its failure goes by this.
    config: Arc<PipelineConfig>,
}

impl Message {
    /// The message body.
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// The message properties (headers, message id, content type, ...).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// The message id, when the publisher set one (the msgpipe [`crate::Publisher`] always does).
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// This delivery's attempt, 1-based: `x-retry-count + 1`. A redelivery after a crash or a
    /// requeue has the same attempt number: only handler failures count.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Attempts allowed by the pipeline (`maxAttempts`) when this message was delivered.
    pub fn max_attempts(&self) -> u32 {
        self.inner.config.max_attempts
    }

    /// True when a failure now sends the message to the DLQ rather than to a retry tier.
    pub fn is_last_attempt(&self) -> bool {
        self.inner.attempt >= self.inner.config.max_attempts
    }

    /// Where the consumer will send this message if the handler returns `error`: the retry
    /// tier (and its delay) for this attempt, or the dead-letter exchange (and why).
    ///
    /// ```
    /// # use msgpipe_client::{Destination, HandlerError, Message};
    /// fn describe(message: &Message, error: &HandlerError) -> String {
    ///     match message.failure_destination(error) {
    ///         Destination::Retry { tier, delay, .. } => format!("retry tier {tier} in {delay:?}"),
    ///         Destination::DeadLetter { reason, .. } => format!("dead-lettered ({reason})"),
    ///     }
    /// }
    /// ```
    pub fn failure_destination(&self, error: &HandlerError) -> Destination {
        retry::destination(&self.inner.config, self.inner.attempt, error.kind())
    }

    /// The broker's redelivered flag: an earlier delivery of this copy may have been handled
    /// already (a consumer died before its ack). Deduplicate by [`Message::message_id`].
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Exchange this copy was delivered from (empty for a message back from a retry tier).
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// Routing key of this copy (the queue name for a message back from a retry tier).
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// A header of the message, as text (e.g. [`crate::headers::ERROR`]).
    pub fn header_text(&self, name: &str) -> Option<String> {
        retry::header_text(self.inner.properties.headers().as_ref(), name)
    }

    /// A time header of the message (e.g. [`crate::headers::LAST_FAILURE`]); None when absent
    /// or not RFC 3339.
    pub fn header_time(&self, name: &str) -> Option<std::time::SystemTime> {
        self.header_text(name)
            .and_then(|text| crate::headers::parse_time(&text))
    }
}

/// How the consumer connects and how much it takes on at once.
///
/// `Debug` shows the URI with its password replaced by `***`.
#[derive(Clone)]
pub struct ConsumerOptions {
    /// `amqp[s]://user:password@host:port/vhost`.
    pub uri: String,
    /// PEM file of the CA that signed the broker's certificate, for `amqps` URIs whose broker
    /// certificate is not signed by a CA in the OS trust store. Default: `None` (OS store), or
    /// the file named by [`crate::CA_FILE_ENV`] when set.
    pub ca_file: Option<PathBuf>,
    /// Unacknowledged deliveries the broker may push ahead (`basic.qos`). Default: 64.
    pub prefetch: u16,
    /// Handlers running at once. Default: 16.
    pub concurrency: usize,
    /// How long a republished copy may wait for its confirm before the original is given back.
    /// Default: 10 s.
    pub confirm_timeout: Duration,
    /// Longest wait for the connection and its channels. Default: 10 s.
    pub connect_timeout: Duration,
    /// Waits between reconnect attempts. Default: [`Backoff::default`] (200 ms doubling to 30 s).
    pub reconnect: Backoff,
    /// Pause before a message whose copy the broker did not take (returned: a missing retry
    /// tier or DLQ binding; nacked; not confirmed) is given back to the queue. Doubles with each
    /// give-back in a row, up to `max`, and starts over once a copy is confirmed. Default:
    /// 500 ms doubling to 30 s.
    pub give_back_backoff: Backoff,
    /// Shown in the broker's connection list. Default: `msgpipe-consumer`.
    pub connection_name: String,
}

impl ConsumerOptions {
    /// Options with the defaults above for `uri`.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            ca_file: connection::ca_file_from_env(),
            prefetch: 64,
            concurrency: 16,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect: Backoff::default(),
            give_back_backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            connection_name: "msgpipe-consumer".into(),
        }
    }
}

impl std::fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerOptions")
            .field("uri", &connection::redact_uri(&self.uri))
            .field("ca_file", &self.ca_file)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .field("give_back_backoff", &self.give_back_backoff)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

/// Why the consumer could not start. Once running it never gives up: lost connections are
/// retried with backoff until [`ShutdownHandle::shutdown`].
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    /// The URI cannot be parsed (the error does not repeat it).
    InvalidUri(#[from] InvalidUri),
    #[error("concurrency and prefetch must be at least 1")]
    /// `concurrency` or `prefetch` is 0.
    NoCapacity,
}

/// Counters of what the consumer did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Messages handed to the handler.
    pub delivered: u64,
    /// Handled successfully and acked.
    pub acked: u64,
    /// Failed and moved to a retry tier (copy confirmed, original acked).
    pub retried: u64,
    /// Failed and moved to the DLQ (copy confirmed, original acked).
    pub dead_lettered: u64,
    /// Failed, but the copy was not confirmed: the original was given back (rejected with
    /// requeue) after a pause.
    pub requeued: u64,
    /// Successful connections (1 + reconnects).
    pub connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    requeued: AtomicU64,
    connections: AtomicU64,
    /// Give-backs since the last confirmed copy: sets the next give-back pause.
    give_backs_in_a_row: AtomicU32,
}

impl Counters {
    /// Messages settled for good (acked after success or after a confirmed copy).
    fn settled(&self) -> u64 {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        get(&self.acked) + get(&self.retried) + get(&self.dead_lettered)
    }

    fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            delivered: get(&self.delivered),
            acked: get(&self.acked),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            requeued: get(&self.requeued),
            connections: get(&self.connections),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Stops a running [`Consumer`]: no new deliveries; handlers in flight finish and are settled.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Asks the consumer to stop; [`Consumer::run`] returns once the handlers in flight are done.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// Reads a pipeline's work queue and runs a handler per message. See the crate docs.
#[derive(Debug)]
pub struct Consumer {
    options: ConsumerOptions,
    config: LiveConfig,
    shutdown: Arc<watch::Sender<bool>>,
    counters: Arc<Counters>,
}

/// A counter handle that outlives `run` (for progress output and tests).
#[derive(Clone, Debug)]
pub struct ConsumerStatsHandle(Arc<Counters>);

impl ConsumerStatsHandle {
    /// The counters now.
    pub fn get(&self) -> ConsumerStats {
        self.0.snapshot()
    }
}

impl Consumer {
    /// A consumer of `config`'s work queue; nothing connects until [`Consumer::run`]. Fails on an
    /// unparsable URI or zero capacity.
    pub fn new(options: ConsumerOptions, config: LiveConfig) -> Result<Self, ConsumerError> {
        connection::check_uri(&options.uri)?;
        if options.concurrency == 0 || options.prefetch == 0 {
            return Err(ConsumerError::NoCapacity);
        }
        Ok(Self {
            options,
            config,
            shutdown: Arc::new(watch::channel(false).0),
            counters: Arc::default(),
        })
    }

    /// A handle that stops [`Consumer::run`] from another task.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Counters that stay readable while [`Consumer::run`] owns the consumer.
    pub fn stats(&self) -> ConsumerStatsHandle {
        ConsumerStatsHandle(self.counters.clone())
    }

    /// Consumes until [`ShutdownHandle::shutdown`], reconnecting whenever the connection is
    /// lost; returns after the handlers in flight have finished.
    ///
    /// The handler may run more than once for one message (at-least-once: a crash between
    /// handling and ack redelivers it): make it idempotent or deduplicate by message id.
    /// A panicking handler counts as a retryable failure.
    pub async fn run<H, F>(self, handler: H) -> ConsumerStats
    where
        H: Fn(Message) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let run = Run {
            handler: Arc::new(handler),
            slots: Arc::new(Semaphore::new(self.options.concurrency)),
            shutdown: self.shutdown.subscribe(),
            consumer: &self,
        };
        run.until_shutdown().await;
        self.counters.snapshot()
    }
}

struct Run<'a, H> {
    handler: Arc<H>,
    /// One permit per handler slot; all permits back means nothing is in flight.
    slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    consumer: &'a Consumer,
}

/// Everything a delivery task needs from its session.
struct Session {
    connection: Arc<Connection>,
    /// The confirm channel for copies; reopened on the same connection when the broker closed
    /// it (a publish to a missing exchange closes the channel, not the connection).
    publish: tokio::sync::Mutex<Channel>,
    connect_timeout: Duration,
    config: LiveConfig,
    confirm_timeout: Duration,
    give_back_backoff: Backoff,
    counters: Arc<Counters>,
}

impl Session {
    /// The confirm channel, reopened first if the broker closed it.
    async fn confirm_channel(&self) -> Result<Channel, PublishFailure> {
        let mut channel = self.publish.lock().await;
        if !channel.status().connected() {
            let reopen = async {
                let fresh = self.connection.create_channel().await?;
                fresh
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, lapin::Error>(fresh)
            };
            *channel = tokio::time::timeout(self.connect_timeout, reopen)
                .await
                .map_err(|_| PublishFailure::Timeout(self.connect_timeout))?
                .map_err(|e| {
                    PublishFailure::Channel(format!("reopening the confirm channel: {e}"))
                })?;
        }
        Ok(channel.clone())
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl<H, F> Run<'_, H>
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn until_shutdown(mut self) {
        let options = &self.consumer.options;
        let mut backoff = BackoffState::new(options.reconnect);
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let started = std::time::Instant::now();
            let settled_before = self.consumer.counters.settled();
            let (connection, end) = match self.session().await {
                Ok(done) => done,
                Err(error) => (None, SessionEnd::Lost(error)),
            };
            // A session that settled a message, or lasted, was healthy: the next outage starts
            // the backoff over. One that died at once (e.g. its copy channel closed by a missing
            // retry exchange) keeps growing it, so a broken topology cannot cause a reconnect loop.
            if self.consumer.counters.settled() > settled_before
                || started.elapsed() >= options.reconnect.max
            {
                backoff.reset();
            }
            if let Some(connection) = &connection {
                connection::close(connection).await;
            }
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost(reason) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(%reason, retry_in_ms = wait.as_millis() as u64, "consumer lost its broker connection");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.wait_for(|stop| *stop) => break,
                    }
                }
            }
        }
        self.wait_for_handlers().await;
    }

    async fn wait_for_handlers(&self) {
        let all = u32::try_from(self.consumer.options.concurrency).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }

    /// One connection's life: returns how it ended, and the connection to close.
    async fn session(&mut self) -> Result<(Option<Arc<Connection>>, SessionEnd), String> {
        let options = &self.consumer.options;
        let connection = connection::connect(
            &options.uri,
            &options.connection_name,
            options.connect_timeout,
            options.ca_file.as_deref(),
        )
        .await?;
        let connection = Arc::new(connection);
        match self.consume(&connection).await {
            Ok(end) => Ok((Some(connection), end)),
            Err(error) => Ok((Some(connection), SessionEnd::Lost(error))),
        }
    }

    async fn consume(&mut self, connection: &Arc<Connection>) -> Result<SessionEnd, String> {
        let options = &self.consumer.options;
        let setup = tokio::time::timeout(options.connect_timeout, self.open_channels(connection));
        let (consume, publish, mut deliveries) = setup
            .await
            .map_err(|_| "opening channels: no answer in time".to_string())??;
        let queue = deliveries.queue().to_string();
        bump(&self.consumer.counters.connections);
        tracing::info!(%queue, prefetch = options.prefetch, concurrency = options.concurrency, "consuming");
        let session = Arc::new(Session {
            connection: connection.clone(),
            publish: tokio::sync::Mutex::new(publish),
            connect_timeout: options.connect_timeout,
            config: self.consumer.config.clone(),
            confirm_timeout: options.confirm_timeout,
            give_back_backoff: options.give_back_backoff,
            counters: self.consumer.counters.clone(),
        });
        loop {
            let slot = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|stop| *stop) => break,
                slot = self.slots.clone().acquire_owned() => slot.map_err(|e| e.to_string())?,
            };
            let next = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|stop| *stop) => break,
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(format!("delivery stream: {error}")),
                None => return Err(format!("the broker cancelled the consumer on {queue}")),
            };
            bump(&self.consumer.counters.delivered);
            let handler = self.handler.clone();
            let session = session.clone();
            tokio::spawn(async move {
                settle(delivery, &session, &*handler).await;
                drop(slot);
            });
        }
        // Shutdown: no new deliveries; let the handlers in flight settle on this connection.
        let cancel = consume.basic_cancel(deliveries.tag(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(SETTLE_TIMEOUT, cancel).await;
        self.wait_for_handlers().await;
        let publish = session.publish.lock().await.clone();
        for channel in [&consume, &publish] {
            let _ =
                tokio::time::timeout(SETTLE_TIMEOUT, channel.close(200, "shutdown".into())).await;
        }
        Ok(SessionEnd::Shutdown)
    }
}

impl<H> Run<'_, H> {
    /// The consuming channel (with its prefetch), the confirm channel for copies, and the
    /// delivery stream of the work queue.
    async fn open_channels(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, Channel, lapin::Consumer), String> {
        let amqp = |what: &'static str| move |e: lapin::Error| format!("{what}: {e}");
        let consume = connection
            .create_channel()
            .await
            .map_err(amqp("open channel"))?;
        consume
            .basic_qos(self.consumer.options.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("basic.qos"))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(amqp("open confirm channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let queue = self.consumer.config.current().queue.clone();
        let queue_name = ShortString::try_new(queue.clone()).map_err(|e| e.to_string())?;
        let deliveries = consume
            .basic_consume(
                queue_name,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consume from {queue}: {e}"))?;
        Ok((consume, publish, deliveries))
    }
}

/// Handles one delivery and settles it: ack, or copy-then-ack, or requeue.
async fn settle<H, F>(delivery: lapin::message::Delivery, session: &Session, handler: &H)
where
    H: Fn(Message) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    let lapin::message::Delivery {
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let config = session.config.current();
    let message = Message {
        inner: Arc::new(MessageInner {
            attempt: retry::retry_count(properties.headers().as_ref()).saturating_add(1),
            config,
            body: data,
            properties,
            exchange,
            routing_key,
            redelivered,
        }),
    };
    let outcome = AssertUnwindSafe(async { handler(message.clone()).await })
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(HandlerError::Retryable(format!(
                "the handler panicked: {}",
                panic_text(panic.as_ref())
            )))
        });
    match outcome {
        Ok(()) => {
            if ack(&acker, &message).await {
                bump(&session.counters.acked);
            }
        }
        Err(error) => move_failed(&message, &error, session, &acker).await,
    }
}

/// Republishes a failed message where the protocol says, then acks; requeues if that fails.
async fn move_failed(message: &Message, error: &HandlerError, session: &Session, acker: &Acker) {
    let attempt = message.attempt();
    let destination = message.failure_destination(error);
    let now = retry::now_rfc3339();
    let failure = Failure {
        attempt,
        error: error.text(),
        at: &now,
        delivery_exchange: message.exchange(),
        delivery_routing_key: message.routing_key(),
    };
    let headers = retry::failure_headers(
        message.properties().headers().as_ref(),
        &failure,
        &destination,
    );
    let mut properties = retry::copy_properties(message.properties(), headers);
    if properties.message_id().is_none() {
        // Without an id, a consumer could not tell this copy from a duplicate: give it one,
        // which every later copy keeps.
        properties = properties.with_message_id(uuid::Uuid::now_v7().to_string().into());
    }
    let message_id = properties
        .message_id()
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    // A dead letter keeps the routing key it was first published with: after a retry the
    // delivery's key is the queue name (the tier dead-letters through the default exchange).
    let original = message
        .header_text(crate::headers::ORIGINAL_ROUTING_KEY)
        .unwrap_or_else(|| message.routing_key().to_string());
    let routing_key = destination.routing_key(&original).to_string();
    let published = match session.confirm_channel().await {
        Ok(channel) => {
            publish_confirmed(
                &channel,
                destination.exchange(),
                &routing_key,
                message.body(),
                properties,
                session.confirm_timeout,
            )
            .await
        }
        Err(failure) => Err(failure),
    };
    if published.is_ok() {
        session
            .counters
            .give_backs_in_a_row
            .store(0, Ordering::Relaxed);
    }
    match (published, &destination) {
        (Ok(()), Destination::Retry { tier, delay, .. }) => {
            tracing::info!(%message_id, attempt, tier, delay_ms = delay.as_millis() as u64, error = %error, "retry scheduled");
            if ack(acker, message).await {
                bump(&session.counters.retried);
            }
        }
        (Ok(()), Destination::DeadLetter { reason, .. }) => {
            tracing::warn!(%message_id, attempt, reason, error = %error, "dead-lettered");
            if ack(acker, message).await {
                bump(&session.counters.dead_lettered);
            }
        }
        (Err(failure), _) => {
            give_back(acker, message, &failure, session).await;
            bump(&session.counters.requeued);
        }
    }
}

/// Longest wait for an ack or nack to be handed to the connection; on a connection that just
/// died lapin may never answer, and a stuck settle would hold a handler slot forever.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

async fn ack(acker: &Acker, message: &Message) -> bool {
    match tokio::time::timeout(SETTLE_TIMEOUT, acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => true,
        Ok(Ok(false) | Err(_)) | Err(_) => {
            // The channel is gone: the broker redelivers the message to another consumer.
            tracing::debug!(message_id = ?message.message_id(), "ack not delivered; the message will be redelivered");
            false
        }
    }
}

/// Returns a message whose copy the broker did not take to its queue, after a pause that grows
/// while give-backs continue. `basic.reject(requeue)` is the call every supported RabbitMQ
/// version counts toward a quorum queue's `delivery-limit` (4.3 does not count
/// `basic.nack(requeue)`), so a message that can never be moved still ends in the DLQ.
async fn give_back(acker: &Acker, message: &Message, failure: &PublishFailure, session: &Session) {
    let in_a_row = session
        .counters
        .give_backs_in_a_row
        .fetch_add(1, Ordering::Relaxed);
    let pause = give_back_pause(session.give_back_backoff, in_a_row);
    tracing::warn!(
        message_id = ?message.message_id(),
        attempt = message.attempt(),
        %failure,
        pause_ms = pause.as_millis() as u64,
        "copy not confirmed; giving the original back to the queue after a pause"
    );
    tokio::time::sleep(pause).await;
    // If even the reject fails the channel is gone, and the broker requeues the message itself
    // (a closed channel counts toward delivery-limit too).
    let _ = tokio::time::timeout(
        SETTLE_TIMEOUT,
        acker.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
}

/// The message a panic was raised with (`panic!` with a literal or a format string).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// `initial * 2^in_a_row`, capped at `max`, with ±20 % jitter.
fn give_back_pause(policy: Backoff, in_a_row: u32) -> Duration {
    let mut state = BackoffState::new(policy);
    let mut wait = state.next_wait();
    for _ in 0..in_a_row.min(32) {
        wait = state.next_wait();
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn give_back_pauses_double_up_to_the_cap() {
        let policy = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for (in_a_row, base) in [(0, 100), (1, 200), (3, 800), (5, 2_000), (1_000, 2_000)] {
            let ms = give_back_pause(policy, in_a_row).as_millis() as u64;
            assert!(
                (base * 8 / 10..=base * 12 / 10).contains(&ms),
                "{in_a_row} in a row: {ms} ms vs {base}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_password_whatever_its_length() {
        for password in ["x", "ab", "s3cr3t-Pa55word-0123456789"] {
            let uri = format!("amqp://notes:{password}@rabbitmq:5672/%2f");
            let options = ConsumerOptions::new(uri);
            let shown = format!("{options:?}");
            assert!(!shown.contains(&format!(":{password}@")), "{shown}");
            assert!(
                shown.contains("amqp://notes:***@rabbitmq:5672/%2f"),
                "{shown}"
            );
            let consumer = Consumer::new(options, LiveConfig::fixed(crate::config::tests::notes()))
                .expect("consumer");
            let shown = format!("{consumer:?}");
            assert!(!shown.contains(&format!(":{password}@")), "{shown}");
        }
    }
}
