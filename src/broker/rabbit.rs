//! The real broker: management HTTP API (rabbitmq_http_client) for reading state and
//! policies, AMQP (lapin) for declares, bindings and exact message counts.
//!
//! Both transports are kept open between calls: the HTTP client pools keep-alive
//! connections, and each vhost has one AMQP connection with a small pool of open channels,
//! so an AMQP action costs one round trip instead of three (open, call, close).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use rabbitmq_http_client::api::{Client, ClientBuilder, HttpClientError};
use rabbitmq_http_client::commons::PolicyTarget;
use rabbitmq_http_client::requests::PolicyParams;
use reqwest::Method;
use tokio::sync::{Mutex, OnceCell};

use super::diff::BrokerAction;
use super::inventory::{InventoryBinding, InventoryExchange, InventoryQueue, VhostInventory};
use super::live::{
    BINDING_MARKER, LiveBinding, LiveExchange, LivePolicy, LiveQueue, LiveVhost, MIGRATION_MARKER,
};
use super::mover::Mover;
use super::session::{self, reply, reply_code};
use super::{ActionOutcome, BrokerApi, BrokerEndpoint, BrokerError, QueueDepth};
use crate::plan::topology::ExchangeKind;

/// Bound on every single broker call, so one broken broker never stalls a caller.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The least time a policy write (PUT or DELETE) is given, whatever the call timeout: RabbitMQ
/// re-matches every queue of the vhost against every policy on each policy write, which
/// takes about 27 s in a vhost of 1,000 pipelines on 2 cores (docs/broker.md, "the cost of a
/// policy"). A shorter timeout would fail every policy write of a large vhost, retry it, and
/// never converge.
pub const POLICY_WRITE_TIMEOUT: Duration = Duration::from_secs(180);

/// Open channels kept per vhost connection between calls: more than the CLI's and the
/// operator's concurrency, so a busy reconcile reuses channels instead of opening them.
const MAX_IDLE_CHANNELS: usize = 32;

/// Round trips of an AMQP connection handshake (start, tune, open; TLS adds its own).
const CONNECT_ROUND_TRIPS: u64 = 3;

/// How long a classic queue that looks empty is watched before it is deleted: longer than
/// RabbitMQ's default statistics interval (5 s), so a `basic.get` holder shows.
pub const DEFAULT_DELETE_SETTLE: Duration = Duration::from_secs(6);

/// How long deleting a queue waits for the management API to report figures for it (a
/// queue a few seconds old has none yet; see [`RabbitBroker::queue_stats`]).
const STATS_WAIT: Duration = Duration::from_secs(20);

type HttpApi = Client<String, String, String>;

/// One broker: a pooled HTTP client and one AMQP connection per vhost, made on first use.
pub struct RabbitBroker {
    endpoint: BrokerEndpoint,
    http: HttpApi,
    /// A client for policy writes, which may take far longer than other calls
    /// ([`POLICY_WRITE_TIMEOUT`]).
    policy_http: HttpApi,
    policy_timeout: Duration,
    /// The same pool, for the calls rabbitmq_http_client does not offer (conditional delete,
    /// one queue's raw figures).
    raw_http: reqwest::Client,
    amqp: Mutex<HashMap<String, Arc<VhostConnection>>>,
    /// [`AMQP_IDLE`] unless set.
    amqp_idle: Duration,
    server_major: OnceCell<u32>,
    timeout: Duration,
    /// How long a queue delete waits, after the figures first show the queue empty, before
    /// reading them again (see [`RabbitBroker::with_delete_settle`]).
    delete_settle: Duration,
    /// How a migration moves messages ([`Mover`]).
    mover: Mover,
    round_trips: AtomicU64,
}

/// An AMQP connection nobody checked a channel out of for this long is closed, at the next
/// snapshot or checkout of this broker. Longer than any AMQP call may take
/// ([`DEFAULT_CALL_TIMEOUT`], and the operator's `--broker-timeout` default). A converged
/// fleet's resyncs read the broker over HTTP only, and each vhost connection holds about
/// 1 MiB (lapin's frame buffers, its channels): `make bench-fleet` with 20 vhosts found 2 MiB
/// a vhost in the operator's steady state before this.
pub const AMQP_IDLE: Duration = Duration::from_secs(45);

/// The AMQP connection to one vhost and its open, idle channels.
struct VhostConnection {
    connection: Connection,
    idle: std::sync::Mutex<Vec<Channel>>,
    last_used: std::sync::Mutex<std::time::Instant>,
}

impl VhostConnection {
    fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = std::time::Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    fn take_idle(&self) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        std::iter::from_fn(|| idle.pop()).find(|c| c.status().connected())
    }

    /// Keeps a channel for the next call; one the broker closed is dropped.
    fn give_back(&self, channel: Channel) {
        if channel.status().connected() {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE_CHANNELS {
                idle.push(channel);
            }
        }
    }
}

impl RabbitBroker {
    pub fn new(endpoint: BrokerEndpoint, timeout: Duration) -> Result<Self, BrokerError> {
        install_crypto_provider();
        let http_client = http_client(&endpoint, timeout)?;
        let raw_http = http_client.clone();
        let http = management_client(&endpoint, http_client)?;
        let policy_timeout = timeout.max(POLICY_WRITE_TIMEOUT);
        let policy_http =
            management_client(&endpoint, self::http_client(&endpoint, policy_timeout)?)?;
        Ok(Self {
            endpoint,
            http,
            policy_http,
            policy_timeout,
            raw_http,
            amqp: Mutex::new(HashMap::new()),
            amqp_idle: AMQP_IDLE,
            server_major: OnceCell::new(),
            timeout,
            delete_settle: DEFAULT_DELETE_SETTLE,
            mover: Mover::Auto,
            round_trips: AtomicU64::new(0),
        })
    }

    /// Before deleting a classic queue whose figures show it empty, wait `settle` (default
    /// [`DEFAULT_DELETE_SETTLE`]) and read them again. A classic queue's passive declare does
    /// not count messages a client holds unacknowledged after `basic.get`, and the figures
    /// that do lag by the statistics interval (`collect_statistics_interval`, 5 s by
    /// default): a settle longer than that interval closes the window. Quorum queues need
    /// none: their passive declare counts each such holder as a consumer, exactly.
    pub fn with_delete_settle(mut self, settle: Duration) -> Self {
        self.delete_settle = settle;
        self
    }

