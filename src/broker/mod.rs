//! The broker edge: read what exists on RabbitMQ, compare it with the planner's desired
//! topology, and apply the difference. Decisions are in [`diff`] (pure); IO is behind
//! [`BrokerApi`], implemented for a real RabbitMQ by [`RabbitBroker`].

pub mod diff;
mod endpoint;
pub mod inventory;
pub mod live;
mod memory;
pub mod migrate;
pub mod migration;
mod mover;
pub mod observe;
mod rabbit;
mod reconcile;
pub mod session;

use std::future::Future;

use crate::api::Reason;

pub use diff::{BrokerAction, BrokerPlan, Conflict, TeardownPlan};
pub use endpoint::{BrokerEndpoint, SECRET_CA_KEY, SECRET_MANAGEMENT_KEY, SECRET_URI_KEY};
pub use inventory::VhostInventory;
pub use live::{BINDING_MARKER, LiveVhost};
pub use memory::MemoryBroker;
pub use migrate::{
    DrainProgress, MigrationBroker, MigrationError, MigrationEvent, MigrationReport, migrate,
};
pub use migration::{MigrationPhase, MigrationPlan, MigrationRefused, MigrationStep};
pub use mover::Mover;
pub use observe::{Observed, observe};
pub use rabbit::{
    DEFAULT_CALL_TIMEOUT, DEFAULT_DELETE_SETTLE, RabbitBroker, connect_amqp,
    install_crypto_provider,
};
pub use reconcile::{
    BrokerReport, Change, Failed, LiveCounts, PhasedPlan, reconcile, reconcile_many,
    reconcile_policies_first, snapshot_vhosts, teardown,
};
pub use session::AmqpSession;

/// Why a broker call failed. Messages name the broker (`amqp://user@host:port`) and the
/// step, never the password.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker {field}: {reason}")]
    InvalidUri { field: &'static str, reason: String },
    #[error("broker {endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("broker {endpoint} refused the credentials of user {user:?}")]
    AuthenticationFailed { endpoint: String, user: String },
    #[error("vhost {vhost:?} does not exist on broker {endpoint} (or user may not use it)")]
    VhostNotFound { endpoint: String, vhost: String },
    #[error("user {user:?} may not {operation} on broker {endpoint}")]
    AccessRefused {
        endpoint: String,
        user: String,
        operation: String,
    },
    #[error(
        "user {user:?} may not {operation} on broker {endpoint}: the management API needs the user tag {tag:?} (or \"administrator\"), and the user has {has}"
    )]
    MissingUserTag {
        endpoint: String,
        user: String,
        operation: String,
        tag: &'static str,
        /// The user's tags as the broker reported them, e.g. `tags [management]`.
        has: String,
    },
    #[error(
        "the management API of broker {endpoint} is not available at {api} (is the rabbitmq_management plugin enabled?): {reason}"
    )]
    ManagementUnavailable {
        endpoint: String,
        api: String,
        reason: String,
    },
    #[error("{operation} timed out after {seconds}s on broker {endpoint}")]
    Timeout {
        endpoint: String,
        operation: String,
        seconds: u64,
    },
    #[error("broker {endpoint} refused to {operation}: {reason}")]
    Rejected {
        endpoint: String,
        operation: String,
        reason: String,
    },
}

impl BrokerError {
    /// The `BrokerReady=False` reason for this error.
    pub fn condition_reason(&self) -> Reason {
        match self {
            BrokerError::InvalidUri { .. } => Reason::InvalidBrokerSecret,
            BrokerError::Unreachable { .. } | BrokerError::Timeout { .. } => {
                Reason::BrokerUnreachable
            }
            BrokerError::AuthenticationFailed { .. } => Reason::BrokerAuthenticationFailed,
            BrokerError::VhostNotFound { .. } => Reason::VhostNotFound,
            BrokerError::AccessRefused { .. } | BrokerError::MissingUserTag { .. } => {
                Reason::BrokerAccessRefused
            }
            BrokerError::ManagementUnavailable { .. } => Reason::ManagementAPIUnavailable,
            BrokerError::Rejected { .. } => Reason::BrokerRejected,
        }
    }
}

/// Depth of a queue: exact from a passive declare, or what kept a queue from deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready messages (passive declare); for a queue kept from deletion, ready plus
    /// unacknowledged.
    pub messages: u64,
    pub consumers: u64,
}

/// What executing one action did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionOutcome {
    Done,
    /// A delete was skipped because the queue holds messages (ready or unacknowledged) or
    /// has consumers.
    Kept(QueueDepth),
    /// The object was already gone.
    Gone,
}

/// Our own view of a broker: what the reconciler needs, and nothing else.
pub trait BrokerApi: Send + Sync {
    /// Every exchange, queue (with counts), queue binding and policy of a vhost, in one pass.
    fn snapshot(&self, vhost: &str) -> impl Future<Output = Result<LiveVhost, BrokerError>> + Send;
    /// Carries out one action. The reconcile executor never passes `Keep` (nothing to do)
    /// or `DeleteExchange` (it calls [`BrokerApi::delete_exchange`]); an implementation may
    /// treat them the same way.
    fn execute(
        &self,
        vhost: &str,
        action: &BrokerAction,
    ) -> impl Future<Output = Result<ActionOutcome, BrokerError>> + Send;
    /// Exact ready-message and consumer counts (passive declare); None if the queue is absent.
    fn queue_depth(
        &self,
        vhost: &str,
        queue: &str,
    ) -> impl Future<Output = Result<Option<QueueDepth>, BrokerError>> + Send;
    /// Deletes an exchange (idempotent).
    fn delete_exchange(
        &self,
        vhost: &str,
        exchange: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
}
