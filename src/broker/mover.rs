//! Moving a queue's messages into another during a migration: RabbitMQ's own dynamic shovel
//! when the broker has the `rabbitmq_shovel` plugin, else msgpipe's confirm-then-ack mover
//! over an [`AmqpSession`] (the DLQ replay's session and confirm code). Either way a message
//! leaves its queue only once the broker confirmed its copy in the other (the shovel with
//! `ack-mode: on-confirm`), so a crash can duplicate a message, never lose one.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, PublisherConfirm};
use reqwest::Method;

use super::migrate::{DrainProgress, MigrationBroker};
use super::migration::NodeRoom;
use super::rabbit::encode;
use super::session::{AmqpSession, PublishRefused, close_channel, reply, reply_code};
use super::{ActionOutcome, BrokerApi, BrokerError, RabbitBroker};

/// How a migration moves messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mover {
    /// A dynamic shovel when the broker offers the shovel API (RabbitMQ 4.x), else
    /// [`Mover::Confirm`].
    #[default]
    Auto,
    /// A dynamic shovel (`src-delete-after: queue-length`, `ack-mode: on-confirm`).
    Shovel,
    /// msgpipe's own mover: consume, publish with confirm + mandatory, ack once confirmed.
    Confirm,
}

impl FromStr for Mover {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Mover::Auto),
            "shovel" => Ok(Mover::Shovel),
            "confirm" => Ok(Mover::Confirm),
            other => Err(format!(
                "unknown mover {other:?}: use auto, shovel or confirm"
            )),
        }
    }
}

impl fmt::Display for Mover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mover::Auto => "auto",
            Mover::Shovel => "shovel",
            Mover::Confirm => "confirm",
        })
    }
}

/// The confirm-then-ack mover's prefetch; it settles its copies half a window at a time.
const WINDOW: u16 = 256;
/// A drain with nothing delivered for this long checks whether it is done.
const IDLE: Duration = Duration::from_millis(500);
/// How often a drain reports progress.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A shovel whose source stayed at the same depth this long is reported as stuck.
const SHOVEL_STALL: Duration = Duration::from_secs(60);

impl MigrationBroker for RabbitBroker {
    async fn drain(
        &self,
        vhost: &str,
        from: &str,
        into: &str,
        feeders: &[String],
        progress: &mut (dyn FnMut(DrainProgress) + Send),
    ) -> Result<u64, BrokerError> {
        if self.mover_in_use(vhost).await? == Mover::Shovel {
            self.drain_by_shovel(vhost, from, into, feeders, progress)
                .await
        } else {
            let session =
                AmqpSession::open(self.endpoint(), vhost, self.timeout(), "msgpipe migrate")
                    .await?;
            let moved = self
                .drain_by_confirm(&session, from, into, feeders, progress)
                .await;
            session.close().await;
            moved
        }
    }

    async fn mover_in_use(&self, vhost: &str) -> Result<Mover, BrokerError> {
        Ok(match self.mover() {
            // RabbitMQ 3.x shovels refuse `src-predeclared`/`dest-predeclared`, and without
            // them a shovel declares its queues itself (no type, no arguments).
            Mover::Auto
                if self.server_major().await? >= 4 && self.shovels_available(vhost).await? =>
            {
                Mover::Shovel
            }
            Mover::Auto => Mover::Confirm,
            chosen => chosen,
        })
    }