    /// How long an unused AMQP connection stays open (default [`AMQP_IDLE`]).
    pub fn with_amqp_idle(mut self, idle: Duration) -> Self {
        self.amqp_idle = idle;
        self
    }

    /// AMQP connections open now (one per vhost in use).
    pub async fn amqp_connections(&self) -> usize {
        self.amqp.lock().await.len()
    }

    /// Closes the AMQP connections unused for longer than [`Self::with_amqp_idle`] (and
    /// than twice the call timeout, so no call is still running on one).
    fn close_idle(&self, connections: &mut HashMap<String, Arc<VhostConnection>>) {
        let limit = self.amqp_idle.max(self.timeout.saturating_mul(2));
        let idle: Vec<String> = connections
            .iter()
            .filter(|(_, c)| c.idle_for() > limit)
            .map(|(vhost, _)| vhost.clone())
            .collect();
        for vhost in idle {
            if let Some(gone) = connections.remove(&vhost)
                && gone.connection.status().connected()
            {
                self.count_round_trips(1);
                tokio::spawn(async move {
                    let bye = gone.connection.close(200, "msgpipe: idle".into());
                    let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
                });
            }
        }
    }

    /// How a migration moves messages (default [`Mover::Auto`]).
    pub fn with_mover(mut self, mover: Mover) -> Self {
        self.mover = mover;
        self
    }

    pub(super) fn mover(&self) -> Mover {
        self.mover
    }

    pub(super) fn delete_settle(&self) -> Duration {
        self.delete_settle
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn endpoint(&self) -> &BrokerEndpoint {
        &self.endpoint
    }

    /// Request/reply exchanges with the broker so far: HTTP requests plus AMQP methods that
    /// wait for a reply (channel opens included; a connection handshake counts 3).
    ///
    /// ```no_run
    /// # async fn demo(broker: &msgpipe::broker::RabbitBroker) -> Result<(), msgpipe::broker::BrokerError> {
    /// use msgpipe::broker::BrokerApi;
    /// let before = broker.round_trips();
    /// broker.snapshot("/").await?;
    /// println!("snapshot took {} round trips", broker.round_trips() - before);
    /// # Ok(()) }
    /// ```
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn count_round_trips(&self, n: u64) {
        self.round_trips.fetch_add(n, Ordering::Relaxed);
    }

    /// Closes every AMQP connection; call before the async runtime goes away.
    pub async fn close(&self) {
        let connections: Vec<Arc<VhostConnection>> =
            self.amqp.lock().await.drain().map(|(_, c)| c).collect();
        for vhost in connections {
            if vhost.connection.status().connected() {
                self.count_round_trips(1);
                let bye = vhost.connection.close(200, "msgpipe done".into());
                let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
            }
        }
    }

    /// Major version of the server (3 or 4), read once.
    pub async fn server_major(&self) -> Result<u32, BrokerError> {
        self.server_major
            .get_or_try_init(|| async {
                let version = self
                    .http_call("read the server version", None, self.http.server_version())
                    .await?;
                Ok(version
                    .split('.')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(3))
            })
            .await
            .copied()
    }

    /// The server's version and the plugins enabled on its nodes (for a MessageBroker's
    /// status); the plugin list needs the `monitoring` tag, and without it comes back empty.
    pub async fn server_info(&self) -> Result<(String, Vec<String>), BrokerError> {
        let version = self
            .http_call("read the server version", None, self.http.server_version())
            .await?;
        let plugins = self
            .http_call(
                "list the enabled plugins",
                None,
                self.http.list_all_cluster_plugins(),
            )
            .await
            .map(|list| list.0)
            .unwrap_or_default();
        Ok((version, plugins))
    }

    /// Creates `vhost` if it does not exist and grants the endpoint's user every permission
    /// on it (a MessageBroker with `createVhosts`). True when it was created.
    pub async fn create_vhost(&self, vhost: &str) -> Result<bool, BrokerError> {
        let exists = self
            .http_call("read the vhost", None, self.http.get_vhost(vhost))
            .await
            .is_ok();
        if exists {
            return Ok(false);
        }
        let params = rabbitmq_http_client::requests::VirtualHostParams::named(vhost);
        self.http_call("create the vhost", None, self.http.create_vhost(&params))
            .await?;
        let user = self.endpoint.username();
        let permissions = rabbitmq_http_client::requests::Permissions {
            user: &user,
            vhost,
            configure: ".*",
            read: ".*",
            write: ".*",
        };
        self.http_call(
            "grant the broker user permissions on the new vhost",
            Some(vhost),
            self.http.declare_permissions(&permissions),
        )
        .await?;
        Ok(true)
    }

    /// The vhost's AMQP connection, (re)connecting when there is none or it is gone.
    async fn vhost_connection(&self, vhost: &str) -> Result<Arc<VhostConnection>, BrokerError> {
        let mut connections = self.amqp.lock().await;
        if let Some(found) = connections.get(vhost)
            && found.connection.status().connected()
        {
            found.touch();
            return Ok(Arc::clone(found));
        }
        connections.remove(vhost);
        self.close_idle(&mut connections);
        let fresh = Arc::new(VhostConnection {
            connection: self.connect(vhost).await?,
            idle: std::sync::Mutex::new(Vec::new()),
            last_used: std::sync::Mutex::new(std::time::Instant::now()),
        });
        connections.insert(vhost.to_string(), Arc::clone(&fresh));
        Ok(fresh)
    }

    /// An open channel of `vhost`: an idle one, or a new one. A connection that cannot open
    /// a channel is half-gone (the broker restarted, say): it is replaced once.
    async fn checkout(&self, vhost: &str) -> Result<(Arc<VhostConnection>, Channel), BrokerError> {
        let vhost_connection = self.vhost_connection(vhost).await?;
        if let Some(channel) = vhost_connection.take_idle() {
            return Ok((vhost_connection, channel));
        }
        let open = vhost_connection.connection.create_channel();
        if let Ok(channel) = self.amqp_call("open a channel", open).await {
            return Ok((vhost_connection, channel));
        }
        {
            let mut connections = self.amqp.lock().await;
            if connections
                .get(vhost)
                .is_some_and(|c| Arc::ptr_eq(c, &vhost_connection))
            {
                connections.remove(vhost);
            }
        }
        let vhost_connection = self.vhost_connection(vhost).await?;
        let open = vhost_connection.connection.create_channel();
        let channel = self.amqp_call("open a channel", open).await?;
        Ok((vhost_connection, channel))
    }

    /// Runs one AMQP method on a pooled channel of `vhost`. The outer error is about getting
    /// a channel or the timeout; the inner one is the broker's answer. The channel goes back
    /// to the pool only after a successful answer: any broker error closes an AMQP channel,
    /// and a timed-out one may still get a late reply.
    async fn on_channel<T, Fut>(
        &self,
        vhost: &str,
        operation: &str,
        call: impl FnOnce(Channel) -> Fut,
    ) -> Result<Result<T, lapin::Error>, BrokerError>
    where
        Fut: Future<Output = Result<T, lapin::Error>>,
    {
        let (vhost_connection, channel) = self.checkout(vhost).await?;
        self.count_round_trips(1);
        let answer = session::bounded(
            &self.endpoint,
            self.timeout,
            operation,
            call(channel.clone()),
        )
        .await?;
        if answer.is_ok() {
            vhost_connection.give_back(channel);
        }
        Ok(answer)
    }

    /// [`Self::on_channel`] for calls whose every broker error is a failure.
    async fn amqp_action<T, Fut>(
        &self,
        vhost: &str,
        action: &BrokerAction,
        call: impl FnOnce(Channel) -> Fut,
    ) -> Result<ActionOutcome, BrokerError>
    where
        Fut: Future<Output = Result<T, lapin::Error>>,
    {
        let operation = action.to_string();
        match self.on_channel(vhost, &operation, call).await? {
            Ok(_) => Ok(ActionOutcome::Done),
            Err(e) => Err(self.amqp_error(&operation, &e)),
        }
    }

    async fn connect(&self, vhost: &str) -> Result<Connection, BrokerError> {
        self.count_round_trips(CONNECT_ROUND_TRIPS);
        let frame_max = Some(DECLARE_FRAME_MAX);
        connect_amqp_framed(&self.endpoint, vhost, self.timeout, "msgpipe", frame_max).await
    }

    async fn amqp_call<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, BrokerError> {
        self.count_round_trips(1);
        session::bounded(&self.endpoint, self.timeout, operation, call)
            .await?
            .map_err(|e| self.amqp_error(operation, &e))
    }

    /// A failed AMQP call, classified by its reply code. The pooled connection may be gone
    /// (the next checkout replaces it), so a broker error without a reply code reads as
    /// "unreachable".
    fn amqp_error(&self, operation: &str, error: &lapin::Error) -> BrokerError {
        session::classify(
            &self.endpoint,
            operation,
            error,
            reply_code(error).is_some(),
        )
    }

    /// Runs one management API call with the timeout and maps its error; `vhost` names the
    /// vhost a 404 means is missing.
    // Not an `async fn`: it hands back the inner future itself, so the call's future is not
    // stored twice (reconcile futures are deep; debug-build test threads have 2 MiB stacks).
    fn http_call<'a, T: 'a>(
        &'a self,
        operation: &'a str,
        vhost: Option<&'a str>,
        call: impl Future<Output = Result<T, HttpClientError>> + 'a,
    ) -> impl Future<Output = Result<T, BrokerError>> + 'a {
        self.http_call_within(self.timeout, operation, vhost, call)
    }

