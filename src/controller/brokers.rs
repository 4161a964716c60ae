//! Brokers shared by every pipeline that names them: one client (HTTP pool + AMQP
//! connections) per broker, and a short-lived vhost snapshot shared by pipelines reconciled
//! together, so a resync of a thousand pipelines on one vhost reads it a few times, not a
//! thousand.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::broker::{BrokerApi, BrokerEndpoint, BrokerError, LiveVhost, RabbitBroker};

/// How long a snapshot may be reused. The management API's own counts lag ~5 s, so a
/// snapshot this young is as fresh as a new one.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(3);
/// A broker nobody used for this long is closed (e.g. after a credential rotation).
const IDLE_BROKER: Duration = Duration::from_secs(30 * 60);

type Snapshot = Option<(Instant, Arc<LiveVhost>)>;
type SnapshotSlots = HashMap<(String, String), Arc<Mutex<Snapshot>>>;

struct PooledBroker {
    broker: Arc<RabbitBroker>,
    last_used: Instant,
}

/// The operator's brokers and their cached vhost snapshots.
pub struct BrokerPool {
    timeout: Duration,
    brokers: Mutex<HashMap<String, PooledBroker>>,
    snapshots: Mutex<SnapshotSlots>,
}

impl BrokerPool {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            brokers: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `endpoint`, made on first use.
    pub async fn broker(
        &self,
        endpoint: &BrokerEndpoint,
    ) -> Result<Arc<RabbitBroker>, BrokerError> {
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
        let broker = Arc::new(RabbitBroker::new(endpoint.clone(), self.timeout)?);
        brokers.insert(
            key,
            PooledBroker {
                broker: broker.clone(),
                last_used: now,
            },
        );
        Ok(broker)
    }

    /// A snapshot of `vhost` at most [`SNAPSHOT_MAX_AGE`] old and taken after `not_before`
    /// (the caller's own last write, so it always sees its own changes); concurrent callers
    /// share one read. Other pipelines' writes do not force a new read: they never touch the
    /// caller's objects.
    pub async fn snapshot(
        &self,
        broker: &RabbitBroker,
        vhost: &str,
        not_before: Option<Instant>,
    ) -> Result<Arc<LiveVhost>, BrokerError> {
        let slot = self.slot(broker, vhost).await;
        let mut cached = slot.lock().await;
        if let Some((taken, live)) = cached.as_ref()
            && taken.elapsed() < SNAPSHOT_MAX_AGE
            && not_before.is_none_or(|t| *taken > t)
        {
            return Ok(live.clone());
        }
        let taken = Instant::now();
        let live = Arc::new(broker.snapshot(vhost).await?);
        *cached = Some((taken, live.clone()));
        Ok(live)
    }

    async fn slot(&self, broker: &RabbitBroker, vhost: &str) -> Arc<Mutex<Snapshot>> {
        let key = (broker.endpoint().pool_key(), vhost.to_string());
        self.snapshots.lock().await.entry(key).or_default().clone()
    }

    /// Closes every broker connection (shutdown).
    pub async fn close(&self) {
        let brokers: Vec<PooledBroker> =
            self.brokers.lock().await.drain().map(|(_, b)| b).collect();
        for pooled in brokers {
            pooled.broker.close().await;
        }
    }
}
