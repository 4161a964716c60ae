//! The publisher: confirmed publishes, and a durable outbox for what the broker did not confirm.
//!
//! `publish` sends with `mandatory` on a confirm channel and returns [`Outcome::Confirmed`] once
//! the broker acked and routed the message. When the broker is unreachable, nacks, returns the
//! message or does not confirm within `confirm_timeout`, the message is committed to the outbox
//! (fsync) and `publish` returns [`Outcome::Queued`]. While the outbox holds anything (and
//! `retry_pending` is on), new messages are queued behind it, so the broker sees them in publish
//! order. A message leaves the outbox only after its confirm.
//!
//! When it resends (`retry_pending` and `retry_interval_seconds` are read live from
//! `pipeline.json`):
//! - as soon as the link comes (back) up with a non-empty outbox, after a random delay of at
//!   most [`PublisherOptions::resend_jitter`] (0.5 s by default, so a fleet of publishers does
//!   not stampede a broker that just came back), and when `retry_pending` is switched on;
//! - then every `retry_interval_seconds` while messages remain (refused or unreachable).
//!
//! **`retry_pending: false` parks the outbox, not the publisher.** Its messages stay on disk
//! and are not resent; fresh publishes go straight to the broker (`Confirmed`) instead of
//! queueing behind messages that will not move, and only a fresh message the broker does not
//! take joins the parked outbox. While the flag is off, publish order between the parked
//! messages and fresh ones is therefore not kept: the fresh ones arrive first. Switching the
//! flag back on resends the parked messages at once, oldest first.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::connection::{self, Backoff, BackoffState, InvalidUri};
use crate::live::LiveConfig;
use crate::outbox::{Outbox, OutboxEntry, OutboxError, OutboxLimits};
use crate::publish::{PublishFailure, await_confirm, publish_confirmed, start_publish};

/// What became of a published message. Both mean it is safe: on the broker, or on local disk.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// The broker confirmed the message and routed it to a queue.
    Confirmed {
        /// The message id (the caller's, or the UUID v7 the publisher set).
        message_id: String,
    },
    /// The broker could not take it now; it is committed to the local outbox and will be resent.
    Queued {
        /// The message id (the caller's, or the UUID v7 the publisher set).
        message_id: String,
    },
}

impl Outcome {
    /// The message id, whichever the outcome.
    pub fn message_id(&self) -> &str {
        match self {
            Self::Confirmed { message_id } | Self::Queued { message_id } => message_id,
        }
    }
}

