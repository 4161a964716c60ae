//! Brokers shared by every pipeline that names them: one client (HTTP pool + AMQP
//! connections) per broker, a short-lived vhost snapshot shared by pipelines reconciled
//! together, so a resync of a thousand pipelines on one vhost reads it a few times, not a
//! thousand, and the broker work of pipelines reconciled together run as one batch per vhost
//! ([`super::batch`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::broker::{
    BrokerApi, BrokerEndpoint, BrokerError, LiveVhost, MemoryBroker, RabbitBroker,
};

/// How long a snapshot may be reused. The management API's own counts lag ~5 s, so a
/// snapshot this young is as fresh as a new one.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(3);
/// The longest a snapshot is ever reused: one that took long to read is reused for ten
/// times its read time ([`reuse_for`]). A vhost of 1,000 pipelines (6,000 queues) takes
/// seconds to read, and while one reconcile reads it every other one on that vhost waits: with
/// a 3 s limit a burst of new pipelines spent a third of its time waiting for re-reads.
/// A reconcile still never uses a snapshot older than its own last write.
pub const SNAPSHOT_MAX_REUSE: Duration = Duration::from_secs(30);

/// How long a snapshot that took `took` to read may be reused.
pub fn reuse_for(took: Duration) -> Duration {
    took.saturating_mul(10)
        .clamp(SNAPSHOT_MAX_AGE, SNAPSHOT_MAX_REUSE)
}
/// A broker nobody used for this long is closed (e.g. after a credential rotation).
const IDLE_BROKER: Duration = Duration::from_secs(30 * 60);
/// Pipelines of one vhost whose broker work runs at once within a batch (each with up to
/// 8 broker calls in flight): the concurrency of `msgpipe apply`.
pub const BROKER_CONCURRENCY: usize = 8;
/// A broker that could not be reached is reported down, without a new connect, for this long.
pub const DOWN_MEMORY: Duration = Duration::from_secs(15);
/// How long a reconcile waits for another one's first call to a broker before it leaves
/// (a broker that answers at all answers a snapshot well within this).
pub const PROBE_PATIENCE: Duration = Duration::from_millis(300);
const PROBE_POLL: Duration = Duration::from_millis(20);
/// A broker known to answer, whose oldest outstanding read has gone unanswered this long,
/// takes no more reconciles until it answers or fails: a broker that dies while in use holds
/// the workers that reached it in this window, not every worker for a whole timeout.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(2);

/// Empties `slot` once `snapshot` may no longer be reused (unless a newer one took its
/// place): a snapshot of a vhost of 1,000 pipelines is megabytes, and a converged fleet
/// would otherwise keep one per vhost between resyncs for nothing.
fn forget_after(slot: Arc<Mutex<Snapshot>>, snapshot: &Arc<LiveVhost>, reuse: Duration) {
    let held = Arc::downgrade(snapshot);
    tokio::spawn(async move {
        tokio::time::sleep(reuse).await;
        let mut cached = slot.lock().await;
        if cached
            .as_ref()
            .is_some_and(|(_, _, live)| std::ptr::eq(Arc::as_ptr(live), held.as_ptr()))
        {
            *cached = None;
        }
    });
}

/// When a snapshot was taken, how long it may be reused, and the snapshot.
type Snapshot = Option<(Instant, Duration, Arc<LiveVhost>)>;
/// Keyed by (broker pool key, vhost).
type SnapshotSlots = HashMap<(String, String), Arc<Mutex<Snapshot>>>;

/// A broker client the pool can hold: RabbitMQ in the operator, [`MemoryBroker`] in tests.
pub trait PooledBroker: BrokerApi + crate::broker::MigrationBroker + 'static {
    /// Closes its connections (idle eviction, shutdown).
    fn close(&self) -> impl Future<Output = ()> + Send;
    /// Creates a vhost the operator may create (a MessageBroker's `createVhosts`) and gives
    /// its own user every permission there; true when it was created.
    fn create_vhost(&self, vhost: &str) -> impl Future<Output = Result<bool, BrokerError>> + Send;
}

