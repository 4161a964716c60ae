//! AMQP sessions and how their failures are told apart: the one place that bounds AMQP calls
//! by a timeout and classifies broker errors by their AMQP reply code (never by the text of
//! a message), for the reconciler ([`super::RabbitBroker`]) and the DLQ tools alike.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind, PublisherConfirm};

use super::{BrokerEndpoint, BrokerError, QueueDepth, connect_amqp};

/// AMQP reply codes msgpipe acts on (AMQP 0-9-1 §1.9).
pub mod reply {
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
}

/// The reply code of an error the broker sent (channel or connection close), if it is one.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// The typed error for a failed AMQP call `operation`; `connected` says whether the
/// connection survived it (a lost connection reads as "unreachable").
pub fn classify(
    endpoint: &BrokerEndpoint,
    operation: &str,
    error: &lapin::Error,
    connected: bool,
) -> BrokerError {
    let reason = endpoint.redact(&error.to_string());
    match reply_code(error) {
        Some(reply::ACCESS_REFUSED) => BrokerError::AccessRefused {
            endpoint: endpoint.to_string(),
            user: endpoint.username(),
            operation: operation.into(),
        },
        Some(_) => BrokerError::Rejected {
            endpoint: endpoint.to_string(),
            operation: operation.into(),
            reason,
        },
        None if !connected || error.is_io_error() => BrokerError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: format!("the connection was lost while trying to {operation}: {reason}"),
        },
        None => BrokerError::Rejected {
            endpoint: endpoint.to_string(),
            operation: operation.into(),
            reason,
        },
    }
}

/// Runs one AMQP call bounded by `timeout`. The outer error is the timeout; the inner one is
/// lapin's, for the caller to classify (some reply codes are answers, e.g. 404 on a passive
/// declare).
pub async fn bounded<T>(
    endpoint: &BrokerEndpoint,
    timeout: Duration,
    operation: &str,
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<Result<T, lapin::Error>, BrokerError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| BrokerError::Timeout {
            endpoint: endpoint.to_string(),
            operation: operation.into(),
            seconds: timeout.as_secs(),
        })
}

/// An AMQP connection of its own to one vhost (the DLQ tools hold messages unacknowledged
/// on it, and closing it is what hands them back), every call bounded by the timeout.
pub struct AmqpSession {
    endpoint: BrokerEndpoint,
    vhost: String,
    timeout: Duration,
    connection: Connection,
}

impl AmqpSession {
    pub async fn open(
        endpoint: &BrokerEndpoint,
        vhost: &str,
        timeout: Duration,
        connection_name: &str,
    ) -> Result<Self, BrokerError> {
        let connection = connect_amqp(endpoint, vhost, timeout, connection_name).await?;
        Ok(Self {
            endpoint: endpoint.clone(),
            vhost: vhost.to_string(),
            timeout,
            connection,
        })
    }

    pub fn endpoint(&self) -> &BrokerEndpoint {
        &self.endpoint
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one call with the timeout and classifies its failure.
    pub async fn call<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, BrokerError> {
        bounded(&self.endpoint, self.timeout, operation, call)
            .await?
            .map_err(|e| self.classify(operation, &e))
    }

    pub fn classify(&self, operation: &str, error: &lapin::Error) -> BrokerError {
        classify(
            &self.endpoint,
            operation,
            error,
            self.connection.status().connected(),
        )
    }

    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        self.call("open a channel", self.connection.create_channel())
            .await
    }

    /// Exact ready-message and consumer counts (passive declare on a channel of its own:
    /// a missing queue closes the channel); None if the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<Option<QueueDepth>, BrokerError> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let operation = format!("count the messages in {queue}");
        let declare = channel.queue_declare(queue.into(), options, FieldTable::default());
        let answer = bounded(&self.endpoint, self.timeout, &operation, declare).await?;
        close_channel(&channel).await;
        match answer {
            Ok(declared) => Ok(Some(QueueDepth {
                messages: u64::from(declared.message_count()),
                consumers: u64::from(declared.consumer_count()),
            })),
            Err(e) if reply_code(&e) == Some(reply::NOT_FOUND) => Ok(None),
            Err(e) => Err(self.classify(&operation, &e)),
        }
    }

    /// Closes the connection; anything still unacknowledged on it returns to its queue.
    pub async fn close(self) {
        if self.connection.status().connected() {
            let bye = self.connection.close(200, "msgpipe done".into());
            let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
        }
    }
}

/// Why a confirmed, mandatory publish did not land (see [`AmqpSession::start_publish`]).
#[derive(Debug, thiserror::Error)]
pub enum PublishRefused {
    #[error("the broker returned it as unroutable: no queue {queue:?}")]
    Returned { queue: String },
    #[error("the broker refused it (nack); is the queue full (maxLength)?")]
    Nacked,
    #[error(
        "it was not confirmed ({0}); it may still have reached the queue, so it may be delivered twice"
    )]
    Unconfirmed(BrokerError),
}

impl AmqpSession {
    /// Publishes a copy to `queue` through the default exchange, `mandatory`, on a channel in
    /// confirm mode; the returned confirm is settled by [`Self::confirmed`]. The message that
    /// was copied may be acknowledged only once that says the copy landed.
    pub async fn start_publish(
        &self,
        channel: &Channel,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, PublishRefused> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let publish = channel.basic_publish("".into(), queue.into(), options, body, properties);
        self.call(&format!("publish a copy to {queue}"), publish)
            .await
            .map_err(PublishRefused::Unconfirmed)
    }

    /// Waits for the broker's answer to a copy published by [`Self::start_publish`]: Ok only
    /// for a clean ack (confirmed and not returned).
    pub async fn confirmed(
        &self,
        queue: &str,
        confirm: PublisherConfirm,
    ) -> Result<(), PublishRefused> {
        let operation = format!("have the copy to {queue} confirmed");
        let confirmation = self
            .call(&operation, confirm)
            .await
            .map_err(PublishRefused::Unconfirmed)?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(PublishRefused::Returned {
                    queue: queue.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(PublishRefused::Nacked),
            Confirmation::NotRequested => Err(PublishRefused::Unconfirmed(BrokerError::Rejected {
                endpoint: self.endpoint.to_string(),
                operation,
                reason: "the channel is not in confirm mode".into(),
            })),
        }
    }
}

/// Closes a channel if it is still open (a broker error already closed it otherwise).
pub async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}