/// Why a message was *not* accepted. The caller still owns it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("exchange, routing key or message id longer than 255 bytes: {0}")]
    /// The exchange, routing key or message id is not a valid AMQP short string.
    InvalidName(String),
    /// The broker did not take the message and the outbox is at its limit.
    #[error(transparent)]
    OutboxFull(OutboxError),
    /// The broker did not take the message and saving it locally failed.
    #[error("cannot save the message in the outbox: {0}")]
    Outbox(OutboxError),
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    /// The URI cannot be parsed (the error does not repeat it).
    InvalidUri(#[from] InvalidUri),
    #[error(transparent)]
    /// The outbox file could not be opened.
    Outbox(#[from] OutboxError),
}

/// Where the publisher connects and keeps its outbox.
///
/// `Debug` shows the URI with its password replaced by `***`.
#[derive(Clone)]
pub struct PublisherOptions {
    /// `amqp[s]://user:password@host:port/vhost`.
    pub uri: String,
    /// PEM file of the CA that signed the broker's certificate, for `amqps` URIs whose broker
    /// certificate is not signed by a CA in the OS trust store. Default: `None` (OS store), or
    /// the file named by [`crate::CA_FILE_ENV`] when set.
    pub ca_file: Option<PathBuf>,
    /// The outbox file (created if missing). One publisher process per file: redb locks it.
    pub outbox_path: PathBuf,
    /// How large the outbox may grow. Default: [`OutboxLimits::default`] (100,000 messages,
    /// 256 MiB).
    pub outbox_limits: OutboxLimits,
    /// How long a publish waits for its confirm before the message goes to the outbox.
    /// Default: 5 s.
    pub confirm_timeout: Duration,
    /// Longest wait for the connection and its confirm channel. Default: 5 s.
    pub connect_timeout: Duration,
    /// Waits between reconnect attempts. Default: [`Backoff::default`] (200 ms doubling to 30 s).
    pub reconnect: Backoff,
    /// Waits between resends while the broker is up but has no route for the outbox's
    /// messages yet (the exchange does not exist, or returns them unroutable): typically a
    /// publisher that started before its pipeline was applied. Default: 250 ms doubling to 3 s,
    /// so the outbox is delivered within about 3 s of the route appearing at the cost of one
    /// probe publish per 3 s while it is missing.
    pub route_retry: Backoff,
    /// Messages resent per pipelined batch. Default: 256.
    pub resend_batch: usize,
    /// Longest random delay before the resend that follows a (re)connection, so that a fleet of
    /// publishers does not stampede a broker that just came back. Default: 500 ms.
    pub resend_jitter: Duration,
    /// Shown in the broker's connection list. Default: `msgpipe-publisher`.
    pub connection_name: String,
}

impl PublisherOptions {
    /// Options with the defaults above for `uri` and the outbox file `outbox_path`.
    pub fn new(uri: impl Into<String>, outbox_path: impl Into<PathBuf>) -> Self {
        Self {
            uri: uri.into(),
            ca_file: connection::ca_file_from_env(),
            outbox_path: outbox_path.into(),
            outbox_limits: OutboxLimits::default(),
            confirm_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect: Backoff::default(),
            route_retry: Backoff {
                initial: Duration::from_millis(250),
                max: Duration::from_secs(3),
            },
            resend_batch: 256,
            resend_jitter: Duration::from_millis(500),
            connection_name: "msgpipe-publisher".into(),
        }
    }
}

impl std::fmt::Debug for PublisherOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherOptions")
            .field("uri", &connection::redact_uri(&self.uri))
            .field("ca_file", &self.ca_file)
            .field("outbox_path", &self.outbox_path)
            .field("outbox_limits", &self.outbox_limits)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .field("route_retry", &self.route_retry)
            .field("resend_batch", &self.resend_batch)
            .field("resend_jitter", &self.resend_jitter)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

/// Counters since start, and the outbox now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Publishes confirmed directly.
    pub confirmed: u64,
    /// Publishes saved to the outbox.
    pub queued: u64,
    /// Outbox messages resent and confirmed.
    pub resent: u64,
    /// Resend rounds started (only while `retry_pending` is on and the outbox is not empty).
    pub resend_rounds: u64,
    /// Connections made (1 + reconnects).
    pub connections: u64,
    /// Confirm channels reopened on a live connection (the broker closes the channel of a
    /// publish to a missing exchange; the connection stays).
    pub channels_reopened: u64,
    /// Messages in the outbox now.
    pub outbox_messages: u64,
    /// Encoded bytes in the outbox now.
    pub outbox_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    confirmed: AtomicU64,
    queued: AtomicU64,
    resent: AtomicU64,
    resend_rounds: AtomicU64,
    connections: AtomicU64,
    channels_reopened: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The channel in use, shared by `publish` calls and the resender.
#[derive(Debug)]
struct Link {
    channel: RwLock<Option<Channel>>,
    /// Set when a publish saw the channel fail; the link task replaces the channel.
    broken: AtomicBool,
    /// Set with `broken` when the failure says the connection itself stopped answering (a
    /// confirm that never came): the link task reconnects instead.
    unresponsive: AtomicBool,
    wake: Notify,
    /// Bumped each time a new channel is installed: the resender drains the outbox at once.
    generation: watch::Sender<u64>,
}

impl Link {
    fn new() -> Self {
        Self {
            channel: RwLock::new(None),
            broken: AtomicBool::new(false),
            unresponsive: AtomicBool::new(false),
            wake: Notify::new(),
            generation: watch::channel(0).0,
        }
    }

    fn current(&self) -> Option<Channel> {
        let guard = self.channel.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().filter(|c| c.status().connected())
    }

    /// Installs a fresh channel (and tells the resender) or clears it.
    fn set(&self, channel: Option<Channel>) {
        let up = channel.is_some();
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = channel;
        if up {
            self.generation.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// A publish failed in a way that makes the channel unusable. The failure's kind, not the
    /// channel's state at that instant (lapin may not have seen the broker's close yet), says
    /// whether a new channel is enough.
    fn mark_broken(&self, failure: &PublishFailure) {
        if matches!(
            failure,
            PublishFailure::Timeout(_) | PublishFailure::NotConfirmed
        ) {
            self.unresponsive.store(true, Ordering::Release);
        }
        self.broken.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

#[derive(Debug)]
struct Shared {
    options: PublisherOptions,
    /// The vhost of the URI, for messages about a missing route.
    vhost: String,
    config: LiveConfig,
    outbox: Outbox,
    link: Link,
    route: RouteWatch,
    counters: Counters,
}

/// Since when the broker has refused this publisher's messages for a reason that passes by
/// itself (no route yet, or a full queue: [`PublishFailure::retry_soon`]), and the wake-up of
/// the resender when a fresh publish finds that out.
#[derive(Debug, Default)]
struct RouteWatch {
    missing_since: Mutex<Option<Instant>>,
    lost: Notify,
}

impl RouteWatch {
    fn is_missing(&self) -> bool {
        self.missing_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Records a publish the broker had no route for (or nacked). The first of an outage says
    /// so, once, at warn; the resender then retries on the short `route_retry` backoff.
    fn missing(&self, failure: &PublishFailure, vhost: &str, outbox: u64) {
        let first = {
            let mut since = self.missing_since.lock().unwrap_or_else(|p| p.into_inner());
            let first = since.is_none();
            since.get_or_insert_with(Instant::now);
            first
        };
        if first {
            match failure {
                PublishFailure::Returned {
                    exchange,
                    routing_key,
                } => tracing::warn!(
                    outbox,
                    "exchange {exchange} in vhost {vhost} routes nothing for routing key \
                     {routing_key:?} (messages returned): is the pipeline applied? Messages \
                     wait in the outbox and are resent as soon as a queue is bound"
                ),
                PublishFailure::Nacked => tracing::warn!(
                    outbox,
                    "the broker refuses messages in vhost {vhost} (nacked: a queue is full, \
                     overflow reject-publish); messages wait in the outbox and are resent on a \
                     short backoff until it takes them"
                ),
                _ => tracing::warn!(
                    outbox,
                    "{}: is the pipeline applied? Messages wait in the outbox and are resent \
                     as soon as it appears",
                    match failure {
                        PublishFailure::ExchangeMissing { exchange } =>
                            format!("exchange {exchange} does not exist in vhost {vhost}"),
                        other => other.to_string(),
                    }
                ),
            }
        }
        self.lost.notify_one();
    }

    /// Records a publish the broker routed: ends an outage, saying how long it lasted.
    fn found(&self) {
        let since = self
            .missing_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(since) = since {
            tracing::info!(
                missing_ms = since.elapsed().as_millis() as u64,
                "the broker routes this publisher's messages again"
            );
        }
    }
}

/// Stops the background tasks when the last [`Publisher`] clone goes away.
#[derive(Debug)]
struct Tasks {
    shutdown: watch::Sender<bool>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Publishes to a pipeline's work exchange, with a durable outbox. Cheap to clone; clones share
/// the connection and the outbox. See the crate docs.
#[derive(Clone, Debug)]
pub struct Publisher {
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
}

impl Publisher {
    /// Opens the outbox and connects. An unreachable broker is not an error: the publisher
    /// starts offline, queues, and keeps reconnecting in the background.
    pub async fn start(
        options: PublisherOptions,
        config: LiveConfig,
    ) -> Result<Self, PublisherError> {
        connection::check_uri(&options.uri)?;
        let path = options.outbox_path.clone();
        let limits = options.outbox_limits;
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(path, limits))
            .await
            .map_err(|_| OutboxError::Closed)??;
        if !outbox.is_empty() {
            tracing::info!(
                messages = outbox.len(),
                "outbox holds messages from an earlier run"
            );
        }
        let vhost = lapin::uri::AMQPUri::from_str(&options.uri)
            .map(|uri| uri.vhost)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            options,
            vhost,
            config,
            outbox,
            link: Link::new(),
            route: RouteWatch::default(),
            counters: Counters::default(),
        });
        let first = open_link(&shared.options).await;
        match &first {
            // Usable before `start` returns: the first publish must not race the link task.
            Ok((_, channel)) => shared.link.set(Some(channel.clone())),
            Err(reason) => {
                tracing::warn!(%reason, "publisher starts offline; messages go to the outbox");
            }
        }
        let (shutdown, stop) = watch::channel(false);
        let handles = vec![
            tokio::spawn(maintain_link(shared.clone(), stop.clone(), first.ok())),
            tokio::spawn(resend_loop(shared.clone(), stop)),
        ];
        Ok(Self {
            shared,
            tasks: Arc::new(Tasks {
                shutdown,
                handles: Mutex::new(handles),
            }),
        })
    }

    /// Publishes to the pipeline's work exchange with its routing key (from `pipeline.json`).
    ///
    /// A message without `message_id` gets a UUID v7, and one without `delivery_mode` is made
    /// persistent (2). Ok means the message is safe (see [`Outcome`]); Err means it is not and
    /// the caller still owns it.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Outcome, PublishError> {
        let config = self.shared.config.current();
        self.publish_to(&config.exchange, &config.routing_key, body, properties)
            .await
    }

    /// [`Publisher::publish`] to any exchange and routing key.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Outcome, PublishError> {
        for name in [exchange, routing_key] {
            ShortString::try_new(name).map_err(|e| PublishError::InvalidName(e.to_string()))?;
        }
        let (properties, message_id) = stamp(properties);
        let shared = &self.shared;
        // Anything in the outbox must reach the broker first: then this goes behind it. While
        // `retry_pending` is off the outbox is parked, and fresh messages go straight on.
        let behind_outbox = !shared.outbox.is_empty() && shared.config.features().retry_pending;
        if !behind_outbox && let Some(channel) = shared.link.current() {
            let timeout = shared.options.confirm_timeout;
            let sent = publish_confirmed(
                &channel,
                exchange,
                routing_key,
                body,
                properties.clone(),
                timeout,
            )
            .await;
            match sent {
                Ok(()) => {
                    bump(&shared.counters.confirmed, 1);
                    shared.route.found();
                    return Ok(Outcome::Confirmed { message_id });
                }
                Err(failure) => note_failure(shared, &failure, &message_id),
            }
        }
        let entry = OutboxEntry {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            properties,
            body: body.to_vec(),
        };
        match shared.outbox.append(&entry).await {
            Ok(_) => {
                bump(&shared.counters.queued, 1);
                Ok(Outcome::Queued { message_id })
            }
            Err(full @ OutboxError::Full { .. }) => Err(PublishError::OutboxFull(full)),
            Err(error) => Err(PublishError::Outbox(error)),
        }
    }

    /// Messages waiting in the outbox.
    pub fn outbox_len(&self) -> u64 {
        self.shared.outbox.len()
    }

    /// Counters since start, and the outbox now.
    pub fn stats(&self) -> PublisherStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PublisherStats {
            confirmed: get(&c.confirmed),
            queued: get(&c.queued),
            resent: get(&c.resent),
            resend_rounds: get(&c.resend_rounds),
            connections: get(&c.connections),
            channels_reopened: get(&c.channels_reopened),
            outbox_messages: self.shared.outbox.len(),
            outbox_bytes: self.shared.outbox.bytes(),
        }
    }

    /// Stops resending and closes the connection. The outbox keeps what is left for next time.
    pub async fn close(self) {
        self.tasks.shutdown.send_replace(true);
        let handles =
            std::mem::take(&mut *self.tasks.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in handles {
            let _ = handle.await;
        }
    }
}

/// Sets a message id (UUID v7) and persistence when the caller did not.
fn stamp(properties: BasicProperties) -> (BasicProperties, String) {
    let mut properties = properties;
    if properties.delivery_mode().is_none() {
        properties = properties.with_delivery_mode(2);
    }
    let message_id = match properties.message_id() {
        Some(id) => id.to_string(),
        None => {
            let id = uuid::Uuid::now_v7().to_string();
            properties = properties.with_message_id(id.as_str().into());
            id
        }
    };
    (properties, message_id)
}

fn note_failure(shared: &Shared, failure: &PublishFailure, message_id: &str) {
    tracing::debug!(%message_id, %failure, "publish not confirmed; saving to the outbox");
    if failure.breaks_channel() {
        shared.link.mark_broken(failure);
    }
    if failure.retry_soon() {
        // Counted before this message is appended: the outbox it waits in.
        shared
            .route
            .missing(failure, &shared.vhost, shared.outbox.len() + 1);
    }
}

/// A connection and a confirm channel on it.
async fn open_link(options: &PublisherOptions) -> Result<(Connection, Channel), String> {
    let connection = connection::connect(
        &options.uri,
        &options.connection_name,
        options.connect_timeout,
        options.ca_file.as_deref(),
    )
    .await?;
    match open_confirm_channel(&connection, options.connect_timeout).await {
        Ok(channel) => Ok((connection, channel)),
        Err(reason) => {
            connection::close(&connection).await;
            Err(reason)
        }
    }
}

/// A confirm channel on `connection`, within `timeout`.
async fn open_confirm_channel(
    connection: &Connection,
    timeout: Duration,
) -> Result<Channel, String> {
    let channel = async {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>(channel)
    };
    match tokio::time::timeout(timeout, channel).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(format!("cannot open a confirm channel: {error}")),
        Err(_) => Err("cannot open a confirm channel: no answer in time".into()),
    }
}

/// Keeps one connection up: reconnects with capped backoff whenever it is lost or a publish
/// reported it broken.
async fn maintain_link(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut ready: Option<(Connection, Channel)>,
) {
    let mut backoff = BackoffState::new(shared.options.reconnect);
    let mut down_since: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let (connection, channel) = match ready.take() {
            Some(link) => link,
            None => match open_link(&shared.options).await {
                Ok(link) => link,
                Err(reason) => {
                    if down_since.is_none() {
                        tracing::warn!(%reason, "publisher cannot reach the broker; queueing to the outbox");
                        down_since = Some(Instant::now());
                    }
                    let wait = backoff.next_wait();
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            },
        };
        if let Some(since) = down_since.take() {
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                "publisher reconnected"
            );
        }
        backoff.reset();
        bump(&shared.counters.connections, 1);
        let stopping = serve_connection(&shared, &mut stop, &connection, channel).await;
        connection::close(&connection).await;
        if stopping {
            return;
        }
        tracing::warn!("publisher lost its broker connection; reconnecting");
        down_since = Some(Instant::now());
    }
}