impl PooledBroker for RabbitBroker {
    fn close(&self) -> impl Future<Output = ()> + Send {
        RabbitBroker::close(self)
    }

    fn create_vhost(&self, vhost: &str) -> impl Future<Output = Result<bool, BrokerError>> + Send {
        RabbitBroker::create_vhost(self, vhost)
    }
}

impl PooledBroker for MemoryBroker {
    async fn close(&self) {}

    async fn create_vhost(&self, vhost: &str) -> Result<bool, BrokerError> {
        Ok(MemoryBroker::create_vhost(self, vhost))
    }
}

/// Makes the client of an endpoint (no IO: clients connect on first use).
pub type Connector<B> =
    Box<dyn Fn(&BrokerEndpoint, Duration) -> Result<Arc<B>, BrokerError> + Send + Sync>;

struct Pooled<B> {
    broker: Arc<B>,
    last_used: Instant,
}

/// What the pool knows about whether an endpoint answers.
#[derive(Debug)]
enum Health {
    /// Its last read got an answer; `unanswered` is when the oldest read begun since then
    /// started, if one is still out.
    Answering { unanswered: Option<Instant> },
    /// One reconcile is making the first call after a failure (or ever); since when.
    Probing(Instant),
    /// It did not answer at this time; pipelines are told so without a new connect.
    Down(Instant, BrokerError),
}

/// Whether a reconcile may call a broker now.
#[derive(Debug)]
pub enum Gate {
    /// Go on (and report the outcome with [`BrokerPool::answered`] / [`BrokerPool::failed`]).
    Open,
    /// The endpoint failed recently: this is its error, as reported then.
    Down(BrokerError),
    /// Another reconcile's first call to the endpoint has not come back yet: look again
    /// later, without holding a worker while it times out.
    Busy,
}

/// The operator's brokers, their cached vhost snapshots and what is known of their health.
pub struct BrokerPool<B: PooledBroker = RabbitBroker> {
    timeout: Duration,
    concurrency: usize,
    connect: Connector<B>,
    brokers: Mutex<HashMap<String, Pooled<B>>>,
    snapshots: Mutex<SnapshotSlots>,
    pub(super) batches: std::sync::Mutex<HashMap<(String, String), super::batch::Queue>>,
    health: std::sync::Mutex<HashMap<String, Health>>,
}

impl BrokerPool<RabbitBroker> {
    pub fn new(timeout: Duration, concurrency: usize) -> Self {
        Self::with_connector(
            timeout,
            concurrency,
            Box::new(|endpoint, timeout| {
                RabbitBroker::new(endpoint.clone(), timeout).map(Arc::new)
            }),
        )
    }
}

