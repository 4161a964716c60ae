//! One confirmed, mandatory publish: the primitive both the consumer (moving a failed message)
//! and the publisher rely on. Success means the broker acked it *and* routed it somewhere.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};

/// Why a publish is not known to be safe on the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("exchange or routing key longer than 255 bytes: {0}")]
    /// The exchange or routing key is not a valid AMQP short string.
    InvalidName(String),
    #[error("the channel refused the publish: {0}")]
    /// The channel failed (closed, or the connection is gone).
    Channel(String),
    #[error("exchange {exchange} does not exist (404 NOT_FOUND; the broker closed the channel)")]
    /// The exchange does not exist: the broker closed the channel (its connection stays up).
    ExchangeMissing {
        /// Exchange of the publish.
        exchange: String,
    },
    #[error("the broker nacked the message")]
    /// The broker nacked the message (e.g. a queue refused it: `overflow: reject-publish`).
    Nacked,
    #[error("unroutable: {exchange}/{routing_key} has no binding for it (returned)")]
    /// No queue took the message (`mandatory`): a missing binding or exchange.
    Returned {
        /// Exchange of the publish.
        exchange: String,
        /// Routing key of the publish.
        routing_key: String,
    },
    #[error("no confirm within {0:?}")]
    /// No confirm in time.
    Timeout(Duration),
    #[error("the channel was not in confirm mode")]
    /// The channel was not in confirm mode.
    NotConfirmed,
}

impl PublishFailure {
    /// True when the channel or connection is unusable (as opposed to a refusal of this message).
    pub fn breaks_channel(&self) -> bool {
        matches!(
            self,
            Self::Channel(_) | Self::ExchangeMissing { .. } | Self::Timeout(_) | Self::NotConfirmed
        )
    }

    /// True when the broker is up but has no route for the message yet: its exchange is
    /// missing, or no queue is bound for its routing key (typically: the pipeline is not
    /// applied yet, or is being applied).
    pub fn route_missing(&self) -> bool {
        matches!(self, Self::ExchangeMissing { .. } | Self::Returned { .. })
    }

    /// True when the broker refused this message now but is likely to take it within seconds:
    /// no route yet, or its queue is full (nacked: `overflow: reject-publish`). Such messages
    /// are resent on the short route backoff, not the resend interval (protocol P-11).
    pub fn retry_soon(&self) -> bool {
        self.route_missing() || matches!(self, Self::Nacked)
    }

    /// The failure a lapin error stands for, told apart by its AMQP reply code: 404 NOT_FOUND
    /// on a publish means the exchange does not exist.
    fn from_channel_error(error: &lapin::Error, exchange: &str) -> Self {
        match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND => {
                Self::ExchangeMissing {
                    exchange: exchange.to_string(),
                }
            }
            _ => Self::Channel(error.to_string()),
        }
    }
}

/// AMQP reply code 404 (AMQP 0-9-1 §1.9).
const NOT_FOUND: u16 = 404;

/// Publishes with `mandatory` on a confirm channel and waits for the confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let started = start_publish(channel, exchange, routing_key, body, properties);
    // On a connection that just died lapin may never answer: the deadline covers both steps.
    let confirm = tokio::time::timeout_at(deadline, started)
        .await
        .map_err(|_| PublishFailure::Timeout(timeout))??;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    await_confirm(confirm, exchange, routing_key, left).await
}

/// Sends the publish; the returned future resolves to its confirm. Lets a caller pipeline
/// many publishes before awaiting their confirms.
pub async fn start_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, PublishFailure> {
    let name =
        |s: &str| ShortString::try_new(s).map_err(|e| PublishFailure::InvalidName(e.to_string()));
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(
            name(exchange)?,
            name(routing_key)?,
            options,
            body,
            properties,
        )
        .await
        .map_err(|e| PublishFailure::from_channel_error(&e, exchange))
}

/// Waits for one confirm: ack and not returned is success.
pub async fn await_confirm(
    confirm: lapin::PublisherConfirm,
    exchange: &str,
    routing_key: &str,
    timeout: Duration,
) -> Result<(), PublishFailure> {
    let confirmation = tokio::time::timeout(timeout, confirm)
        .await
        .map_err(|_| PublishFailure::Timeout(timeout))?
        .map_err(|e| PublishFailure::from_channel_error(&e, exchange))?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(PublishFailure::Returned {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        }),
        Confirmation::Nack(None) => Err(PublishFailure::Nacked),
        Confirmation::NotRequested => Err(PublishFailure::NotConfirmed),
    }
}
