//! Client library for msgpipe pipelines: a consumer that retries with backoff and dead-letters
//! with reasons, and a publisher that never drops a message when the broker is away.
//!
//! The operator publishes each pipeline's topology and client feature flags as `pipeline.json`
//! in the ConfigMap `<pipeline>-client`; this crate reads that contract
//! ([`config::PipelineConfig`]), keeps it live ([`LiveConfig`]), and implements the protocol
//! the operator's topology is built for. It has no Kubernetes dependency.
//!
//! # Usage
//!
//! ```no_run
//! use std::time::Duration;
//! use msgpipe_client::{
//!     BasicProperties, Consumer, ConsumerOptions, HandlerError, LiveConfig, Message, Outcome,
//!     Publisher, PublisherOptions,
//! };
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let uri = "amqp://notes:secret@rabbitmq:5672/%2f";
//! // pipeline.json from the mounted ConfigMap (or MSGPIPE_PIPELINE_CONFIG), re-read every 5 s.
//! let config = LiveConfig::watch("/etc/msgpipe/pipeline.json", Duration::from_secs(5)).await?;
//!
//! // Publish: Confirmed by the broker, or Queued in the local outbox and resent later.
//! let publisher = Publisher::start(PublisherOptions::new(uri, "/var/lib/notes/outbox.redb"), config.clone()).await?;
//! match publisher.publish(b"{\"note\": \"hello\"}", BasicProperties::default()).await? {
//!     Outcome::Confirmed { message_id } => println!("sent {message_id}"),
//!     Outcome::Queued { message_id } => println!("saved {message_id}; will resend"),
//! }
//!
//! // Consume: Ok acks; Retryable goes to the next retry tier (then the DLQ); Permanent to the DLQ.
//! let consumer = Consumer::new(ConsumerOptions::new(uri), config)?;
//! let stop = consumer.shutdown_handle();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     stop.shutdown(); // stop consuming, finish the handlers in flight
//! });
//! consumer
//!     .run(|message: Message| async move {
//!         let text = std::str::from_utf8(message.body()).map_err(HandlerError::permanent)?;
//!         save_note(text).await.map_err(HandlerError::retryable)
//!     })
//!     .await;
//! # Ok(()) }
//! # async fn save_note(_: &str) -> Result<(), std::io::Error> { Ok(()) }
//! ```
//!
//! # Delivery guarantees
//!
//! **At least once, end to end.** Nothing is acked or dropped before it is safely elsewhere;
//! in exchange, a message can arrive more than once. Consumers drop duplicates by message id.
//!
//! - Publisher: `Ok(Outcome::Confirmed)` means the broker confirmed the message *and* routed it
//!   (`mandatory`); `Ok(Outcome::Queued)` means it is committed (fsync) to the outbox, which
//!   survives `kill -9`. `Err` means neither: the caller still owns the message. Duplicates
//!   come from a confirm that arrived too late (the message was also queued), and from a crash
//!   between a resend's confirm and its removal from the outbox. Every message carries a stable
//!   `message_id` (the caller's, or a UUID v7 set once at publish) that all copies keep.
//! - Publisher start-up: when the broker is reachable, [`Publisher::start`] returns with the
//!   link up, so the first publish is confirmed rather than queued.
//! - Resending: the outbox is resent as soon as the link comes (back) up (after a jitter of at
//!   most [`PublisherOptions::resend_jitter`], 0.5 s by default), then every
//!   `retry_interval_seconds` while messages remain, all while `retry_pending` is on.
//!   `retry_pending: false` parks the outbox: its messages wait on disk, and fresh publishes go
//!   straight to the broker rather than queueing behind them.
//! - Started before its pipeline: when the broker is up but the exchange does not exist (the
//!   broker closes the channel with 404) or returns the message unroutable, the publisher says
//!   so once at warn ("exchange notes does not exist in vhost v: is the pipeline applied?"),
//!   keeps its connection (only the channel is reopened), and probes on a short backoff
//!   ([`PublisherOptions::route_retry`], 250 ms doubling to 3 s) instead of the resend
//!   interval with the oldest outbox message alone (so nothing overtakes it while the pipeline
//!   is half applied), then sends the rest: the outbox is delivered in order within about 3 s
//!   of the route appearing. A message nacked by a full queue is retried the same way. lapin itself
//!   logs each channel the broker closes at ERROR and each returned message at WARN; the
//!   client reports both in its own words, so applications may filter `lapin=off`.
//! - Ordering: the outbox is resent oldest first, and while it holds anything (and
//!   `retry_pending` is on) new messages queue behind it, so a single publisher's messages reach
//!   the broker in publish order, except around a message the broker refuses (returned or
//!   nacked), which waits for the next round while later ones go on, and except that fresh
//!   messages overtake a parked outbox.
//! - Consumer: the handler's success is acked after the handler returns; a crash in between
//!   redelivers the message (`Message::redelivered`). A failure republishes a copy to the retry
//!   tier or the DLQ on a confirm channel with `mandatory` and acks the original only after the
//!   copy is confirmed and routed; otherwise the original is given back to its queue with
//!   `basic.reject(requeue = true)` after a pause that doubles while give-backs continue
//!   ([`ConsumerOptions::give_back_backoff`], 0.5 s to 30 s). A crash between the copy's confirm
//!   and the ack leaves two copies: the original comes back at the same attempt (only handler
//!   failures count attempts). On a quorum work queue the operator's delivery limit bounds such
//!   give-backs: a message the client can never move (say its retry tier is missing from the
//!   broker) ends in the DLQ by the broker's own dead-lettering (`x-first-death-reason:
//!   delivery_limit`). That is why the client rejects and never nacks: RabbitMQ 4.3 does not
//!   count `basic.nack(requeue)` toward `delivery-limit`, while `basic.reject(requeue)` and a
//!   closed channel count on 3.10, 4.0 and 4.3 alike.
//! - Copies keep body and properties, become persistent, lose any per-message `expiration`
//!   (kept in [`headers::ORIGINAL_EXPIRATION`]) and get a UUID v7 `message_id` if they had none.
//!
//! # Header contract
//!
//! Shared with `msgpipe dlq` and users' tools; see [`headers`].
//!
//! | header | on retried copies | on dead letters | value |
//! |---|---|---|---|
//! | `x-retry-count` | attempt that failed (k) | retries done (attempts − 1) | integer |
//! | `x-msgpipe-error` | last error | last error | text, at most 4 KiB |
//! | `x-msgpipe-reason` | — | `permanent` or `max-attempts` | text |
//! | `x-msgpipe-attempts` | — | handler calls made | integer |
//! | `x-msgpipe-first-failure` | kept, else now | kept, else now | RFC 3339 UTC |
//! | `x-msgpipe-last-failure` | now | now | RFC 3339 UTC |
//! | `x-msgpipe-original-exchange` | kept, else the delivery's | same | text |
//! | `x-msgpipe-original-routing-key` | kept, else the delivery's | same | text |
//! | `x-msgpipe-original-expiration` | if it had one | if it had one | text (ms) |
//!
//! Attempt = `x-retry-count` + 1. A failure at attempt k < `max_attempts` goes to the tier
//! [`PipelineConfig::tier_for_attempt`]`(k)` names, on the retry exchange with that tier's
//! routing key; the tier queue's TTL then dead-letters it back to the work queue alone. A
//! failure at attempt `max_attempts`, or a permanent one, goes to the dead-letter exchange with
//! the original routing key.
//!
//! # Why the outbox is redb
//!
//! The outbox needs an ordered, crash-safe, fsync-on-commit store in a library that many
//! services embed. [`redb`] is pure Rust (no C toolchain, no cross-compiling pain, nothing
//! for `cargo audit` to find in vendored C), ACID with copy-on-write B-trees and fsync'd commits
//! by default, actively maintained, and adds a few seconds of compile time. SQLite through
//! `rusqlite` with the `bundled` feature would do the job equally well on disk, but compiles
//! ~250k lines of C into every consumer of this crate (tens of seconds per clean build on a
//! small CI runner) for SQL we would not use: the outbox is one `u64 -> bytes` table read in
//! key order. redb's cost is a file lock (one publisher process per outbox file) and a repair
//! pass when a crashed file is reopened, proportional to its size, which a bounded outbox keeps
//! small.
//!
//! # TLS
//!
//! `amqps://` URIs are verified against the OS trust store. A broker whose certificate comes
//! from a private CA needs that CA: set [`ConsumerOptions::ca_file`] /
//! [`PublisherOptions::ca_file`] to its PEM file, or the environment variable
//! `MSGPIPE_CA_FILE` ([`CA_FILE_ENV`]), which both `new` constructors read. (The operator and
//! the CLI take the same file with `--ca-file`.)
//!
//! # Credentials
//!
//! The `Debug` output of the options, the consumer and the publisher shows URIs with the
//! password replaced by `***`, and no error carries the URI.
//!
//! # Reconnecting
//!
//! Both the consumer and the publisher run their own reconnect loop with capped exponential
//! backoff ([`Backoff`], 200 ms doubling to 30 s by default, ±20 % jitter) instead of lapin's
//! auto-recovery. Measured with lapin 4.12 through a TCP proxy that cuts the connection:
//! auto-recovery resumed a consumer after 0.3 s cuts, but after a 4 s outage the connection
//! stayed down for good (2,500 of 3,000 messages never consumed, no error on the stream). The
//! own loop survives any outage length (`tests/consumer.rs` cuts it twice for 4 s).
//! Acks, rejects and channel setup are time-boxed too: on a connection that just died lapin can
//! leave them unanswered, which would hold a handler slot forever.
//!
//! The consumer reads the queue name when it connects and everything else (max attempts,
//! tiers, exchanges) per message, so a changed `pipeline.json` applies to the next message.

#![warn(missing_docs)]

pub mod config;
mod connection;
pub mod consumer;
pub mod headers;
pub mod live;
pub mod outbox;
mod publish;
pub mod publisher;
mod retry;

pub use config::{ConfigError, Features, PipelineConfig};
pub use connection::{Backoff, CA_FILE_ENV, InvalidUri};
pub use consumer::{
    Consumer, ConsumerError, ConsumerOptions, ConsumerStats, ConsumerStatsHandle, HandlerError,
    Message, ShutdownHandle,
};
pub use lapin::BasicProperties;
pub use live::LiveConfig;
pub use outbox::{Outbox, OutboxEntry, OutboxError, OutboxLimits};
pub use publish::PublishFailure;
pub use publisher::{
    Outcome, PublishError, Publisher, PublisherError, PublisherOptions, PublisherStats,
};
pub use retry::Destination;
