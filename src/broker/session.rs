//! AMQP sessions and how their failures are told apart: the one place that bounds AMQP calls
//! by a timeout and classifies broker errors by their AMQP reply code (never by the text of
//! a message), for the reconciler ([`super::RabbitBroker`]) and the DLQ tools alike.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ErrorKind};

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

/// Closes a channel if it is still open (a broker error already closed it otherwise).
pub async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}