/// Serves publishes on one connection until it is unusable (true: because of shutdown). A
/// channel the broker closed (a publish to a missing exchange) is replaced by a new one on the
/// same connection, quietly: reconnecting would only repeat it, and the resender paces the
/// publishes that provoke it.
async fn serve_connection(
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    connection: &Connection,
    mut channel: Channel,
) -> bool {
    loop {
        shared.link.broken.store(false, Ordering::Release);
        shared.link.unresponsive.store(false, Ordering::Release);
        shared.link.set(Some(channel.clone()));
        let stopping = watch_link(shared, stop, connection, &channel).await;
        shared.link.set(None);
        if stopping {
            return true;
        }
        if !connection.status().connected() || shared.link.unresponsive.load(Ordering::Acquire) {
            // The connection is gone, or stopped answering (a confirm timed out): only a new
            // connection helps.
            return false;
        }
        if channel.status().connected() {
            // The broker's close of this channel may still be on its way; do not leave it open.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                channel.close(200, "msgpipe: replaced".into()),
            )
            .await;
        }
        match open_confirm_channel(connection, shared.options.connect_timeout).await {
            Ok(fresh) => {
                bump(&shared.counters.channels_reopened, 1);
                channel = fresh;
            }
            Err(reason) => {
                tracing::debug!(%reason, "cannot reopen the confirm channel; reconnecting");
                return false;
            }
        }
    }
}