    /// [`Self::http_call`] given `timeout` (a policy write's, on `policy_http`).
    async fn http_call_within<T>(
        &self,
        timeout: Duration,
        operation: &str,
        vhost: Option<&str>,
        call: impl Future<Output = Result<T, HttpClientError>>,
    ) -> Result<T, BrokerError> {
        self.count_round_trips(1);
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(BrokerError::Timeout {
                endpoint: self.endpoint.to_string(),
                operation: operation.into(),
                seconds: timeout.as_secs(),
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.classify_http(operation, vhost, error).await),
        }
    }

    async fn classify_http(
        &self,
        operation: &str,
        vhost: Option<&str>,
        error: HttpClientError,
    ) -> BrokerError {
        let endpoint = self.endpoint.to_string();
        match &error {
            HttpClientError::ClientErrorResponse { status_code, .. }
                if status_code.as_u16() == 401 =>
            {
                self.unauthorized(operation, vhost).await
            }
            HttpClientError::ClientErrorResponse { status_code, .. }
                if status_code.as_u16() == 403 =>
            {
                BrokerError::AccessRefused {
                    endpoint,
                    user: self.endpoint.username(),
                    operation: operation.into(),
                }
            }
            HttpClientError::NotFound => match vhost {
                Some(vhost) => BrokerError::VhostNotFound {
                    endpoint,
                    vhost: vhost.into(),
                },
                None => BrokerError::ManagementUnavailable {
                    endpoint,
                    api: self.endpoint.management_api(),
                    reason: "the API answered 404".into(),
                },
            },
            HttpClientError::RequestError { error: inner, .. }
                if inner.is_connect() || inner.is_timeout() =>
            {
                self.not_connected(inner).await
            }
            other => BrokerError::Rejected {
                endpoint,
                operation: operation.into(),
                reason: self.endpoint.redact(&describe_http_error(other)),
            },
        }
    }

    /// A management call that could not connect (or timed out connecting): a TLS problem or
    /// a broker whose AMQP port is closed too is unreachable; otherwise only its management
    /// API is unavailable.
    async fn not_connected(&self, error: &reqwest::Error) -> BrokerError {
        let endpoint = self.endpoint.to_string();
        let reason = self.endpoint.redact(&error_chain(error));
        let api = self.endpoint.management_api();
        if let Some(problem) = tls_problem(&reason, api.starts_with("https:")) {
            let reason = format!("management API {api}: {problem}");
            BrokerError::Unreachable { endpoint, reason }
        } else if self.amqp_port_open().await {
            BrokerError::ManagementUnavailable {
                endpoint,
                api,
                reason,
            }
        } else {
            BrokerError::Unreachable { endpoint, reason }
        }
    }