    async fn room(
        &self,
        vhost: &str,
        queues: &[String],
    ) -> Result<(Vec<NodeRoom>, u64), BrokerError> {
        let api = self.endpoint().management_api();
        let nodes = self
            .read_json(
                vhost,
                &format!(
                    "{api}/nodes?columns=name,mem_alarm,disk_free_alarm,disk_free,disk_free_limit"
                ),
                "read the nodes' alarms and free disk",
            )
            .await?;
        let nodes = nodes
            .as_array()
            .map(|rows| rows.iter().map(node_room).collect())
            .unwrap_or_default();
        let listed = self
            .read_json(
                vhost,
                &format!("{api}/queues/{}?columns=name,message_bytes", encode(vhost)),
                "read the queues' sizes",
            )
            .await?;
        let bytes = listed
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|q| queues.iter().any(|name| q["name"] == name.as_str()))
                    .filter_map(|q| q["message_bytes"].as_u64())
                    .sum()
            })
            .unwrap_or(0);
        Ok((nodes, bytes))
    }

    /// The exact ready count, then the figures (unacknowledged, and a quorum queue's
    /// messages waiting to be dead-lettered), then after the settle the figures again (they
    /// lag by the statistics interval), the exact count again, and the delete: `if-empty`
    /// for a classic queue, so the broker refuses it if a message came meanwhile.
    async fn delete_drained(&self, vhost: &str, queue: &str) -> Result<ActionOutcome, BrokerError> {
        let Some(depth) = BrokerApi::queue_depth(self, vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if depth.messages > 0 {
            return Ok(ActionOutcome::Kept(depth));
        }
        let Some(stats) = self.queue_stats(vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if stats.messages > 0 || stats.unacknowledged > 0 {
            return Ok(ActionOutcome::Kept(stats.depth()));
        }
        if !self.delete_settle().is_zero() {
            tokio::time::sleep(self.delete_settle()).await;
            match self.queue_stats(vhost, queue).await? {
                None => return Ok(ActionOutcome::Gone),
                Some(later) if later.messages > 0 || later.unacknowledged > 0 => {
                    return Ok(ActionOutcome::Kept(later.depth()));
                }
                Some(_) => {}
            }
        }
        let Some(depth) = BrokerApi::queue_depth(self, vhost, queue).await? else {
            return Ok(ActionOutcome::Gone);
        };
        if depth.messages > 0 {
            return Ok(ActionOutcome::Kept(depth));
        }
        if self
            .delete_queue_checked(vhost, queue, stats.classic, false)
            .await?
        {
            Ok(ActionOutcome::Done)
        } else {
            let depth = BrokerApi::queue_depth(self, vhost, queue)
                .await?
                .unwrap_or(depth);
            Ok(ActionOutcome::Kept(depth))
        }
    }
}

impl RabbitBroker {
    async fn read_json(
        &self,
        vhost: &str,
        url: &str,
        operation: &str,
    ) -> Result<serde_json::Value, BrokerError> {
        let response = self.raw_request(Method::GET, url, operation).await?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(self.raw_error(operation, vhost, status, &text).await);
        }
        serde_json::from_str(&text).map_err(|e| BrokerError::ManagementUnavailable {
            endpoint: self.endpoint().to_string(),
            api: self.endpoint().management_api(),
            reason: format!("{operation}: unexpected answer: {e}"),
        })
    }

    /// Whether the broker offers dynamic shovels (the shovel management API answers).
    async fn shovels_available(&self, vhost: &str) -> Result<bool, BrokerError> {
        let url = format!(
            "{}/shovels/{}",
            self.endpoint().management_api(),
            encode(vhost)
        );
        let response = self
            .raw_request(Method::GET, &url, "look for the shovel plugin")
            .await?;
        Ok(response.status().is_success())
    }

    /// Whether `from` and every feeder hold nothing: no ready message (exact) and, by the
    /// figures, none unacknowledged or waiting to be dead-lettered.
    async fn drained(
        &self,
        vhost: &str,
        from: &str,
        feeders: &[String],
    ) -> Result<bool, BrokerError> {
        for queue in std::iter::once(from).chain(feeders.iter().map(String::as_str)) {
            match BrokerApi::queue_depth(self, vhost, queue).await? {
                None => continue,
                Some(depth) if depth.messages > 0 => return Ok(false),
                Some(_) => {}
            }
            if let Some(stats) = self.queue_stats(vhost, queue).await?
                && (stats.messages > 0 || stats.unacknowledged > 0)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn ready(&self, vhost: &str, queue: &str) -> Result<Option<u64>, BrokerError> {
        Ok(BrokerApi::queue_depth(self, vhost, queue)
            .await?
            .map(|d| d.messages))
    }

    /// Consumes `from` (prefetch [`WINDOW`]) and publishes each message to `into` through the
    /// default exchange, mandatory, on a confirm channel; acks a message only once its copy is
    /// confirmed. Stops once `from` and `feeders` are drained.
    async fn drain_by_confirm(
        &self,
        session: &AmqpSession,
        from: &str,
        into: &str,
        feeders: &[String],
        progress: &mut (dyn FnMut(DrainProgress) + Send),
    ) -> Result<u64, BrokerError> {
        let vhost = session.vhost();
        let source = session.channel().await?;
        let qos = source.basic_qos(WINDOW, BasicQosOptions::default());
        session.call("set the mover's prefetch", qos).await?;
        let target = session.channel().await?;
        let confirms = target.confirm_select(ConfirmSelectOptions::default());
        session.call("turn on publisher confirms", confirms).await?;
        let operation = format!("consume {from}");
        let consume = source.basic_consume(
            from.into(),
            "msgpipe-migrate".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let mut deliveries = match super::session::bounded(
            session.endpoint(),
            session.timeout(),
            &operation,
            consume,
        )
        .await?
        {
            Ok(consumer) => consumer,
            Err(e) if reply_code(&e) == Some(reply::NOT_FOUND) => return Ok(0),
            Err(e) => return Err(session.classify(&operation, &e)),
        };
        let mut in_flight: VecDeque<(Acker, PublisherConfirm)> = VecDeque::new();
        let mut moved = 0u64;
        let mut reported = Instant::now();
        let result: Result<(), BrokerError> = async {
            loop {
                match tokio::time::timeout(IDLE, deliveries.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        let properties = delivery.properties.clone();
                        let published = session
                            .start_publish(&target, into, &delivery.data, properties)
                            .await;
                        match published {
                            Ok(confirm) => in_flight.push_back((delivery.acker, confirm)),
                            Err(refused) => {
                                give_back(session, &delivery.acker).await;
                                return Err(moving_failed(session, from, into, refused));
                            }
                        }
                        // Half the prefetch in flight: settle them all, while the broker
                        // sends the other half (settling one at a time would wait for one
                        // delivery per ack: about 100 a second from a quorum queue).
                        if in_flight.len() >= usize::from(WINDOW / 2) {
                            let count = in_flight.len();
                            moved += settle(session, from, into, &mut in_flight, count).await?;
                        }
                    }
                    Ok(Some(Err(e))) => return Err(session.classify(&operation, &e)),
                    Ok(None) => {
                        return Err(BrokerError::Rejected {
                            endpoint: session.endpoint().to_string(),
                            operation: operation.clone(),
                            reason:
                                "the broker cancelled the mover's consumer (was the queue deleted?)"
                                    .into(),
                        });
                    }
                    Err(_idle) => {
                        let count = in_flight.len();
                        moved += settle(session, from, into, &mut in_flight, count).await?;
                        if self.drained(vhost, from, feeders).await? {
                            return Ok(());
                        }
                    }
                }
                if reported.elapsed() >= REPORT_EVERY {
                    reported = Instant::now();
                    let remaining = self.ready(vhost, from).await?.unwrap_or(0);
                    progress(DrainProgress {
                        from: from.into(),
                        into: into.into(),
                        moved,
                        remaining,
                    });
                }
            }
        }
        .await;
        // What is still in flight settles before the channels close: a copy confirmed is
        // acked (moved); one that is not goes back to `from` when the channel closes.
        let count = in_flight.len();
        let tail = settle(session, from, into, &mut in_flight, count).await;
        let cancel = source.basic_cancel(deliveries.tag(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(session.timeout(), cancel).await;
        close_channel(&target).await;
        close_channel(&source).await;
        result?;
        moved += tail?;
        Ok(moved)
    }

    /// Moves `from` into `into` with dynamic shovels, one after another, each moving the
    /// messages `from` held when it started and then deleting itself
    /// (`src-delete-after: queue-length`), until `from` and `feeders` are drained. The shovel
    /// runs inside the broker as the user who created it: its URIs carry no credentials.
    async fn drain_by_shovel(
        &self,
        vhost: &str,
        from: &str,
        into: &str,
        feeders: &[String],
        progress: &mut (dyn FnMut(DrainProgress) + Send),
    ) -> Result<u64, BrokerError> {
        let name = format!("msgpipe-migrate-{from}");
        let quiet = self.delete_settle().max(IDLE * 2);
        let mut moved = 0u64;
        loop {
            let Some(ready) = self.ready(vhost, from).await? else {
                return Ok(moved);
            };
            if ready == 0 {
                if self.drained(vhost, from, feeders).await? {
                    return Ok(moved);
                }
                tokio::time::sleep(IDLE).await;
                continue;
            }
            self.start_shovel(vhost, &name, from, into).await?;
            // (ready, held by consumers or the shovel) when it last changed.
            let mut last_change = (Instant::now(), (ready, 0));
            let mut left = ready;
            while self.shovel_exists(vhost, &name).await? {
                tokio::time::sleep(Duration::from_millis(200)).await;
                left = self.ready(vhost, from).await?.unwrap_or(0);
                let held = self
                    .queue_stats(vhost, from)
                    .await?
                    .map_or(0, |s| s.unacknowledged);
                progress(DrainProgress {
                    from: from.into(),
                    into: into.into(),
                    moved: moved + ready.saturating_sub(left + held),
                    remaining: left,
                });
                if (left, held) != last_change.1 {
                    last_change = (Instant::now(), (left, held));
                } else if left == 0 && held == 0 && last_change.0.elapsed() > quiet {
                    // Consumers took some of the messages it was started for, and it waits
                    // for more that will not come: stop it, and look again. Only after the
                    // figures had time to show what it holds (they lag by the statistics
                    // interval, which the settle covers): stopping a shovel with copies
                    // confirmed but not acked duplicates them.
                    self.stop_shovel(vhost, &name).await?;
                    break;
                } else if last_change.0.elapsed() > SHOVEL_STALL {
                    // Blocked (a memory or disk alarm) or failing: stop it (what it holds
                    // unconfirmed goes back to `from`) and say so; a later run resumes.
                    self.stop_shovel(vhost, &name).await?;
                    return Err(BrokerError::Rejected {
                        endpoint: self.endpoint().to_string(),
                        operation: format!("move {from} into {into} with shovel {name}"),
                        reason: format!(
                            "the shovel moved nothing for {}s ({left} messages ready, {held} in flight): is a node in a memory or disk alarm? It was stopped; run the migration again to resume",
                            SHOVEL_STALL.as_secs()
                        ),
                    });
                }
            }
            moved += ready.saturating_sub(left);
        }
    }

    fn shovel_url(&self, vhost: &str, name: &str) -> String {
        format!(
            "{}/parameters/shovel/{}/{}",
            self.endpoint().management_api(),
            encode(vhost),
            encode(name)
        )
    }

    async fn start_shovel(
        &self,
        vhost: &str,
        name: &str,
        from: &str,
        into: &str,
    ) -> Result<(), BrokerError> {
        // `amqp:///vhost`: the local node, as the user who declares the shovel.
        let local = format!("amqp:///{}", encode(vhost));
        let body = serde_json::json!({"value": {
            "src-protocol": "amqp091",
            "src-uri": local,
            "src-queue": from,
            "src-predeclared": true,
            "src-delete-after": "queue-length",
            "dest-protocol": "amqp091",
            "dest-uri": local,
            "dest-queue": into,
            "dest-predeclared": true,
            "ack-mode": "on-confirm",
        }});
        let operation = format!("start shovel {name} ({from} -> {into})");
        let url = self.shovel_url(vhost, name);
        let response = self.raw_put_json(&url, &body, &operation).await?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(self.raw_error(&operation, vhost, status, &text).await)
    }

    async fn shovel_exists(&self, vhost: &str, name: &str) -> Result<bool, BrokerError> {
        let url = self.shovel_url(vhost, name);
        let operation = format!("read shovel {name}");
        let response = self.raw_request(Method::GET, &url, &operation).await?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => {
                let text = response.text().await.unwrap_or_default();
                Err(self.raw_error(&operation, vhost, status, &text).await)
            }
        }
    }

    async fn stop_shovel(&self, vhost: &str, name: &str) -> Result<(), BrokerError> {
        let url = self.shovel_url(vhost, name);
        let operation = format!("stop shovel {name}");
        let response = self.raw_request(Method::DELETE, &url, &operation).await?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) || status == 404 {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(self.raw_error(&operation, vhost, status, &text).await)
    }
}

/// Settles the oldest `count` copies in flight: each confirmed copy's original is acked;
/// the first copy that did not land stops the move (its original is given back). Returns how
/// many were moved.
async fn settle(
    session: &AmqpSession,
    from: &str,
    into: &str,
    in_flight: &mut VecDeque<(Acker, PublisherConfirm)>,
    count: usize,
) -> Result<u64, BrokerError> {
    let mut moved = 0;
    for _ in 0..count {
        let Some((acker, confirm)) = in_flight.pop_front() else {
            break;
        };
        if let Err(refused) = session.confirmed(into, confirm).await {
            give_back(session, &acker).await;
            return Err(moving_failed(session, from, into, refused));
        }
        let ack = acker.ack(BasicAckOptions::default());
        session
            .call(&format!("acknowledge a message moved from {from}"), ack)
            .await?;
        moved += 1;
    }
    Ok(moved)
}

/// A node's row of `GET /api/nodes`; figures a node has not reported yet do not refuse.
fn node_room(row: &serde_json::Value) -> NodeRoom {
    NodeRoom {
        node: row["name"].as_str().unwrap_or_default().to_string(),
        memory_alarm: row["mem_alarm"].as_bool().unwrap_or(false),
        disk_alarm: row["disk_free_alarm"].as_bool().unwrap_or(false),
        disk_free: row["disk_free"].as_u64().unwrap_or(u64::MAX),
        disk_free_limit: row["disk_free_limit"].as_u64().unwrap_or(0),
    }
}

/// Best effort: if the connection is gone, the broker requeues the message anyway.
async fn give_back(session: &AmqpSession, acker: &Acker) {
    let requeue = acker.reject(BasicRejectOptions { requeue: true });
    let _ = tokio::time::timeout(session.timeout(), requeue).await;
}

fn moving_failed(
    session: &AmqpSession,
    from: &str,
    into: &str,
    refused: PublishRefused,
) -> BrokerError {
    match refused {
        PublishRefused::Unconfirmed(error) => error,
        other => BrokerError::Rejected {
            endpoint: session.endpoint().to_string(),
            operation: format!("move a message from {from} into {into}"),
            reason: format!("the copy {other}; the message stays in {from}"),
        },
    }
}
