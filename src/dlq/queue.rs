//! The AMQP side of `msgpipe dlq`: browse a DLQ without taking messages, replay them with
//! confirms, purge it. Every call is bounded by the timeout; errors never carry the password.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Confirmation, Connection};

use super::letter::{DeadLetter, RawDeadLetter};
use super::replay::{ReplaySelection, ReplayTarget, replay_properties, replay_target};
use super::{DlqError, ReplayFailure};
use crate::broker::{BrokerEndpoint, BrokerError, connect_amqp};
use crate::plan::PipelineNames;

/// One DLQ on one broker vhost, over a connection of its own.
pub struct DeadLetterQueue {
    endpoint: BrokerEndpoint,
    vhost: String,
    queue: String,
    timeout: Duration,
    connection: Connection,
}

/// Dead letters read from the head of a DLQ, and how many it held.
#[derive(Debug)]
pub struct Browse {
    /// Messages ready in the DLQ when browsing started.
    pub depth: u64,
    pub letters: Vec<RawDeadLetter>,
}

/// How a replay ended when nothing went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Messages ready in the DLQ when the replay started.
    pub depth: u64,
    /// Dead letters read (selected or not).
    pub examined: usize,
    pub replayed: usize,
}

impl DeadLetterQueue {
    /// Connects to `vhost` and checks that `queue` exists.
    pub async fn open(
        endpoint: &BrokerEndpoint,
        vhost: &str,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, DlqError> {
        // A connection of our own (not the reconciler's pool): browsing holds messages
        // unacknowledged on it, and closing it is what hands them back.
        let connection = connect_amqp(endpoint, vhost, timeout, "msgpipe dlq").await?;
        let dlq = DeadLetterQueue {
            endpoint: endpoint.clone(),
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            timeout,
            connection,
        };
        dlq.depth().await?;
        Ok(dlq)
    }

    pub fn name(&self) -> &str {
        &self.queue
    }

    /// Closes the connection; anything still unacknowledged returns to the DLQ.
    pub async fn close(self) {
        if self.connection.status().connected() {
            let bye = self.connection.close(200, "msgpipe dlq done".into());
            let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
        }
    }

    /// Ready messages, exactly (passive declare).
    pub async fn depth(&self) -> Result<u64, DlqError> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declare =
            channel.queue_declare(self.queue.as_str().into(), options, FieldTable::default());
        let result = self.call("count the dead letters", declare).await;
        close(&channel).await;
        match result {
            Ok(declared) => Ok(u64::from(declared.message_count())),
            Err(e) if is_not_found(&e) => Err(DlqError::QueueNotFound {
                endpoint: self.endpoint.to_string(),
                vhost: self.vhost.clone(),
                queue: self.queue.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads up to `limit` dead letters from the head without acknowledging them, then closes
    /// the channel so the broker puts every one back (see the module docs for the cost).
    pub async fn browse(&self, limit: usize) -> Result<Browse, DlqError> {
        let depth = self.depth().await?;
        let channel = self.channel().await?;
        let mut letters = Vec::new();
        let scan = usize::try_from(depth).unwrap_or(usize::MAX).min(limit);
        let result = async {
            for index in 1..=scan {
                match self.get(&channel, index).await? {
                    Some((letter, _)) => letters.push(letter),
                    None => break,
                }
            }
            Ok::<(), DlqError>(())
        }
        .await;
        close(&channel).await;
        result.map(|()| Browse { depth, letters })
    }

    /// Replays the selected dead letters to the pipeline's work exchange, one at a time:
    /// publish a copy (confirm channel, mandatory), and only once the broker confirmed it and
    /// did not return it, ack the dead letter. Anything else puts the dead letter back and
    /// stops. `on_replayed` runs after each dead letter is replayed.
    pub async fn replay(
        &self,
        selection: &ReplaySelection,
        names: &PipelineNames,
        mut on_replayed: impl FnMut(&DeadLetter, &ReplayTarget),
    ) -> Result<ReplayOutcome, DlqError> {
        let depth = self.depth().await?;
        self.check_exchange(&names.work_exchange).await?;
        let source = self.channel().await?;
        let target = self.channel().await?;
        self.call(
            "turn on publisher confirms",
            target.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let replayed_at = format!("{:.3}", Timestamp::now());
        let mut outcome = ReplayOutcome {
            depth,
            examined: 0,
            replayed: 0,
        };
        let mut seen_ids: Vec<String> = Vec::new();
        let result = async {
            for index in 1..=selection.scan_limit(depth) {
                let got = self.get(&source, index).await;
                let Some((raw, acker)) = got.map_err(|e| self.interrupted(outcome.replayed, e))?
                else {
                    break;
                };
                outcome.examined = index;
                if !selection.selects(&raw) {
                    continue; // held unacknowledged; back in the DLQ when the channel closes
                }
                seen_ids.extend(raw.message_id().map(str::to_string));
                let letter = DeadLetter::interpret(&raw);
                let to = replay_target(&letter, names);
                if let Err(cause) = self
                    .replay_one(&target, &raw, &acker, &to, &replayed_at)
                    .await
                {
                    return Err(DlqError::ReplayStopped {
                        queue: self.queue.clone(),
                        replayed: outcome.replayed,
                        message: describe(&letter),
                        cause,
                    });
                }
                outcome.replayed += 1;
                on_replayed(&letter, &to);
            }
            Ok(())
        }
        .await;
        close(&target).await;
        close(&source).await;
        result?;
        let missing = selection.missing_ids(seen_ids.iter().map(String::as_str));
        if !missing.is_empty() {
            return Err(DlqError::IdsNotFound {
                queue: self.queue.clone(),
                replayed: outcome.replayed,
                missing,
            });
        }
        Ok(outcome)
    }

    /// A replay that failed between dead letters still says how far it got.
    fn interrupted(&self, replayed: usize, error: DlqError) -> DlqError {
        match error {
            DlqError::Broker(cause) => DlqError::ReplayInterrupted {
                queue: self.queue.clone(),
                replayed,
                cause,
            },
            other => other,
        }
    }

    /// Publishes one copy and settles its dead letter: ack after a clean confirm, else requeue.
    async fn replay_one(
        &self,
        channel: &Channel,
        raw: &RawDeadLetter,
        acker: &Acker,
        to: &ReplayTarget,
        replayed_at: &str,
    ) -> Result<(), ReplayFailure> {
        let confirmed = self.publish_confirmed(channel, raw, to, replayed_at).await;
        if let Err(failure) = confirmed {
            // Best effort: if the connection is gone, the broker requeues it anyway.
            let requeue = acker.reject(BasicRejectOptions { requeue: true });
            let _ = tokio::time::timeout(self.timeout, requeue).await;
            return Err(failure);
        }
        self.call(
            "remove the replayed dead letter",
            acker.ack(BasicAckOptions::default()),
        )
        .await
        .map(|_| ())
        .map_err(ReplayFailure::AckFailed)
    }

    async fn publish_confirmed(
        &self,
        channel: &Channel,
        raw: &RawDeadLetter,
        to: &ReplayTarget,
        replayed_at: &str,
    ) -> Result<(), ReplayFailure> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let publish = async {
            channel
                .basic_publish(
                    to.exchange.as_str().into(),
                    to.routing_key.as_str().into(),
                    options,
                    &raw.body,
                    replay_properties(&raw.properties, replayed_at),
                )
                .await?
                .await
        };
        let confirmation = self
            .call("publish the replayed copy", publish)
            .await
            .map_err(ReplayFailure::Unconfirmed)?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(ReplayFailure::Unroutable {
                    exchange: to.exchange.clone(),
                    routing_key: to.routing_key.clone(),
                })
            }
            Confirmation::Nack(None) => Err(ReplayFailure::Nacked),
            Confirmation::NotRequested => Err(ReplayFailure::Unconfirmed(self.rejected(
                "publish the replayed copy",
                "the channel is not in confirm mode".into(),
            ))),
        }
    }

    /// Deletes every message in the DLQ; returns how many there were.
    pub async fn purge(&self) -> Result<u64, DlqError> {
        let channel = self.channel().await?;
        let purge = channel.queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default());
        let result = self.call("purge the DLQ", purge).await;
        close(&channel).await;
        Ok(u64::from(result?))
    }

    /// A passive declare: the work exchange must exist before anything is taken from the DLQ.
    async fn check_exchange(&self, exchange: &str) -> Result<(), DlqError> {
        let channel = self.channel().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declare = channel.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            options,
            FieldTable::default(),
        );
        let result = self.call("check the work exchange", declare).await;
        close(&channel).await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Err(DlqError::ExchangeNotFound {
                endpoint: self.endpoint.to_string(),
                vhost: self.vhost.clone(),
                exchange: exchange.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// One message from the head, unacknowledged, with the handle that settles it.
    async fn get(
        &self,
        channel: &Channel,
        index: usize,
    ) -> Result<Option<(RawDeadLetter, Acker)>, DlqError> {
        let get = channel.basic_get(
            self.queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        );
        let Some(BasicGetMessage { delivery, .. }) = self.call("read a dead letter", get).await?
        else {
            return Ok(None);
        };
        let letter = RawDeadLetter {
            index,
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            properties: delivery.properties,
            body: delivery.data,
        };
        Ok(Some((letter, delivery.acker)))
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.call("open a channel", self.connection.create_channel())
            .await
    }

    /// Runs one AMQP call with the timeout; a dropped connection reads as "unreachable".
    async fn call<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(BrokerError::Timeout {
                endpoint: self.endpoint.to_string(),
                operation: operation.into(),
                seconds: self.timeout.as_secs(),
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if !self.connection.status().connected() => Err(BrokerError::Unreachable {
                endpoint: self.endpoint.to_string(),
                reason: format!(
                    "the connection was lost while trying to {operation}: {}",
                    self.endpoint.redact(&e.to_string())
                ),
            }),
            Ok(Err(e)) => Err(self.rejected(operation, e.to_string())),
        }
    }

    fn rejected(&self, operation: &str, reason: String) -> BrokerError {
        BrokerError::Rejected {
            endpoint: self.endpoint.to_string(),
            operation: operation.into(),
            reason: self.endpoint.redact(&reason),
        }
    }
}

/// `message id X` or `#N (no message id)`, for errors.
fn describe(letter: &DeadLetter) -> String {
    match &letter.message_id {
        Some(id) => format!("#{} (message id {id})", letter.index),
        None => format!("#{} (no message id)", letter.index),
    }
}

fn is_not_found(error: &BrokerError) -> bool {
    matches!(error, BrokerError::Rejected { reason, .. } if reason.contains("NOT_FOUND") || reason.contains("404"))
}

async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}