    /// RabbitMQ answers 401 both to wrong credentials and to a valid user whose management
    /// tags do not allow the call (writing a policy needs `policymaker`). The user's tags
    /// (`whoami`) or, when the API refuses even that, an AMQP login tell the two apart.
    async fn unauthorized(&self, operation: &str, vhost: Option<&str>) -> BrokerError {
        let endpoint = self.endpoint.to_string();
        let user = self.endpoint.username();
        let whoami = tokio::time::timeout(self.timeout, self.http.current_user()).await;
        let (has, tags) = match whoami {
            Ok(Ok(me)) => {
                let tags: Vec<String> = serde_json::to_value(&me.tags)
                    .ok()
                    .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
                    .unwrap_or_default();
                (format!("tags [{}]", tags.join(", ")), tags)
            }
            _ => {
                let vhost = vhost.map_or_else(|| self.endpoint.uri_vhost(), str::to_string);
                let check = "msgpipe login check";
                match connect_amqp(&self.endpoint, &vhost, self.timeout, check).await {
                    // Logged in (a vhost it may not use still proves the credentials).
                    Ok(connection) => {
                        let bye = connection.close(200, "done".into());
                        let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
                    }
                    Err(BrokerError::VhostNotFound { .. }) => {}
                    Err(_) => return BrokerError::AuthenticationFailed { endpoint, user },
                }
                ("no management tag".to_string(), Vec::new())
            }
        };
        let needed = needed_tag(operation);
        if tags.iter().any(|t| t == "administrator" || t == needed) {
            // The tag is there, so the 401 was about something else.
            return BrokerError::AuthenticationFailed { endpoint, user };
        }
        BrokerError::MissingUserTag {
            endpoint,
            user,
            operation: operation.into(),
            tag: needed,
            has,
        }
    }