/// Waits until the link is unusable (true: because of shutdown).
async fn watch_link(
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    connection: &Connection,
    channel: &Channel,
) -> bool {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return true,
            () = shared.link.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let broken = shared.link.broken.swap(false, Ordering::AcqRel);
        if broken || !connection.status().connected() || !channel.status().connected() {
            return false;
        }
    }
}

/// Resends the outbox while `retry_pending` is on: right after the link comes (back) up or the
/// flag is switched on (after a random delay of up to `resend_jitter`, so a fleet of
/// publishers does not stampede a broker that just came back), then every
/// `retry_interval_seconds` while messages remain. While the broker is up but has no route for
/// them (the pipeline is not applied yet), it retries on the short, growing `route_retry`
/// backoff instead, and a link coming up does not cut that wait short: the probe that found the
/// exchange missing is what closed the channel.
async fn resend_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut link_up = shared.link.generation.subscribe();
    // An outbox left by an earlier run drains as soon as the first link is up.
    link_up.mark_changed();
    let mut flags = shared.config.subscribe_features();
    let mut flags_alive = true;
    let interval = |shared: &Shared| {
        Duration::from_secs(
            shared
                .config
                .features()
                .retry_interval_seconds
                .max(1)
                .into(),
        )
    };
    let mut route_backoff = BackoffState::new(shared.options.route_retry);
    let mut next_round = Instant::now() + interval(&shared);
    loop {
        let soon = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep_until(next_round) => false,
            changed = link_up.changed() => {
                if changed.is_err() {
                    return;
                }
                if shared.route.is_missing() {
                    continue;
                }
                true
            }
            () = shared.route.lost.notified() => {
                // A fresh publish found no route: probe again soon, not at the next interval.
                next_round = next_round.min(Instant::now() + route_backoff.next_wait());
                continue;
            }
            changed = flags.changed(), if flags_alive => {
                // A fixed configuration never changes: stop listening, keep the interval.
                flags_alive = changed.is_ok();
                flags_alive && flags.borrow_and_update().retry_pending
            }
        };
        if !shared.config.features().retry_pending || shared.outbox.is_empty() {
            next_round = Instant::now() + interval(&shared);
            continue;
        }
        if soon {
            let wait = connection::jitter(shared.options.resend_jitter);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
        resend_until_refused(&shared).await;
        next_round = Instant::now()
            + if shared.route.is_missing() && !shared.outbox.is_empty() {
                route_backoff.next_wait()
            } else {
                route_backoff.reset();
                interval(&shared)
            };
    }
}

