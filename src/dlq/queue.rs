//! The AMQP side of `msgpipe dlq`: browse a DLQ without taking messages, replay them with
//! confirms, purge it. Sessions, timeouts and error classification are the broker edge's
//! ([`AmqpSession`]); errors never carry the password.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicRejectOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, Channel};

use super::letter::{DeadLetter, RawDeadLetter};
use super::replay::{ReplaySelection, ReplayTarget, Skipped, replay_properties, replay_target};
use super::{DlqError, ReplayFailure};
use crate::broker::session::{PublishRefused, close_channel};
use crate::broker::{AmqpSession, BrokerEndpoint};
use crate::plan::PipelineNames;

/// Longest wait for the messages a closed channel held to be back in the DLQ.
const SETTLE_PATIENCE: Duration = Duration::from_secs(5);

/// One DLQ on one broker vhost, over a connection of its own.
pub struct DeadLetterQueue {
    session: AmqpSession,
    queue: String,
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
    /// Read but not replayed: not selected, or copies of this replay that came back.
    pub skipped: usize,
    /// Messages ready in the DLQ once the replay ended.
    pub remaining: u64,
    /// The [`ReplayControl`] halted the run before every selected dead letter was replayed
    /// (kill switch, suspend); the rest are still in the DLQ.
    pub halted: bool,
}

/// Whether a replay goes on with the next copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop before the next copy; the dead letter in hand goes back to the DLQ unchanged.
    Halt,
}

/// What a caller decides and sees while a replay runs: asked before each copy (a kill
/// switch, a suspend), told after each one. The copy/ack protocol stays in
/// [`DeadLetterQueue::replay_with`].
pub trait ReplayControl {
    /// Before the next copy of a selected dead letter; `progress` is the run so far.
    fn before_copy(
        &mut self,
        dlq: &DeadLetterQueue,
        progress: &ReplayOutcome,
    ) -> impl Future<Output = Flow> + Send;
    /// After a dead letter was replayed (its copy confirmed and the dead letter acked), or
    /// in a dry run, would be.
    fn replayed(&mut self, letter: &DeadLetter, to: &ReplayTarget);
}

/// A control that only watches: every copy goes ahead.
struct Observe<F>(F);

impl<F: FnMut(&DeadLetter, &ReplayTarget) + Send> ReplayControl for Observe<F> {
    fn before_copy(
        &mut self,
        _: &DeadLetterQueue,
        _: &ReplayOutcome,
    ) -> impl Future<Output = Flow> + Send {
        std::future::ready(Flow::Continue)
    }

    fn replayed(&mut self, letter: &DeadLetter, to: &ReplayTarget) {
        (self.0)(letter, to);
    }
}