    /// Whether the AMQP port answers: tells "broker down" from "management plugin missing".
    async fn amqp_port_open(&self) -> bool {
        let Some(address) = self.endpoint.amqp_address() else {
            return false;
        };
        let probe = tokio::net::TcpStream::connect(address);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Ok(_))
        )
    }

    async fn put_policy(
        &self,
        vhost: &str,
        action: &BrokerAction,
    ) -> Result<ActionOutcome, BrokerError> {
        let BrokerAction::PutPolicy {
            policy, definition, ..
        } = action
        else {
            return Ok(ActionOutcome::Done);
        };
        let params = PolicyParams {
            vhost,
            name: &policy.name,
            pattern: &policy.pattern,
            apply_to: PolicyTarget::Queues,
            priority: policy.priority,
            definition: definition.clone(),
        };
        let operation = format!("put policy {}", policy.name);
        self.http_call_within(
            self.policy_timeout,
            &operation,
            Some(vhost),
            self.policy_http.declare_policy(&params),
        )
        .await?;
        Ok(ActionOutcome::Done)
    }

    /// Deletes `queue` only if it holds no message, ready or unacknowledged, and has no
    /// consumer; then its policy.
    ///
    /// No RabbitMQ version (3.10, 4.0, 4.3 measured) refuses to delete a queue whose
    /// messages a client holds unacknowledged after `basic.get`: `if-empty` counts ready
    /// messages only, `if-unused` consumers only, and quorum queues refuse both flags (over
    /// AMQP by closing the connection). A quorum queue's passive declare does count each
    /// such client as a consumer; a classic queue's does not, and only the management
    /// figures (which lag by the stats interval) show them. So: the exact counts (passive
    /// declare), the figures, for a classic queue the figures again after the settle, the
    /// exact counts again, then the delete, with `if-empty` and `if-unused` for a classic
    /// queue so the broker itself refuses one that got a message or a consumer in between.
    async fn delete_queue_if_empty(
        &self,
        vhost: &str,
        queue: &str,
        policy: Option<&str>,
    ) -> Result<ActionOutcome, BrokerError> {
        let Some(depth) = BrokerApi::queue_depth(self, vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if depth.messages > 0 || depth.consumers > 0 {
            return Ok(ActionOutcome::Kept(depth));
        }
        let Some(stats) = self.queue_stats(vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if stats.held() {
            return Ok(ActionOutcome::Kept(stats.depth()));
        }
        if stats.classic && !self.delete_settle.is_zero() {
            tokio::time::sleep(self.delete_settle).await;
            match self.queue_stats(vhost, queue).await? {
                None => return Ok(ActionOutcome::Gone),
                Some(later) if later.held() => return Ok(ActionOutcome::Kept(later.depth())),
                Some(_) => {}
            }
        }
        let Some(depth) = BrokerApi::queue_depth(self, vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if depth.messages > 0 || depth.consumers > 0 {
            return Ok(ActionOutcome::Kept(depth));
        }
        if !self
            .delete_queue_guarded(vhost, queue, stats.classic)
            .await?
        {
            let depth = BrokerApi::queue_depth(self, vhost, queue)
                .await?
                .unwrap_or(depth);
            return Ok(ActionOutcome::Kept(depth));
        }
        if let Some(policy) = policy {
            let operation = format!("delete policy {policy}");
            self.http_call_within(
                self.policy_timeout,
                &operation,
                Some(vhost),
                self.policy_http.delete_policy(vhost, policy, true),
            )
            .await?;
        }
        Ok(ActionOutcome::Done)
    }

    /// One queue's figures from the management API, waiting (up to [`STATS_WAIT`]) for a
    /// queue too young to have any; None if the queue is gone. Without figures after the
    /// wait (statistics turned off on the broker), the queue counts as holding nothing.
    pub(super) async fn queue_stats(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<Option<QueueStats>, BrokerError> {
        let url = format!(
            "{}/queues/{}/{}",
            self.endpoint.management_api(),
            encode(vhost),
            encode(queue)
        );
        let operation = format!("read the figures of queue {queue}");
        let deadline = tokio::time::Instant::now() + STATS_WAIT;
        loop {
            let response = self.raw_request(Method::GET, &url, &operation).await?;
            let status = response.status().as_u16();
            if status == 404 {
                return Ok(None);
            }
            let body = response.text().await.unwrap_or_default();
            if !(200..300).contains(&status) {
                return Err(self.raw_error(&operation, vhost, status, &body).await);
            }
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let stats = QueueStats::from_json(&value);
            if stats.has_figures || tokio::time::Instant::now() >= deadline {
                return Ok(Some(stats));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The delete itself; false when the broker refused it because the queue is not empty
    /// or in use (classic queues only: quorum queues refuse the flags themselves).
    pub(super) async fn delete_queue_guarded(
        &self,
        vhost: &str,
        queue: &str,
        classic: bool,
    ) -> Result<bool, BrokerError> {
        self.delete_queue_checked(vhost, queue, classic, true).await
    }

    /// [`Self::delete_queue_guarded`]; `if_unused` false lets a classic queue with consumers
    /// go (a migration's drained queue: its consumers are told and follow the new queue).
    pub(super) async fn delete_queue_checked(
        &self,
        vhost: &str,
        queue: &str,
        classic: bool,
        if_unused: bool,
    ) -> Result<bool, BrokerError> {
        let mut url = format!(
            "{}/queues/{}/{}",
            self.endpoint.management_api(),
            encode(vhost),
            encode(queue)
        );
        if classic {
            url.push_str("?if-empty=true");
            if if_unused {
                url.push_str("&if-unused=true");
            }
        }
        let operation = format!("delete queue {queue}");
        let response = self.raw_request(Method::DELETE, &url, &operation).await?;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        match status {
            200..=299 | 404 => Ok(true),
            400 if classic => Ok(false),
            _ => Err(self.raw_error(&operation, vhost, status, &body).await),
        }
    }

    /// One of a vhost's lists (`exchanges`, `queues`, `bindings`) with only the fields msgpipe
    /// reads, through the management API's `columns` parameter, which rabbitmq_http_client
    /// does not offer. The full rows of a quorum queue carry some 45 fields (members, leader,
    /// rates): in a vhost of 1,000 pipelines the full queue list is 7.6 MB and takes 3.9 s
    /// to read, these columns 1.5 MB and 2.3 s, and the operator holds the response while it
    /// parses it (docs/broker.md, "Many pipelines in one vhost").
    async fn list_columns<T: serde::de::DeserializeOwned>(
        &self,
        list: &str,
        vhost: &str,
        columns: &str,
    ) -> Result<Vec<T>, BrokerError> {
        let url = format!(
            "{}/{list}/{}?columns={columns}",
            self.endpoint.management_api(),
            encode(vhost)
        );
        let operation = format!("list {list}");
        let response = self.raw_request(Method::GET, &url, &operation).await?;
        let status = response.status().as_u16();
        if status == 404 {
            return Err(BrokerError::VhostNotFound {
                endpoint: self.endpoint.to_string(),
                vhost: vhost.into(),
            });
        }
        if !(200..300).contains(&status) {
            let body = response.text().await.unwrap_or_default();
            return Err(self.raw_error(&operation, vhost, status, &body).await);
        }
        let unreadable = |reason: String| BrokerError::ManagementUnavailable {
            endpoint: self.endpoint.to_string(),
            api: self.endpoint.management_api(),
            reason: self.endpoint.redact(&format!("{operation}: {reason}")),
        };
        let body = response
            .bytes()
            .await
            .map_err(|error| unreadable(error_chain(&error)))?;
        serde_json::from_slice(&body)
            .map_err(|error| unreadable(format!("unexpected answer: {error}")))
    }

    /// Everything `msgpipe import` needs of `vhost`, read once (four lists and the server
    /// version, at once) and never written: every exchange, every queue with all of its
    /// arguments and the policies the broker applies to it, every queue binding with its
    /// arguments, every policy.
    pub async fn inventory(&self, vhost: &str) -> Result<VhostInventory, BrokerError> {
        let (server_version, exchanges, queues, bindings, policies) = tokio::try_join!(
            self.http_call("read the server version", None, self.http.server_version()),
            self.list_columns::<InventoryExchangeRow>(
                "exchanges",
                vhost,
                InventoryExchangeRow::COLUMNS
            ),
            self.list_columns::<InventoryQueueRow>("queues", vhost, InventoryQueueRow::COLUMNS),
            self.list_columns::<BindingRow>("bindings", vhost, BindingRow::COLUMNS),
            self.http_call(
                "list policies",
                Some(vhost),
                self.http.list_policies_in(vhost)
            ),
        )?;
        let named = |name: Option<String>| name.filter(|n| !n.is_empty());
        let mut inventory = VhostInventory {
            vhost: vhost.to_string(),
            server_version,
            exchanges: exchanges
                .into_iter()
                .map(|e| {
                    let exchange = InventoryExchange {
                        kind: e.kind,
                        durable: e.durable,
                        auto_delete: e.auto_delete,
                        internal: e.internal,
                    };
                    (e.name, exchange)
                })
                .collect(),
            queues: queues
                .into_iter()
                .map(|q| {
                    let exclusive = q.exclusive.as_ref().and_then(serde_json::Value::as_bool)
                        == Some(true)
                        || q.owner_pid_details.as_ref().is_some_and(|v| !v.is_null());
                    let queue = InventoryQueue {
                        queue_type: if q.kind.is_empty() {
                            "classic".into()
                        } else {
                            q.kind
                        },
                        durable: q.durable,
                        auto_delete: q.auto_delete,
                        exclusive,
                        arguments: q.arguments,
                        policy: named(q.policy),
                        operator_policy: named(q.operator_policy),
                        messages: q.messages,
                        consumers: q.consumers,
                    };
                    (q.name, queue)
                })
                .collect(),
            bindings: bindings
                .into_iter()
                // The default exchange's implicit bindings cannot be changed; leave them out.
                .filter(|b| !b.source.is_empty() && b.destination_type == "queue")
                .map(|b| InventoryBinding {
                    source: b.source,
                    destination: b.destination,
                    routing_key: b.routing_key,
                    arguments: b.arguments,
                })
                .collect(),
            policies: policies
                .into_iter()
                .map(|p| {
                    let apply_to = serde_json::to_value(p.apply_to)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    let policy = LivePolicy {
                        pattern: p.pattern,
                        apply_to,
                        priority: i64::from(p.priority),
                        definition: p.definition.0.unwrap_or_default(),
                    };
                    (p.name, policy)
                })
                .collect(),
        };
        inventory.match_policies();
        Ok(inventory)
    }

    /// One management API call rabbitmq_http_client does not offer: counted, authenticated,
    /// bounded by the call timeout, its failure to connect classified.
    pub(super) async fn raw_request(
        &self,
        method: Method,
        url: &str,
        operation: &str,
    ) -> Result<reqwest::Response, BrokerError> {
        self.count_round_trips(1);
        let request = self
            .raw_http
            .request(method, url)
            .basic_auth(self.endpoint.username(), Some(self.endpoint.password()))
            .send();
        self.raw_call(operation, request).await
    }

    /// A PUT of a JSON body (a shovel's runtime parameter), as [`Self::raw_request`].
    pub(super) async fn raw_put_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        operation: &str,
    ) -> Result<reqwest::Response, BrokerError> {
        self.count_round_trips(1);
        let request = self
            .raw_http
            .put(url)
            .basic_auth(self.endpoint.username(), Some(self.endpoint.password()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send();
        self.raw_call(operation, request).await
    }

    async fn raw_call(
        &self,
        operation: &str,
        request: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
    ) -> Result<reqwest::Response, BrokerError> {
        match tokio::time::timeout(self.timeout, request).await {
            Err(_) => Err(BrokerError::Timeout {
                endpoint: self.endpoint.to_string(),
                operation: operation.into(),
                seconds: self.timeout.as_secs(),
            }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if error.is_connect() || error.is_timeout() => {
                Err(self.not_connected(&error).await)
            }
            Ok(Err(error)) => Err(BrokerError::ManagementUnavailable {
                endpoint: self.endpoint.to_string(),
                api: self.endpoint.management_api(),
                reason: self.endpoint.redact(&error_chain(&error)),
            }),
        }
    }

    pub(super) async fn raw_error(
        &self,
        operation: &str,
        vhost: &str,
        status: u16,
        body: &str,
    ) -> BrokerError {
        match status {
            401 => self.unauthorized(operation, Some(vhost)).await,
            403 => BrokerError::AccessRefused {
                endpoint: self.endpoint.to_string(),
                user: self.endpoint.username(),
                operation: operation.into(),
            },
            _ => {
                let reason = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_string))
                    .unwrap_or_default();
                BrokerError::Rejected {
                    endpoint: self.endpoint.to_string(),
                    operation: operation.into(),
                    reason: self.endpoint.redact(&format!("HTTP {status} {reason}")),
                }
            }
        }
    }
}

/// An exchange as [`RabbitBroker::snapshot`] reads it.
#[derive(serde::Deserialize)]
struct ExchangeRow {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    durable: bool,
}

impl ExchangeRow {
    const COLUMNS: &str = "name,type,durable";
}

/// A queue as [`RabbitBroker::snapshot`] reads it; a queue too young to have figures has no
/// `messages` or `consumers` yet.
#[derive(serde::Deserialize)]
struct QueueRow {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    durable: bool,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    messages: u64,
    #[serde(default)]
    consumers: u64,
}

impl QueueRow {
    const COLUMNS: &str = "name,type,durable,arguments,messages,consumers";
}

/// A binding as [`RabbitBroker::snapshot`] reads it.
#[derive(serde::Deserialize)]
struct BindingRow {
    source: String,
    destination: String,
    destination_type: String,
    routing_key: String,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
}

impl BindingRow {
    const COLUMNS: &str = "source,destination,destination_type,routing_key,arguments";
}

/// An exchange as [`RabbitBroker::inventory`] reads it.
#[derive(serde::Deserialize)]
struct InventoryExchangeRow {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
}

impl InventoryExchangeRow {
    const COLUMNS: &str = "name,type,durable,auto_delete,internal";
}

/// A queue as [`RabbitBroker::inventory`] reads it: every argument, and the policies the
/// broker applies to it.
#[derive(serde::Deserialize)]
struct InventoryQueueRow {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    /// `true` for a queue its declaring connection owns (read as a value: its shape has
    /// varied across versions).
    #[serde(default)]
    exclusive: Option<serde_json::Value>,
    #[serde(default)]
    owner_pid_details: Option<serde_json::Value>,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    operator_policy: Option<String>,
    #[serde(default)]
    messages: u64,
    #[serde(default)]
    consumers: u64,
}

impl InventoryQueueRow {
    const COLUMNS: &str = "name,type,durable,auto_delete,exclusive,owner_pid_details,arguments,policy,operator_policy,messages,consumers";
}

/// One queue's figures as the management API reports them (they lag by the stats interval).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct QueueStats {
    pub(super) classic: bool,
    has_figures: bool,
    pub(super) ready: u64,
    pub(super) unacknowledged: u64,
    /// Ready + unacknowledged, and for a quorum queue also those waiting to be dead-lettered.
    pub(super) messages: u64,
    consumers: u64,
}

impl QueueStats {
    fn from_json(value: &serde_json::Value) -> Self {
        let count = |key: &str| value[key].as_u64();
        Self {
            classic: value["type"].as_str().is_none_or(|t| t == "classic"),
            has_figures: count("messages").is_some() || count("messages_unacknowledged").is_some(),
            ready: count("messages_ready").unwrap_or(0),
            unacknowledged: count("messages_unacknowledged").unwrap_or(0),
            messages: count("messages").unwrap_or(0),
            consumers: count("consumers").unwrap_or(0),
        }
    }

    fn held(&self) -> bool {
        self.messages > 0 || self.unacknowledged > 0 || self.consumers > 0
    }

    pub(super) fn depth(&self) -> QueueDepth {
        QueueDepth {
            messages: self.messages.max(self.ready + self.unacknowledged),
            consumers: self.consumers,
        }
    }
}

pub(super) fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl BrokerApi for RabbitBroker {
    async fn snapshot(&self, vhost: &str) -> Result<LiveVhost, BrokerError> {
        // Not worth waiting for: a checkout may hold the map while it connects.
        if let Ok(mut connections) = self.amqp.try_lock() {
            self.close_idle(&mut connections);
        }
        let (server_major, exchanges, queues, bindings, policies) = tokio::try_join!(
            self.server_major(),
            self.list_columns::<ExchangeRow>("exchanges", vhost, ExchangeRow::COLUMNS),
            self.list_columns::<QueueRow>("queues", vhost, QueueRow::COLUMNS),
            self.list_columns::<BindingRow>("bindings", vhost, BindingRow::COLUMNS),
            self.http_call(
                "list policies",
                Some(vhost),
                self.http.list_policies_in(vhost)
            ),
        )?;
        // Each map is collected, not filled by inserts: a B-tree built from an iterator is
        // built sorted, with full nodes, where inserts in name order leave them half empty
        // (a snapshot of a vhost of 1,000 pipelines holds 17,000 entries).
        let live = LiveVhost {
            server_major,
            exchanges: exchanges
                .into_iter()
                .map(|e| {
                    let exchange = LiveExchange {
                        kind: e.kind,
                        durable: e.durable,
                    };
                    (e.name, exchange)
                })
                .collect(),
            queues: queues
                .into_iter()
                .map(|q| {
                    let queue = LiveQueue {
                        queue_type: q.kind,
                        durable: q.durable,
                        messages: q.messages,
                        consumers: q.consumers,
                        dead_letters_to: LiveQueue::dead_letters_to(&q.arguments),
                        migrating_to: LiveQueue::migrating_to(&q.arguments),
                        declared: LiveQueue::declared_settings(&q.arguments),
                    };
                    (q.name, queue)
                })
                .collect(),
            bindings: LiveVhost::binding_map(
                bindings
                    .into_iter()
                    // The default exchange's implicit bindings cannot be changed; leave them out.
                    .filter(|b| !b.source.is_empty() && b.destination_type == "queue")
                    .map(|b| {
                        let owned = b.arguments.contains_key(BINDING_MARKER);
                        let binding = LiveBinding {
                            source: b.source,
                            destination: b.destination,
                            routing_key: b.routing_key,
                        };
                        (binding, owned)
                    }),
            ),
            policies: policies
                .into_iter()
                .map(|p| {
                    let apply_to = serde_json::to_value(p.apply_to)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    let policy = LivePolicy {
                        pattern: p.pattern,
                        apply_to,
                        priority: i64::from(p.priority),
                        definition: p.definition.0.unwrap_or_default(),
                    };
                    (p.name, policy)
                })
                .collect(),
        };
        Ok(live)
    }

    async fn execute(
        &self,
        vhost: &str,
        action: &BrokerAction,
    ) -> Result<ActionOutcome, BrokerError> {
        match action {
            BrokerAction::PutPolicy { .. } => self.put_policy(vhost, action).await,
            BrokerAction::DeleteQueueIfEmpty { queue, policy } => {
                self.delete_queue_if_empty(vhost, queue, policy.as_deref())
                    .await
            }
            BrokerAction::DeclareExchange(exchange) => {
                let kind = match exchange.kind {
                    ExchangeKind::Direct => lapin::ExchangeKind::Direct,
                    ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
                };
                let options = ExchangeDeclareOptions {
                    durable: exchange.durable,
                    ..Default::default()
                };
                self.amqp_action(vhost, action, async |channel| {
                    let name = exchange.name.as_str().into();
                    channel
                        .exchange_declare(name, kind, options, FieldTable::default())
                        .await
                })
                .await
            }
            BrokerAction::DeclareQueue(queue) => {
                let mut arguments = FieldTable::default();
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(queue.queue_type.as_str().into()),
                );
                for (key, value) in queue.arguments.declare_arguments() {
                    arguments.insert(key.into(), amqp_value(&value));
                }
                if let Some(target) = queue.migrating_to {
                    arguments.insert(
                        MIGRATION_MARKER.into(),
                        AMQPValue::LongString(target.as_str().into()),
                    );
                }
                let options = QueueDeclareOptions {
                    durable: queue.durable,
                    ..Default::default()
                };
                self.amqp_action(vhost, action, async |channel| {
                    let name = queue.name.as_str().into();
                    channel.queue_declare(name, options, arguments).await
                })
                .await
            }
            BrokerAction::Bind(binding) => {
                self.amqp_action(vhost, action, async |channel| {
                    channel
                        .queue_bind(
                            binding.destination.as_str().into(),
                            binding.source.as_str().into(),
                            binding.routing_key.as_str().into(),
                            QueueBindOptions::default(),
                            marker(),
                        )
                        .await
                })
                .await
            }
            // Both forms: marked (made by this version) and unmarked (made before).
            BrokerAction::Unbind(binding) => {
                self.amqp_action(vhost, action, async |channel| {
                    for arguments in [marker(), FieldTable::default()] {
                        channel
                            .queue_unbind(
                                binding.destination.as_str().into(),
                                binding.source.as_str().into(),
                                binding.routing_key.as_str().into(),
                                arguments,
                            )
                            .await?;
                    }
                    Ok(())
                })
                .await
            }
            BrokerAction::DeleteExchange { exchange } => {
                BrokerApi::delete_exchange(self, vhost, exchange).await?;
                Ok(ActionOutcome::Done)
            }
            BrokerAction::Keep { .. } => Ok(ActionOutcome::Done),
        }
    }

    async fn queue_depth(
        &self,
        vhost: &str,
        queue: &str,
    ) -> Result<Option<QueueDepth>, BrokerError> {
        let operation = format!("count messages in {queue}");
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let answer = self
            .on_channel(vhost, &operation, async |channel| {
                channel
                    .queue_declare(queue.into(), options, FieldTable::default())
                    .await
            })
            .await?;
        match answer {
            Ok(declared) => Ok(Some(QueueDepth {
                messages: u64::from(declared.message_count()),
                consumers: u64::from(declared.consumer_count()),
            })),
            // A passive declare of a missing queue is refused with 404 NOT_FOUND.
            Err(e) if reply_code(&e) == Some(reply::NOT_FOUND) => Ok(None),
            Err(e) => Err(self.amqp_error(&operation, &e)),
        }
    }

    async fn delete_exchange(&self, vhost: &str, exchange: &str) -> Result<(), BrokerError> {
        let operation = format!("delete exchange {exchange}");
        self.http_call(
            &operation,
            Some(vhost),
            self.http.delete_exchange(vhost, exchange, true),
        )
        .await
    }
}

/// A keep-alive HTTP client for the management API whose calls end after `timeout`.
fn http_client(
    endpoint: &BrokerEndpoint,
    timeout: Duration,
) -> Result<reqwest::Client, BrokerError> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(16)
        // The management listener (cowboy) closes a keep-alive connection that waits 5 s
        // for its next request; one kept longer fails the request that reuses it
        // ("connection closed before message completed").
        .pool_idle_timeout(Duration::from_secs(4));
    if let Some(pem) = endpoint.ca_pem() {
        let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
            BrokerError::InvalidUri {
                field: "ca.crt",
                reason: format!("not a PEM certificate: {e}"),
            }
        })?;
        builder = builder.add_root_certificate(ca);
    }
    builder.build().map_err(|e| BrokerError::InvalidUri {
        field: "managementUri",
        reason: e.to_string(),
    })
}

fn management_client(
    endpoint: &BrokerEndpoint,
    client: reqwest::Client,
) -> Result<HttpApi, BrokerError> {
    ClientBuilder::new()
        .with_endpoint(endpoint.management_api())
        .with_basic_auth_credentials(endpoint.username(), endpoint.password())
        .with_client(client)
        .build()
        .map_err(|e| BrokerError::InvalidUri {
            field: "managementUri",
            reason: endpoint.redact(&e.to_string()),
        })
}

/// A declare argument's value on the wire (msgpipe's settings are strings and integers).
fn amqp_value(value: &serde_json::Value) -> AMQPValue {
    match value {
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        serde_json::Value::Bool(b) => AMQPValue::Boolean(*b),
        serde_json::Value::String(text) => AMQPValue::LongString(text.as_str().into()),
        other => AMQPValue::LongString(other.to_string().into()),
    }
}

/// The arguments marking a binding as msgpipe's ([`BINDING_MARKER`]).
fn marker() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(BINDING_MARKER.into(), AMQPValue::Boolean(true));
    arguments
}