/// Resend rounds back to back while each one empties what it saw and messages remain (those
/// appended behind a round that had just finished reading); stops at the first refusal or error.
async fn resend_until_refused(shared: &Shared) {
    loop {
        bump(&shared.counters.resend_rounds, 1);
        match resend_round(shared).await {
            Ok(round) => {
                if round.sent > 0 {
                    tracing::info!(
                        sent = round.sent,
                        left = shared.outbox.len(),
                        "resent outbox messages"
                    );
                }
                if round.refused > 0 || round.sent == 0 || shared.outbox.is_empty() {
                    return;
                }
            }
            Err(reason) => {
                tracing::debug!(%reason, left = shared.outbox.len(), "resend round stopped");
                return;
            }
        }
    }
}

/// What one resend round did.
#[derive(Debug, Default)]
struct Round {
    sent: u64,
    /// Messages the broker refused (returned, nacked): kept for the next interval.
    refused: u64,
}

/// One pass over the outbox, oldest first, in pipelined batches. Messages the broker refused
/// (returned, nacked) stay for the next round; a broken channel ends the round. The removal of
/// a confirmed batch (an fsync'd commit) runs while the next batch is published.
async fn resend_round(shared: &Shared) -> Result<Round, String> {
    let mut cursor = 0;
    let mut round = Round::default();
    let mut removing: Option<Removal<'_>> = None;
    let result = loop {
        if !shared.config.features().retry_pending {
            break Ok(());
        }
        let Some(channel) = shared.link.current() else {
            break Err("the broker is unreachable".to_string());
        };
        // While the route is missing, a round is a probe: the oldest message alone, and the
        // round ends at its refusal. Half a pipeline (its exchange declared, its binding not
        // yet) would otherwise route later messages past a returned older one.
        let probing = shared.route.is_missing();
        let size = if probing {
            1
        } else {
            shared.options.resend_batch.max(1)
        };
        let batch = match shared.outbox.oldest_after(cursor, size).await {
            Ok(batch) => batch,
            Err(error) => break Err(error.to_string()),
        };
        let Some((last, _)) = batch.last() else {
            break Ok(());
        };
        cursor = *last;
        let previous = removing.take();
        let ((confirmed, broken), removed) = tokio::join!(
            resend_batch(shared, &channel, &batch),
            finish_removal(previous, &mut round),
        );
        if let Err(error) = removed {
            break Err(error);
        }
        let count = confirmed.len() as u64;
        // Counted when confirmed, before the outbox forgets them: whoever sees the outbox
        // shrink also sees them counted.
        bump(&shared.counters.resent, count);
        round.refused += batch.len() as u64 - count;
        removing = Some(Removal {
            count,
            done: Box::pin(shared.outbox.remove(confirmed)),
        });
        if let Some(failure) = broken {
            shared.link.mark_broken(&failure);
            break Err(failure.to_string());
        }
        if probing && count == 0 {
            break Ok(());
        }
    };
    finish_removal(removing, &mut round).await?;
    result.map(|()| round)
}