/// How a replay runs: what it takes, how fast, and under which id.
#[derive(Clone, Debug)]
pub struct ReplayRun {
    pub selection: ReplaySelection,
    /// Copies published per second at most (None: as fast as the broker confirms).
    pub rate: Option<f64>,
    /// Names this replay in every copy (`x-msgpipe-replay-id`); reuse it to resume.
    pub replay_id: String,
    /// Read and report only; publish and remove nothing.
    pub dry_run: bool,
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
        let session = AmqpSession::open(endpoint, vhost, timeout, "msgpipe dlq").await?;
        let dlq = DeadLetterQueue {
            session,
            queue: queue.to_string(),
        };
        dlq.depth().await?;
        Ok(dlq)
    }

    pub fn name(&self) -> &str {
        &self.queue
    }

    /// Closes the connection; anything still unacknowledged returns to the DLQ.
    pub async fn close(self) {
        self.session.close().await;
    }

    /// Ready messages, exactly (passive declare).
    pub async fn depth(&self) -> Result<u64, DlqError> {
        match self.session.queue_depth(&self.queue).await? {
            Some(depth) => Ok(depth.messages),
            None => Err(self.not_found(&self.queue)),
        }
    }

    fn not_found(&self, queue: &str) -> DlqError {
        DlqError::QueueNotFound {
            endpoint: self.session.endpoint().to_string(),
            vhost: self.session.vhost().to_string(),
            queue: queue.to_string(),
        }
    }

    /// Reads up to `limit` dead letters from the head without acknowledging them, then closes
    /// the channel so the broker puts every one back (see the module docs for the cost).
    pub async fn browse(&self, limit: usize) -> Result<Browse, DlqError> {
        let depth = self.depth().await?;
        let channel = self.session.channel().await?;
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
        close_channel(&channel).await;
        result?;
        self.settled(depth).await?;
        Ok(Browse { depth, letters })
    }

    /// Replays the selected dead letters to the pipeline's work queue, one at a time:
    /// publish a copy (confirm channel, mandatory, default exchange with the work queue's
    /// name), and only once the broker confirmed it and did not return it, ack the dead
    /// letter. Anything else puts the dead letter back and stops. `on_replayed` runs after
    /// each dead letter is replayed (or, in a dry run, would be). Memory holds one message
    /// at a time, whatever the DLQ's size.
    pub async fn replay(
        &self,
        run: &ReplayRun,
        names: &PipelineNames,
        on_replayed: impl FnMut(&DeadLetter, &ReplayTarget) + Send,
    ) -> Result<ReplayOutcome, DlqError> {
        self.replay_with(run, names, &mut Observe(on_replayed))
            .await
    }

    /// [`Self::replay`], asking `control` before each copy whether to go on.
    pub async fn replay_with(
        &self,
        run: &ReplayRun,
        names: &PipelineNames,
        control: &mut impl ReplayControl,
    ) -> Result<ReplayOutcome, DlqError> {
        let depth = self.depth().await?;
        if self.session.queue_depth(&names.queue).await?.is_none() {
            return Err(self.not_found(&names.queue));
        }
        let source = self.session.channel().await?;
        let target = self.session.channel().await?;
        if !run.dry_run {
            self.session
                .call(
                    "turn on publisher confirms",
                    target.confirm_select(ConfirmSelectOptions::default()),
                )
                .await?;
        }
        let replayed_at = format!("{:.3}", Timestamp::now());
        let mut outcome = ReplayOutcome {
            depth,
            examined: 0,
            replayed: 0,
            skipped: 0,
            remaining: depth,
            halted: false,
        };
        let mut found_ids: Vec<String> = Vec::new();
        let mut pacer = Pacer::new(run.rate, Instant::now());
        let scan = usize::try_from(depth).unwrap_or(usize::MAX);
        let result = async {
            for index in 1..=scan {
                if run.selection.done(outcome.replayed, found_ids.len()) {
                    break;
                }
                let got = self.get(&source, index).await;
                let Some((raw, acker)) = got.map_err(|e| self.interrupted(outcome.replayed, e))?
                else {
                    break;
                };
                outcome.examined = index;
                let letter = DeadLetter::interpret(&raw);
                match run.selection.check(&raw, &letter) {
                    // Held unacknowledged; back in the DLQ when the channel closes.
                    Err(Skipped::NotSelected | Skipped::AlreadyReplayed) => {
                        outcome.skipped += 1;
                        continue;
                    }
                    Ok(()) => {}
                }
                if run.selection.ids.is_some() {
                    found_ids.extend(letter.message_id.clone());
                }
                let to = replay_target(&letter, names);
                if !run.dry_run {
                    // Held unacknowledged; back in the DLQ when the channel closes.
                    if control.before_copy(self, &outcome).await == Flow::Halt {
                        outcome.halted = true;
                        break;
                    }
                    pacer.wait().await;
                    let copy = Copy {
                        raw: &raw,
                        acker: &acker,
                        to: &to,
                        replayed_at: &replayed_at,
                        replay_id: &run.replay_id,
                    };
                    if let Err(cause) = self.replay_one(&target, copy).await {
                        return Err(DlqError::ReplayStopped {
                            queue: self.queue.clone(),
                            replayed: outcome.replayed,
                            message: describe(&letter),
                            cause,
                        });
                    }
                }
                outcome.replayed += 1;
                control.replayed(&letter, &to);
            }
            Ok(())
        }
        .await;
        close_channel(&target).await;
        close_channel(&source).await;
        result?;
        let acked = if run.dry_run { 0 } else { outcome.replayed };
        let left = depth.saturating_sub(acked as u64);
        outcome.remaining = self.settled(left).await.unwrap_or(outcome.remaining);
        let missing = run
            .selection
            .missing_ids(found_ids.iter().map(String::as_str));
        if !missing.is_empty() && !outcome.halted {
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
    async fn replay_one(&self, channel: &Channel, copy: Copy<'_>) -> Result<(), ReplayFailure> {
        let confirmed = self.publish_confirmed(channel, &copy).await;
        if let Err(failure) = confirmed {
            // Best effort: if the connection is gone, the broker requeues it anyway.
            let requeue = copy.acker.reject(BasicRejectOptions { requeue: true });
            let _ = tokio::time::timeout(self.session.timeout(), requeue).await;
            return Err(failure);
        }
        self.session
            .call(
                "remove the replayed dead letter",
                copy.acker.ack(BasicAckOptions::default()),
            )
            .await
            .map(|_| ())
            .map_err(ReplayFailure::AckFailed)
    }

    async fn publish_confirmed(
        &self,
        channel: &Channel,
        copy: &Copy<'_>,
    ) -> Result<(), ReplayFailure> {
        let properties = replay_properties(
            &copy.raw.properties,
            copy.to,
            copy.replayed_at,
            copy.replay_id,
        );
        let queue = copy.to.queue.as_str();
        let landed = async {
            let confirm = self
                .session
                .start_publish(channel, queue, &copy.raw.body, properties)
                .await?;
            self.session.confirmed(queue, confirm).await
        };
        landed.await.map_err(|refused| match refused {
            PublishRefused::Returned { queue } => ReplayFailure::Unroutable { queue },
            PublishRefused::Nacked => ReplayFailure::Nacked,
            PublishRefused::Unconfirmed(error) => ReplayFailure::Unconfirmed(error),
        })
    }

    /// Dead letters ready in the DLQ that carry `replay_id` (copies of that replay that failed
    /// again). Reads every ready message without taking it (as [`Self::browse`] does), so it
    /// costs one `basic.get` per message; dead letters a running replay holds are not seen.
    pub async fn count_replay_copies(&self, replay_id: &str) -> Result<u64, DlqError> {
        let depth = self.depth().await?;
        let channel = self.session.channel().await?;
        let result = async {
            let mut count = 0;
            for index in 1..=usize::try_from(depth).unwrap_or(usize::MAX) {
                let Some((letter, _)) = self.get(&channel, index).await? else {
                    break;
                };
                if letter.replay_id().is_some_and(|id| id == replay_id) {
                    count += 1;
                }
            }
            Ok::<u64, DlqError>(count)
        }
        .await;
        close_channel(&channel).await;
        let count = result?;
        self.settled(depth).await?;
        Ok(count)
    }

    /// Waits until the DLQ holds at least `expected` ready messages again, at most
    /// [`SETTLE_PATIENCE`]; returns the depth. The broker puts back the messages a closed
    /// channel held asynchronously (a quorum queue through its log), so without this the next
    /// read right after a browse can find the queue short, or empty.
    async fn settled(&self, expected: u64) -> Result<u64, DlqError> {
        let deadline = Instant::now() + SETTLE_PATIENCE.min(self.session.timeout());
        loop {
            let depth = self.depth().await?;
            if depth >= expected || Instant::now() >= deadline {
                return Ok(depth);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens a tap on the pipeline's dead-letter exchange (fanout): a private queue that gets
    /// a copy of every dead letter arriving from now on, so a replay can see its copies come
    /// back without reading the whole DLQ. Exclusive and auto-delete: it goes with the
    /// connection, and leaves nothing behind on the broker.
    pub async fn tap(&self, exchange: &str) -> Result<DeadLetterTap, DlqError> {
        let channel = self.session.channel().await?;
        let mut arguments = FieldTable::default();
        // Exclusive queues are classic whatever the vhost's default queue type.
        arguments.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("classic".into()),
        );
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let declare = channel.queue_declare("".into(), options, arguments);
        let queue = self
            .session
            .call("declare the replay's dead-letter tap", declare)
            .await?
            .name()
            .as_str()
            .to_string();
        let bind = channel.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        self.session
            .call("bind the dead-letter tap to the dead-letter exchange", bind)
            .await?;
        Ok(DeadLetterTap { channel, queue })
    }

    /// Takes what the tap received since the last call; returns how many carry `replay_id`.
    pub async fn drain_tap(&self, tap: &DeadLetterTap, replay_id: &str) -> Result<u64, DlqError> {
        let mut count = 0;
        loop {
            let get = tap
                .channel
                .basic_get(tap.queue.as_str().into(), BasicGetOptions { no_ack: true });
            let Some(BasicGetMessage { delivery, .. }) =
                self.session.call("read the dead-letter tap", get).await?
            else {
                return Ok(count);
            };
            let letter = RawDeadLetter {
                index: 0,
                exchange: String::new(),
                routing_key: String::new(),
                properties: delivery.properties,
                body: Vec::new(),
            };
            if letter.replay_id().is_some_and(|id| id == replay_id) {
                count += 1;
            }
        }
    }

    /// Deletes every message in the DLQ; returns how many there were.
    pub async fn purge(&self) -> Result<u64, DlqError> {
        let channel = self.session.channel().await?;
        let purge = channel.queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default());
        let result = self.session.call("purge the DLQ", purge).await;
        close_channel(&channel).await;
        Ok(u64::from(result?))
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
        let Some(BasicGetMessage { delivery, .. }) =
            self.session.call("read a dead letter", get).await?
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
}

/// A private queue bound to the dead-letter exchange ([`DeadLetterQueue::tap`]).
#[derive(Debug)]
pub struct DeadLetterTap {
    channel: Channel,
    queue: String,
}

/// One dead letter on its way back, and how to settle it.
struct Copy<'a> {
    raw: &'a RawDeadLetter,
    acker: &'a Acker,
    to: &'a ReplayTarget,
    replayed_at: &'a str,
    replay_id: &'a str,
}

/// Copies at most `rate` per second, evenly spaced. After a stall (a slow broker call, a
/// status write, a kill-switch check) it catches up on at most [`CATCH_UP`] of lost time, so
/// the work queue never gets a burst bigger than one second of the rate.
struct Pacer {
    interval: Option<Duration>,
    /// When the next copy may go.
    next: Instant,
}

/// Lost time a [`Pacer`] makes up for; beyond it the schedule starts over.
const CATCH_UP: Duration = Duration::from_secs(1);

impl Pacer {
    fn new(rate: Option<f64>, start: Instant) -> Self {
        Pacer {
            interval: rate
                .filter(|r| *r > 0.0 && r.is_finite())
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            next: start,
        }
    }

    /// When the next copy may go, asked at `now`; moves the schedule on by one copy.
    fn slot(&mut self, now: Instant) -> Instant {
        let Some(interval) = self.interval else {
            return now;
        };
        if now.saturating_duration_since(self.next) > CATCH_UP {
            self.next = now - CATCH_UP;
        }
        let slot = self.next;
        self.next += interval;
        slot
    }

    async fn wait(&mut self) {
        let slot = self.slot(Instant::now());
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// `message id X` or `#N (no message id)`, for errors.
fn describe(letter: &DeadLetter) -> String {
    match &letter.message_id {
        Some(id) => format!("#{} (message id {id})", letter.index),
        None => format!("#{} (no message id)", letter.index),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spaces_copies_and_a_stall_buys_at_most_one_second_of_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(Some(100.0), start);
        let ms = |d: Instant| d.saturating_duration_since(start).as_millis();
        assert_eq!(ms(pacer.slot(start)), 0);
        assert_eq!(ms(pacer.slot(start)), 10);
        assert_eq!(ms(pacer.slot(start)), 20);
        // A 5 s stall: the copies due meanwhile are not all sent at once.
        let late = start + Duration::from_secs(5);
        let burst = (0..1000).take_while(|_| pacer.slot(late) <= late).count();
        assert_eq!(
            burst, 101,
            "one second of the rate (100), plus the one due now"
        );
        let mut unpaced = Pacer::new(None, start);
        assert_eq!(unpaced.slot(late), late);
    }
}