/// One AMQP connection to `vhost`, bounded by `timeout`, with its failure classified
/// (credentials, vhost, TLS, reachability) and the password redacted. No auto-recovery:
/// callers open channels on demand and reconnect when the connection is gone, so a dead
/// broker never leaves a retry loop running.
pub async fn connect_amqp(
    endpoint: &BrokerEndpoint,
    vhost: &str,
    timeout: Duration,
    connection_name: &str,
) -> Result<Connection, BrokerError> {
    connect_amqp_framed(endpoint, vhost, timeout, connection_name, None).await
}

/// The largest frame of msgpipe's own declare connections. lapin keeps a receive and a send
/// buffer of 32 frames per connection, so RabbitMQ's default `frame_max` (128 KiB) costs 8
/// MiB per connection, held for its life; a declare, a bind or a broker's error reply is
/// well under 1 KiB, so 16 KiB frames cost 1 MiB and change nothing else. Connections that
/// move messages (the DLQ tools) keep the broker's default.
const DECLARE_FRAME_MAX: u32 = 16 * 1024;

/// [`connect_amqp`], with frames of at most `frame_max` bytes when given (and the user's URI
/// does not ask for a size itself).
async fn connect_amqp_framed(
    endpoint: &BrokerEndpoint,
    vhost: &str,
    timeout: Duration,
    connection_name: &str,
    frame_max: Option<u32>,
) -> Result<Connection, BrokerError> {
    install_crypto_provider();
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: endpoint.ca_pem().map(str::to_string),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| BrokerError::Unreachable {
        endpoint: endpoint.to_string(),
        reason: format!(
            "cannot start the AMQP runtime: {}",
            endpoint.redact(&e.to_string())
        ),
    })?;
    let uri = endpoint.amqp_uri_for(vhost, frame_max);
    let connect = Connection::connect_with_config(&uri, properties, tls, runtime);
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(BrokerError::Timeout {
            endpoint: endpoint.to_string(),
            operation: "connect over AMQP".into(),
            seconds: timeout.as_secs(),
        }),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(classify_amqp_connect(endpoint, vhost, &e)),
    }
}