/// A confirmed batch being deleted from the outbox.
struct Removal<'a> {
    count: u64,
    done: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), OutboxError>> + Send + 'a>>,
}

/// Waits for a removal (its messages were counted as resent when confirmed).
async fn finish_removal(removal: Option<Removal<'_>>, round: &mut Round) -> Result<(), String> {
    let Some(removal) = removal else {
        return Ok(());
    };
    removal.done.await.map_err(|e| e.to_string())?;
    round.sent += removal.count;
    Ok(())
}

/// Publishes a batch, then collects its confirms in order. Returns the confirmed sequence
/// numbers and, if the channel broke, why.
async fn resend_batch(
    shared: &Shared,
    channel: &Channel,
    batch: &[(u64, OutboxEntry)],
) -> (Vec<u64>, Option<PublishFailure>) {
    let mut pending = Vec::with_capacity(batch.len());
    let mut broken = None;
    let timeout = shared.options.confirm_timeout;
    let deadline = Instant::now() + timeout;
    for (seq, entry) in batch {
        let started = start_publish(
            channel,
            &entry.exchange,
            &entry.routing_key,
            &entry.body,
            entry.properties.clone(),
        );
        match tokio::time::timeout_at(deadline, started).await {
            Ok(Ok(confirm)) => pending.push((*seq, entry, confirm)),
            Ok(Err(failure)) => {
                broken = Some(failure);
                break;
            }
            Err(_) => {
                broken = Some(PublishFailure::Timeout(timeout));
                break;
            }
        }
    }
    let mut confirmed = Vec::with_capacity(pending.len());
    let mut no_route = None;
    for (seq, entry, confirm) in pending {
        let left = deadline.saturating_duration_since(Instant::now());
        match await_confirm(confirm, &entry.exchange, &entry.routing_key, left).await {
            Ok(()) => confirmed.push(seq),
            // A missing exchange also closed the channel: it counts as broken.
            Err(failure) if failure.breaks_channel() => {
                broken.get_or_insert(failure);
            }
            Err(failure) if failure.retry_soon() => {
                tracing::debug!(seq, %failure, "outbox message not taken; kept for the next try");
                no_route.get_or_insert(failure);
            }
            Err(failure) => {
                tracing::warn!(seq, %failure, "outbox message refused by the broker; kept for the next round");
            }
        }
    }
    match no_route
        .as_ref()
        .or(broken.as_ref().filter(|f| f.route_missing()))
    {
        Some(failure) => shared
            .route
            .missing(failure, &shared.vhost, shared.outbox.len()),
        None if !confirmed.is_empty() => shared.route.found(),
        None => {}
    }
    (confirmed, broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn debug_output_hides_the_password_whatever_its_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, password) in ["x", "ab", "s3cr3t-Pa55word-0123456789"].iter().enumerate() {
            // Port 9 (discard): nothing listens, the publisher starts offline.
            let uri = format!("amqp://notes:{password}@127.0.0.1:9/%2f");
            let mut options = PublisherOptions::new(uri, dir.path().join(format!("{i}.redb")));
            options.connect_timeout = Duration::from_millis(200);
            let shown = format!("{options:?}");
            assert!(!shown.contains(&format!(":{password}@")), "{shown}");
            assert!(
                shown.contains("amqp://notes:***@127.0.0.1:9/%2f"),
                "{shown}"
            );
            let config = LiveConfig::fixed(crate::config::tests::notes());
            let publisher = Publisher::start(options, config)
                .await
                .expect("starts offline");
            let shown = format!("{publisher:?}");
            assert!(!shown.contains(&format!(":{password}@")), "{shown}");
            publisher.close().await;
        }
    }
}
