//! Dead-letter queues: read what failed and why, send it back, or throw it away.
//!
//! Pure parts (tested beside the code): [`letter`] reads the failure headers the consumer
//! library writes (`msgpipe_client::headers`) or the broker's `x-death` record, [`summary`]
//! groups dead letters by error, [`replay`] decides where a replayed copy goes and with which
//! headers, [`detail`] renders one message. The AMQP IO is in [`DeadLetterQueue`].
//!
//! # Reading without taking
//!
//! AMQP has no "peek". Browsing gets messages with `basic.get` *without* acknowledging them,
//! then closes the channel: the broker puts every unacknowledged message back where it was.
//! Works the same on classic and quorum DLQs. Two side effects, both harmless here:
//! - the messages come back marked redelivered;
//! - a quorum queue counts the browse as a delivery (`x-delivery-count` goes up). A quorum
//!   queue with a delivery limit would eventually drop or dead-letter a message browsed often
//!   enough, which is why the planner gives the DLQ an unlimited delivery limit (`-1`; on
//!   RabbitMQ 3.x no limit at all).
//!
//! While a browse runs, the messages it holds are invisible to anyone else reading the DLQ
//! (the DLQ has no consumers by design).
//!
//! # Replay without loss, to the work queue only
//!
//! Each selected dead letter is copied to the pipeline's work queue — through the default
//! exchange, by the queue's name, as retry tiers return messages, so no other queue bound to
//! the work exchange gets a copy — on a publisher-confirm channel with `mandatory`; only after the broker confirmed the copy (ack, not returned as
//! unroutable) is the dead letter acknowledged. A nack, a return, a timeout or a lost
//! connection puts the dead letter back (reject with requeue, or the broker's own requeue
//! when the connection is gone) and stops the replay with an error naming how many were
//! replayed. So a dead letter is never lost; it can be delivered twice when the connection
//! drops between the broker storing the copy and it receiving our ack of the dead letter
//! (at-least-once). The copy keeps its message id so consumers can drop such duplicates.
//!
//! The copy starts over as a first delivery: `x-retry-count`, the consumer's failure headers
//! and the broker's `x-death` / `x-first-death-*` / `x-last-death-*` / `x-delivery-count` are
//! removed; the original exchange and routing key headers stay (the routing key is added
//! when missing); `x-msgpipe-replayed-at`, `x-msgpipe-replay-count` and
//! `x-msgpipe-replay-id` record the replay; the message is made persistent.
//!
//! # Selection, rate and resuming
//!
//! A replay reads the DLQ from the head, one message at a time (memory holds one message,
//! whatever the DLQ's size), up to the depth it had at the start, and replays those its
//! [`ReplaySelection`] takes (ids, reason, error regex, failure time, limit), at most `rate`
//! per second. Every copy carries the replay's id; a replay resumed under the same id skips
//! dead letters that carry it (copies of this replay that failed again), so running it
//! again after an interruption replays only what was left.
//!
//! # Control and kill switch
//!
//! [`DeadLetterQueue::replay_with`] asks a [`ReplayControl`] before each copy whether to go
//! on (the CLI's `--stop-when`, the operator's suspend and status writes); a halt puts the
//! dead letter in hand back untouched. [`stop`] holds the kill-switch rule and its pure
//! sliding-window decision. A replay's copies back in the DLQ are counted once by reading
//! the DLQ ([`DeadLetterQueue::count_replay_copies`]), then followed as they arrive through a
//! tap on the fanout dead-letter exchange ([`DeadLetterQueue::tap`]), which costs one read
//! per new dead letter instead of one per dead letter in the DLQ. After any read that held messages, the next read waits until the
//! broker has put them back (a quorum queue does so asynchronously).

pub mod detail;
pub mod letter;
mod queue;
pub mod replay;
pub mod stop;
pub mod summary;
pub mod value;

use crate::broker::BrokerError;

pub use detail::DeadLetterDetail;
pub use letter::{DeadLetter, RawDeadLetter, ReasonSource};
pub use queue::{
    Browse, DeadLetterQueue, DeadLetterTap, Flow, ReplayControl, ReplayOutcome, ReplayRun,
};
pub use replay::{REPLAY_ID, ReplaySelection, ReplayTarget, Skipped};
pub use stop::{FailureWatch, KillSwitch, StopWhen, Trip};
pub use summary::{FailureGroup, GroupBy};

/// Why a DLQ command failed. Never carries the broker password.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "queue {queue:?} does not exist in vhost {vhost:?} on broker {endpoint} (has the pipeline been applied?)"
    )]
    QueueNotFound {
        endpoint: String,
        vhost: String,
        queue: String,
    },
    #[error(
        "replay stopped at dead letter {message} after {replayed} were replayed; it and the rest are still in {queue}: {cause}"
    )]
    ReplayStopped {
        queue: String,
        replayed: usize,
        message: String,
        cause: ReplayFailure,
    },
    #[error(
        "replay interrupted after {replayed} dead letters were replayed; the rest are still in {queue}: {cause}"
    )]
    ReplayInterrupted {
        queue: String,
        replayed: usize,
        cause: BrokerError,
    },
    #[error("{replayed} dead letters replayed, but no dead letter in {queue} has message id {}", .missing.join(", "))]
    IdsNotFound {
        queue: String,
        replayed: usize,
        missing: Vec<String>,
    },
}

/// Why one dead letter could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayFailure {
    #[error("the broker returned the copy as unroutable: work queue {queue:?} is gone")]
    Unroutable { queue: String },
    #[error("the broker refused the copy (nack); is the work queue full (maxLength)?")]
    Nacked,
    #[error(
        "the copy was not confirmed ({0}); it may still have reached the work queue, so this dead letter may be delivered twice (its message id lets consumers drop the duplicate)"
    )]
    Unconfirmed(BrokerError),
    #[error(
        "its copy was confirmed in the work queue but removing the dead letter failed ({0}), so the message is in both queues"
    )]
    AckFailed(BrokerError),
}