fn classify_amqp_connect(
    endpoint: &BrokerEndpoint,
    vhost: &str,
    error: &lapin::Error,
) -> BrokerError {
    let text = endpoint.redact(&error.to_string());
    match reply_code(error) {
        // Login refused (wrong user or password, or a mechanism the user may not use).
        Some(reply::ACCESS_REFUSED) => BrokerError::AuthenticationFailed {
            endpoint: endpoint.to_string(),
            user: endpoint.username(),
        },
        // The vhost does not exist, or the user has no permissions on it.
        Some(reply::NOT_ALLOWED) => BrokerError::VhostNotFound {
            endpoint: endpoint.to_string(),
            vhost: vhost.into(),
        },
        _ => BrokerError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: tls_problem(&text, endpoint.is_tls()).unwrap_or(text),
        },
    }
}

/// The management user tag a call needs: writing or deleting policies needs `policymaker`;
/// reading needs `monitoring` or `management` (msgpipe's reads work with `management`).
fn needed_tag(operation: &str) -> &'static str {
    if operation.contains("policy") {
        "policymaker"
    } else {
        "management"
    }
}

/// rustls needs one process-wide crypto provider; kube, lapin and reqwest enable two.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The error text with a hint, when a connection failed for a TLS reason: an untrusted
/// certificate, or a TLS client and a plain-text listener (either way round).
fn tls_problem(text: &str, tls: bool) -> Option<String> {
    let lower = text.to_lowercase();
    let hint = if lower.contains("certificate") {
        "the broker's TLS certificate is not trusted: give the CA that signed it as ca.crt (--ca-file)"
    } else if tls && (lower.contains("invalidcontenttype") || lower.contains("corrupt message")) {
        "the TLS handshake failed: is this port a plain-text listener? (amqp:// / http://)"
    } else if !tls && lower.contains("parsing error") {
        "the answer is not AMQP: is this port a TLS listener? (amqps://)"
    } else {
        return None;
    };
    Some(format!("{hint}; {text}"))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn describe_http_error(error: &HttpClientError) -> String {
    match error {
        HttpClientError::ClientErrorResponse {
            status_code, body, ..
        }
        | HttpClientError::ServerErrorResponse {
            status_code, body, ..
        } => {
            let reason = body
                .as_deref()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                .and_then(|v| v["reason"].as_str().map(str::to_string))
                .unwrap_or_default();
            format!(
                "HTTP {status_code} {}",
                reason.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        }
        other => error_chain(other),
    }
}