impl<B: PooledBroker> BrokerPool<B> {
    /// A pool whose clients `connect` makes; the broker work of a batch runs `concurrency`
    /// pipelines at a time.
    pub fn with_connector(timeout: Duration, concurrency: usize, connect: Connector<B>) -> Self {
        Self {
            timeout,
            concurrency: concurrency.max(1),
            connect,
            brokers: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
            batches: std::sync::Mutex::new(HashMap::new()),
            health: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The client for `endpoint`, made on first use.
    pub async fn broker(&self, endpoint: &BrokerEndpoint) -> Result<Arc<B>, BrokerError> {
        let key = endpoint.pool_key();
        let now = Instant::now();
        let mut brokers = self.brokers.lock().await;
        let idle: Vec<String> = brokers
            .iter()
            .filter(|(k, b)| **k != key && now.duration_since(b.last_used) > IDLE_BROKER)
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            if let Some(old) = brokers.remove(&key) {
                tokio::spawn(async move { old.broker.close().await });
            }
        }
        if let Some(pooled) = brokers.get_mut(&key) {
            pooled.last_used = now;
            return Ok(pooled.broker.clone());
        }
        let broker = (self.connect)(endpoint, self.timeout)?;
        brokers.insert(
            key,
            Pooled {
                broker: broker.clone(),
                last_used: now,
            },
        );
        Ok(broker)
    }

    /// Whether a reconcile may call `endpoint` now. An endpoint that failed within
    /// [`DOWN_MEMORY`] is reported down at once; while one reconcile makes the first call
    /// after a failure (or ever), the others wait for its answer until that call is
    /// [`PROBE_PATIENCE`] old and are then told to come back, so a broker that times out
    /// holds one worker for the timeout, not all of them. A broker that answered before but
    /// has left a read unanswered for [`SILENCE_LIMIT`] turns newcomers away the same way.
    pub async fn gate(&self, endpoint: &BrokerEndpoint) -> Gate {
        let key = endpoint.pool_key();
        loop {
            match self.look(&key) {
                Some(gate) => return gate,
                None => tokio::time::sleep(PROBE_POLL).await,
            }
        }
    }

    /// One look at `key`'s health: a verdict, or None to wait and look again.
    fn look(&self, key: &str) -> Option<Gate> {
        let mut health = self.health_map();
        let now = Instant::now();
        match health.get(key) {
            // A broker that went silent: nobody else joins the reads waiting for it.
            Some(Health::Answering {
                unanswered: Some(since),
            }) if now.duration_since(*since) >= SILENCE_LIMIT => Some(Gate::Busy),
            Some(Health::Answering { .. }) => Some(Gate::Open),
            Some(Health::Down(at, error)) if now.duration_since(*at) < DOWN_MEMORY => {
                Some(Gate::Down(remembered(error)))
            }
            // A prober that never reported (cancelled) stops counting after a full call.
            Some(Health::Probing(since)) if now.duration_since(*since) < 2 * self.timeout => {
                // Patience counts from the probe's start: once it is overdue, nobody waits.
                if now.duration_since(*since) < PROBE_PATIENCE {
                    None
                } else {
                    Some(Gate::Busy)
                }
            }
            _ => {
                health.insert(key.to_string(), Health::Probing(now));
                Some(Gate::Open)
            }
        }
    }

    /// `endpoint` answered a call.
    pub fn answered(&self, endpoint: &BrokerEndpoint) {
        self.health_map()
            .insert(endpoint.pool_key(), Health::Answering { unanswered: None });
    }

    /// A read of `key` begins: the first one since the last answer starts the silence clock.
    fn read_started(&self, key: &str) {
        if let Some(Health::Answering { unanswered }) = self.health_map().get_mut(key) {
            unanswered.get_or_insert_with(Instant::now);
        }
    }

    /// A cached snapshot served a prober: the broker answered recently enough.
    fn settle_probe(&self, key: &str) {
        let mut health = self.health_map();
        if let Some(state @ Health::Probing(_)) = health.get_mut(key) {
            *state = Health::Answering { unanswered: None };
        }
    }

    /// A call to `endpoint` failed with `error`; a failure to reach it is remembered for
    /// [`DOWN_MEMORY`], any other error means it answered.
    pub fn failed(&self, endpoint: &BrokerEndpoint, error: &BrokerError) {
        let health = match error {
            BrokerError::Unreachable { .. } | BrokerError::Timeout { .. } => {
                Health::Down(Instant::now(), remembered(error))
            }
            _ => Health::Answering { unanswered: None },
        };
        self.health_map().insert(endpoint.pool_key(), health);
    }

    fn health_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Health>> {
        // Never held across an await; a poisoned lock only means another reconcile panicked.
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A snapshot of `vhost` at most [`SNAPSHOT_MAX_AGE`] old (longer for one slow to read:
    /// [`reuse_for`]) and taken after `not_before`
    /// (the caller's own last write, so it always sees its own changes); concurrent callers
    /// share one read. Other pipelines' writes do not force a new read: they never touch the
    /// caller's objects.
    pub async fn snapshot(
        &self,
        endpoint: &BrokerEndpoint,
        broker: &B,
        vhost: &str,
        not_before: Option<Instant>,
    ) -> Result<Arc<LiveVhost>, BrokerError> {
        let key = endpoint.pool_key();
        let slot = self.slot(endpoint, vhost).await;
        let mut cached = slot.lock().await;
        if let Some((taken, reuse, live)) = cached.as_ref()
            && taken.elapsed() < *reuse
            && not_before.is_none_or(|t| *taken > t)
        {
            self.settle_probe(&key);
            return Ok(live.clone());
        }
        // Another caller may have found the broker down while this one waited for the slot.
        if let Some(Health::Down(at, error)) = self.health_map().get(&key)
            && at.elapsed() < DOWN_MEMORY
        {
            return Err(remembered(error));
        }
        self.read_started(&key);
        let taken = Instant::now();
        match broker.snapshot(vhost).await {
            Ok(live) => {
                self.answered(endpoint);
                let live = Arc::new(live);
                let reuse = reuse_for(taken.elapsed());
                *cached = Some((taken, reuse, live.clone()));
                forget_after(slot.clone(), &live, reuse);
                Ok(live)
            }
            Err(error) => {
                self.failed(endpoint, &error);
                Err(error)
            }
        }
    }

    async fn slot(&self, endpoint: &BrokerEndpoint, vhost: &str) -> Arc<Mutex<Snapshot>> {
        let key = (endpoint.pool_key(), vhost.to_string());
        self.snapshots.lock().await.entry(key).or_default().clone()
    }

    /// Pipelines reconciled at once within a batch.
    pub(super) fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Closes every broker connection (shutdown).
    pub async fn close(&self) {
        let brokers: Vec<Pooled<B>> = self.brokers.lock().await.drain().map(|(_, b)| b).collect();
        for pooled in brokers {
            pooled.broker.close().await;
        }
    }
}

/// A copy of a failure to reach a broker, to tell the next pipelines (same words, so their
/// status does not change with every retry).
fn remembered(error: &BrokerError) -> BrokerError {
    match error {
        BrokerError::Timeout {
            endpoint,
            operation,
            seconds,
        } => BrokerError::Timeout {
            endpoint: endpoint.clone(),
            operation: operation.clone(),
            seconds: *seconds,
        },
        BrokerError::Unreachable { endpoint, reason } => BrokerError::Unreachable {
            endpoint: endpoint.clone(),
            reason: reason.clone(),
        },
        other => BrokerError::Unreachable {
            endpoint: String::new(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_pool() -> BrokerPool<MemoryBroker> {
        let broker = Arc::new(MemoryBroker::new("memory://a"));
        BrokerPool::with_connector(
            Duration::from_secs(5),
            BROKER_CONCURRENCY,
            Box::new(move |_, _| Ok(broker.clone())),
        )
    }

    fn endpoint() -> BrokerEndpoint {
        BrokerEndpoint::new("amqp://app:pw@rabbit.invalid:5672/", None, None).expect("valid")
    }

    #[test]
    fn a_snapshot_slow_to_read_is_reused_longer_within_bounds() {
        assert_eq!(reuse_for(Duration::from_millis(40)), SNAPSHOT_MAX_AGE);
        assert_eq!(reuse_for(Duration::from_secs(2)), Duration::from_secs(20));
        assert_eq!(reuse_for(Duration::from_secs(60)), SNAPSHOT_MAX_REUSE);
    }

    #[tokio::test]
    async fn a_snapshot_is_never_reused_for_a_caller_that_wrote_after_it_was_taken() {
        let pool = memory_pool();
        let broker = MemoryBroker::new("memory://a").with_vhost("/", 4);
        let first = pool
            .snapshot(&endpoint(), &broker, "/", None)
            .await
            .expect("snapshot");
        let again = pool
            .snapshot(&endpoint(), &broker, "/", None)
            .await
            .expect("snapshot");
        assert!(Arc::ptr_eq(&first, &again), "a young snapshot is shared");
        let wrote = Some(Instant::now());
        let after_write = pool
            .snapshot(&endpoint(), &broker, "/", wrote)
            .await
            .expect("snapshot");
        assert!(
            !Arc::ptr_eq(&first, &after_write),
            "read again after the caller's write"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_is_forgotten_once_it_may_no_longer_be_reused() {
        let pool = memory_pool();
        let broker = MemoryBroker::new("memory://a").with_vhost("/", 4);
        let first = pool
            .snapshot(&endpoint(), &broker, "/", None)
            .await
            .expect("snapshot");
        let held = Arc::downgrade(&first);
        drop(first);
        tokio::time::sleep(SNAPSHOT_MAX_AGE / 2).await;
        assert!(held.upgrade().is_some(), "kept while it may be reused");
        tokio::time::sleep(SNAPSHOT_MAX_AGE).await;
        assert!(held.upgrade().is_none(), "the pool let go of it");
        // A newer snapshot is not forgotten by the older one's timer.
        let older = pool
            .snapshot(&endpoint(), &broker, "/", None)
            .await
            .expect("snapshot");
        tokio::time::sleep(SNAPSHOT_MAX_AGE / 2).await;
        let wrote = Some(Instant::now());
        let newer = pool
            .snapshot(&endpoint(), &broker, "/", wrote)
            .await
            .expect("snapshot");
        assert!(!Arc::ptr_eq(&older, &newer), "read again after a write");
        let newer_held = Arc::downgrade(&newer);
        drop((older, newer));
        // The older one's time is up, not the newer one's.
        tokio::time::sleep(SNAPSHOT_MAX_AGE * 3 / 4).await;
        assert!(
            newer_held.upgrade().is_some(),
            "the newer one is still cached"
        );
        tokio::time::sleep(SNAPSHOT_MAX_AGE).await;
        assert!(newer_held.upgrade().is_none());
    }

    #[tokio::test]
    async fn one_reconcile_probes_a_new_broker_and_the_others_leave_once_it_is_overdue() {
        let pool = memory_pool();
        assert!(
            matches!(pool.gate(&endpoint()).await, Gate::Open),
            "the prober"
        );
        let waited = Instant::now();
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Busy));
        let waited = waited.elapsed();
        assert!(
            waited >= PROBE_PATIENCE - PROBE_POLL && waited < PROBE_PATIENCE * 3,
            "waited {waited:?}"
        );
        let at_once = Instant::now();
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Busy));
        assert!(
            at_once.elapsed() < PROBE_PATIENCE / 2,
            "an overdue probe is not waited for"
        );
        pool.answered(&endpoint());
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Open));
    }

    #[tokio::test]
    async fn a_broker_that_goes_silent_while_in_use_turns_newcomers_away_until_it_answers() {
        let pool = memory_pool();
        let key = endpoint().pool_key();
        pool.answered(&endpoint());
        pool.read_started(&key);
        assert!(
            matches!(pool.gate(&endpoint()).await, Gate::Open),
            "a read in progress is normal"
        );
        // The read has been out for the silence limit without an answer.
        pool.health_map().insert(
            key.clone(),
            Health::Answering {
                unanswered: Instant::now().checked_sub(SILENCE_LIMIT),
            },
        );
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Busy));
        pool.answered(&endpoint());
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Open));
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_reported_down_with_its_own_words_without_a_new_call() {
        let pool = memory_pool();
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Open));
        let error = BrokerError::Unreachable {
            endpoint: endpoint().to_string(),
            reason: "connection refused".into(),
        };
        pool.failed(&endpoint(), &error);
        for _ in 0..3 {
            match pool.gate(&endpoint()).await {
                Gate::Down(remembered) => assert_eq!(remembered.to_string(), error.to_string()),
                other => panic!("expected Down, got {other:?}"),
            }
        }
        // A broker that answered, even with a refusal, is not down.
        let refused = BrokerError::AuthenticationFailed {
            endpoint: endpoint().to_string(),
            user: "app".into(),
        };
        pool.failed(&endpoint(), &refused);
        assert!(matches!(pool.gate(&endpoint()).await, Gate::Open));
    }
}
