//! The consumer: runs a handler per message and settles every delivery by the retry protocol.
//!
//! Success acks. A failure republishes a copy (to the retry tier of this attempt, or to the
//! dead-letter exchange) on a confirm channel with `mandatory`, and acks the original only
//! once the broker confirmed the copy and did not return it. If the copy is nacked, returned,
//! times out or the channel dies, the original is nacked with `requeue = true`: it is never
//! acked before it is safely elsewhere.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};
use tokio::sync::{Semaphore, watch};

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
    pub fn retryable(error: impl std::fmt::Display) -> Self {
        Self::Retryable(error.to_string())
    }

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
    max_attempts: u32,
}

impl Message {
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

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
        self.inner.max_attempts
    }

    /// True when a failure now sends the message to the DLQ rather than to a retry tier.
    pub fn is_last_attempt(&self) -> bool {
        self.inner.attempt >= self.inner.max_attempts
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

    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// A header of the message, as text (e.g. [`crate::headers::LAST_FAILURE`]).
    pub fn header_text(&self, name: &str) -> Option<String> {
        retry::header_text(self.inner.properties.headers().as_ref(), name)
    }
}

/// How the consumer connects and how much it takes on at once.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// `amqp[s]://user:password@host:port/vhost`.
    pub uri: String,
    /// Unacknowledged deliveries the broker may push ahead (`basic.qos`).
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long a republished copy may wait for its confirm before the original is requeued.
    pub confirm_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect: Backoff,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

impl ConsumerOptions {
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            prefetch: 64,
            concurrency: 16,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            reconnect: Backoff::default(),
            connection_name: "msgpipe-consumer".into(),
        }
    }
}

/// Why the consumer could not start. Once running it never gives up: lost connections are
/// retried with backoff until [`ShutdownHandle::shutdown`].
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    InvalidUri(#[from] InvalidUri),
    #[error("concurrency and prefetch must be at least 1")]
    NoCapacity,
}

/// Counters of what the consumer did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    pub delivered: u64,
    /// Handled successfully and acked.
    pub acked: u64,
    /// Failed and moved to a retry tier (copy confirmed, original acked).
    pub retried: u64,
    /// Failed and moved to the DLQ (copy confirmed, original acked).
    pub dead_lettered: u64,
    /// Failed, but the copy was not confirmed: the original was requeued.
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
}

impl Counters {
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
    pub fn get(&self) -> ConsumerStats {
        self.0.snapshot()
    }
}

impl Consumer {
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

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

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
    publish: Channel,
    config: LiveConfig,
    confirm_timeout: Duration,
    counters: Arc<Counters>,
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
            let (connection, end) = match self.session(&mut backoff).await {
                Ok(done) => done,
                Err(error) => (None, SessionEnd::Lost(error)),
            };
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
    async fn session(
        &mut self,
        backoff: &mut BackoffState,
    ) -> Result<(Option<Connection>, SessionEnd), String> {
        let options = &self.consumer.options;
        let connection = connection::connect(
            &options.uri,
            &options.connection_name,
            options.connect_timeout,
        )
        .await?;
        match self.consume(&connection, backoff).await {
            Ok(end) => Ok((Some(connection), end)),
            Err(error) => Ok((Some(connection), SessionEnd::Lost(error))),
        }
    }

    async fn consume(
        &mut self,
        connection: &Connection,
        backoff: &mut BackoffState,
    ) -> Result<SessionEnd, String> {
        let options = &self.consumer.options;
        let setup = tokio::time::timeout(options.connect_timeout, self.open_channels(connection));
        let (consume, publish, mut deliveries) = setup
            .await
            .map_err(|_| "opening channels: no answer in time".to_string())??;
        let queue = deliveries.queue().to_string();
        backoff.reset();
        bump(&self.consumer.counters.connections);
        tracing::info!(%queue, prefetch = options.prefetch, concurrency = options.concurrency, "consuming");
        let session = Arc::new(Session {
            publish: publish.clone(),
            config: self.consumer.config.clone(),
            confirm_timeout: options.confirm_timeout,
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
            if !publish.status().connected() {
                // The copy channel died (e.g. a missing retry exchange): start over.
                return Err("the confirm channel closed".into());
            }
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
            max_attempts: config.max_attempts,
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
        .unwrap_or_else(|_| Err(HandlerError::Retryable("the handler panicked".into())));
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
    let config = session.config.current();
    let attempt = message.attempt();
    let destination = retry::destination(&config, attempt, error.kind());
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
    let routing_key = destination.routing_key(message.routing_key()).to_string();
    let published = publish_confirmed(
        &session.publish,
        destination.exchange(),
        &routing_key,
        message.body(),
        properties,
        session.confirm_timeout,
    )
    .await;
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
            requeue(acker, message, &failure).await;
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

async fn requeue(acker: &Acker, message: &Message, failure: &PublishFailure) {
    tracing::warn!(message_id = ?message.message_id(), attempt = message.attempt(), %failure, "copy not confirmed; requeueing the original");
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    // If even the nack fails the channel is gone, and the broker requeues the message itself.
    let _ = tokio::time::timeout(SETTLE_TIMEOUT, acker.nack(options)).await;
}
