//! The publisher's durable local outbox: messages the broker did not confirm, kept on disk in
//! publish order until a resend is confirmed.
//!
//! One redb file with one table, `sequence number -> encoded message`. Every change is a redb
//! write transaction committed with [`redb::Durability::Immediate`] (fsync) before the caller
//! hears about it, so a message reported as queued survives `kill -9` and power loss. Writes go
//! through one writer thread that commits whatever has piled up in one transaction (group
//! commit): a burst of publishes during an outage costs one fsync per batch, not per message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use lapin::BasicProperties;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_messages");
/// First byte of every stored value; bumped if the encoding ever changes.
const FORMAT_V1: u8 = 1;
/// Most operations the writer thread folds into one transaction.
const MAX_BATCH: usize = 1024;

/// How large the outbox may grow. A full outbox refuses new messages with
/// [`OutboxError::Full`] rather than eating the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most messages stored. Default: 100,000.
    pub max_messages: u64,
    /// Sum of the stored (encoded) message sizes.
    pub max_bytes: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_messages: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Why the outbox could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the outbox is full ({messages} messages, {bytes} bytes; limits {max_messages} messages, {max_bytes} bytes): the broker has been unreachable for a while"
    )]
    /// The message does not fit the limits.
    Full {
        /// Messages stored now.
        messages: u64,
        /// Bytes stored now.
        bytes: u64,
        /// The message limit.
        max_messages: u64,
        /// The byte limit.
        max_bytes: u64,
    },
    #[error("cannot open the outbox {path}: {source}")]
    /// The file could not be opened or created (or is locked by another process).
    Open {
        /// The outbox file.
        path: PathBuf,
        /// What redb said.
        source: Box<redb::Error>,
    },
    #[error("outbox {operation} failed: {source}")]
    /// A read or write failed.
    Storage {
        /// What was being done.
        operation: &'static str,
        /// What redb said.
        source: Box<redb::Error>,
    },
    #[error("outbox entry {seq} is unreadable: {reason}")]
    /// A stored message cannot be decoded.
    Corrupt {
        /// Its sequence number.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    #[error("the outbox writer has stopped")]
    /// The outbox was closed (its writer thread has stopped).
    Closed,
}

/// One saved message: where it goes and what it is.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    /// Exchange to publish to.
    pub exchange: String,
    /// Routing key to publish with.
    pub routing_key: String,
    /// Message properties, message id included.
    pub properties: BasicProperties,
    /// Message body.
    pub body: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct EntryHeader<'a> {
    exchange: std::borrow::Cow<'a, str>,
    routing_key: std::borrow::Cow<'a, str>,
    properties: std::borrow::Cow<'a, BasicProperties>,
}

impl OutboxEntry {
    /// `[FORMAT_V1][header length u32 LE][JSON header][body]`; the body is stored raw.
    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let header = serde_json::to_vec(&EntryHeader {
            exchange: (&*self.exchange).into(),
            routing_key: (&*self.routing_key).into(),
            properties: std::borrow::Cow::Borrowed(&self.properties),
        })?;
        let len = u32::try_from(header.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(5 + header.len() + self.body.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    fn decode(seq: u64, bytes: &[u8]) -> Result<Self, OutboxError> {
        let corrupt = |reason: &str| OutboxError::Corrupt {
            seq,
            reason: reason.to_string(),
        };
        let (&format, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if format != FORMAT_V1 {
            return Err(corrupt(&format!("unknown format {format}")));
        }
        let len_bytes: [u8; 4] = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt("truncated"))?;
        let len = usize::try_from(u32::from_le_bytes(len_bytes)).unwrap_or(usize::MAX);
        let header = rest
            .get(4..4usize.saturating_add(len))
            .ok_or_else(|| corrupt("truncated header"))?;
        let body = &rest[4 + len..];
        let header: EntryHeader<'_> =
            serde_json::from_slice(header).map_err(|e| corrupt(&e.to_string()))?;
        Ok(Self {
            exchange: header.exchange.into_owned(),
            routing_key: header.routing_key.into_owned(),
            properties: header.properties.into_owned(),
            body: body.to_vec(),
        })
    }
}

/// Sizes kept in memory so that "is the outbox empty?" costs one atomic load on the publish path.
#[derive(Debug, Default)]
struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
}

enum WriteOp {
    Append {
        encoded: Vec<u8>,
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    Remove {
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
}

/// A durable FIFO of unconfirmed messages. Cheap to clone; all clones share one file, which
/// is closed (and may be reopened) once the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Arc<Database>,
    writer: Option<mpsc::Sender<WriteOp>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    limits: OutboxLimits,
}

impl Drop for Inner {
    /// Stops the writer thread and waits for it, so the file lock is released on return.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Append { .. } => "Append",
            Self::Remove { .. } => "Remove",
        })
    }
}

impl Outbox {
    /// Opens (or creates) the outbox file. Blocking: call it from `spawn_blocking` in async code.
    /// After a crash redb repairs the file on open, which takes time proportional to its size.
    pub fn open(path: impl AsRef<Path>, limits: OutboxLimits) -> Result<Self, OutboxError> {
        let path = path.as_ref();
        let open_error = |source: redb::Error| OutboxError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_error(redb::Error::Io(e)))?;
        }
        let db = Database::create(path).map_err(|e| open_error(e.into()))?;
        let (next_seq, counters) = Self::load(&db).map_err(open_error)?;
        let db = Arc::new(db);
        let counters = Arc::new(counters);
        let (writer, ops) = mpsc::channel();
        let thread = Writer {
            db: db.clone(),
            counters: counters.clone(),
            limits,
            next_seq,
        };
        let thread = std::thread::Builder::new()
            .name("msgpipe-outbox".into())
            .spawn(move || thread.run(&ops))
            .map_err(|e| open_error(redb::Error::Io(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                writer: Some(writer),
                thread: Some(thread),
                counters,
                limits,
            }),
        })
    }

    /// Creates the table if needed and sums what is stored.
    fn load(db: &Database) -> Result<(u64, Counters), redb::Error> {
        let txn = db.begin_write()?;
        let (next_seq, counters) = {
            let table = txn.open_table(MESSAGES)?;
            let next_seq = table
                .last()?
                .map_or(1, |(k, _)| k.value().saturating_add(1));
            let counters = Counters::default();
            for row in table.iter()? {
                let (_, value) = row?;
                counters.messages.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(value.value().len() as u64, Ordering::Relaxed);
            }
            (next_seq, counters)
        };
        txn.commit()?;
        Ok((next_seq, counters))
    }

    /// Messages stored now.
    pub fn len(&self) -> u64 {
        self.inner.counters.messages.load(Ordering::Acquire)
    }

    /// True when no message is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes stored now (encoded size of the messages).
    pub fn bytes(&self) -> u64 {
        self.inner.counters.bytes.load(Ordering::Acquire)
    }

    /// The limits this outbox was opened with.
    pub fn limits(&self) -> OutboxLimits {
        self.inner.limits
    }

    fn send(&self, op: WriteOp) -> Result<(), OutboxError> {
        let writer = self.inner.writer.as_ref().ok_or(OutboxError::Closed)?;
        writer.send(op).map_err(|_| OutboxError::Closed)
    }

    /// Saves a message behind every stored one; returns its sequence number once the commit is
    /// on disk. Fails with [`OutboxError::Full`] when the message does not fit the limits.
    pub async fn append(&self, entry: &OutboxEntry) -> Result<u64, OutboxError> {
        let encoded = entry.encode().map_err(|e| OutboxError::Corrupt {
            seq: 0,
            reason: format!("cannot encode: {e}"),
        })?;
        let (reply, answer) = oneshot::channel();
        self.send(WriteOp::Append { encoded, reply })?;
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// Deletes messages (after their resend was confirmed); unknown numbers are ignored.
    pub async fn remove(&self, seqs: Vec<u64>) -> Result<(), OutboxError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.send(WriteOp::Remove { seqs, reply })?;
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// The oldest `max` messages, in publish order.
    pub async fn oldest(&self, max: usize) -> Result<Vec<(u64, OutboxEntry)>, OutboxError> {
        self.oldest_after(0, max).await
    }

    /// The oldest `max` messages whose sequence number is above `after`, in publish order.
    pub async fn oldest_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, OutboxEntry)>, OutboxError> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || read_oldest(&db, after, max))
            .await
            .map_err(|_| OutboxError::Closed)?
    }
}

fn storage(operation: &'static str) -> impl Fn(redb::Error) -> OutboxError {
    move |source| OutboxError::Storage {
        operation,
        source: Box::new(source),
    }
}

fn read_oldest(
    db: &Database,
    after: u64,
    max: usize,
) -> Result<Vec<(u64, OutboxEntry)>, OutboxError> {
    let read = |e: redb::Error| storage("read")(e);
    let txn = db.begin_read().map_err(|e| read(e.into()))?;
    let table = txn.open_table(MESSAGES).map_err(|e| read(e.into()))?;
    let Some(start) = after.checked_add(1) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for row in table.range(start..).map_err(|e| read(e.into()))?.take(max) {
        let (seq, value) = row.map_err(|e| read(e.into()))?;
        let seq = seq.value();
        out.push((seq, OutboxEntry::decode(seq, value.value())?));
    }
    Ok(out)
}

/// Longest wait for more writers before a commit, when the previous commit served several.
const GATHER_WINDOW: std::time::Duration = std::time::Duration::from_micros(500);

/// Group commit: `first` plus whatever is queued. When the last commit served several writers
/// (concurrent publishers, each waiting for its commit before sending the next message), waits
/// up to [`GATHER_WINDOW`] for as many to arrive: without it, the first writer woken by a commit
/// gets a commit of its own and the batches alternate between one message and the rest. A lone
/// sequential writer never waits.
fn gather(first: WriteOp, ops: &mpsc::Receiver<WriteOp>, last_batch: usize) -> Vec<WriteOp> {
    let mut batch = vec![first];
    let deadline = std::time::Instant::now() + GATHER_WINDOW;
    while batch.len() < MAX_BATCH {
        match ops.try_recv() {
            Ok(op) => batch.push(op),
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if batch.len() >= last_batch || left.is_zero() {
                    break;
                }
                match ops.recv_timeout(left) {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
    }
    batch
}

/// The only thread that writes to the file.
struct Writer {
    db: Arc<Database>,
    counters: Arc<Counters>,
    limits: OutboxLimits,
    next_seq: u64,
}

impl Writer {
    fn run(mut self, ops: &mpsc::Receiver<WriteOp>) {
        let mut last_batch = 1;
        // Ends when every Outbox clone is dropped.
        while let Ok(first) = ops.recv() {
            let batch = gather(first, ops, last_batch);
            last_batch = batch.len();
            self.commit(batch);
        }
    }

    /// Applies a batch in one transaction, then answers every caller.
    fn commit(&mut self, batch: Vec<WriteOp>) {
        let mut messages = self.counters.messages.load(Ordering::Acquire);
        let mut bytes = self.counters.bytes.load(Ordering::Acquire);
        let mut next_seq = self.next_seq;
        let mut answers: Vec<(WriteOp, Result<u64, OutboxError>)> = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut table = txn.open_table(MESSAGES)?;
                for op in batch {
                    let outcome = match &op {
                        WriteOp::Append { encoded, .. } => {
                            let size = encoded.len() as u64;
                            if messages + 1 > self.limits.max_messages
                                || bytes + size > self.limits.max_bytes
                            {
                                Err(OutboxError::Full {
                                    messages,
                                    bytes,
                                    max_messages: self.limits.max_messages,
                                    max_bytes: self.limits.max_bytes,
                                })
                            } else {
                                table.insert(next_seq, encoded.as_slice())?;
                                messages += 1;
                                bytes += size;
                                next_seq += 1;
                                Ok(next_seq - 1)
                            }
                        }
                        WriteOp::Remove { seqs, .. } => {
                            for seq in seqs {
                                if let Some(old) = table.remove(*seq)? {
                                    messages = messages.saturating_sub(1);
                                    bytes = bytes.saturating_sub(old.value().len() as u64);
                                }
                            }
                            Ok(0)
                        }
                    };
                    answers.push((op, outcome));
                }
            }
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.next_seq = next_seq;
                self.counters.messages.store(messages, Ordering::Release);
                self.counters.bytes.store(bytes, Ordering::Release);
                for (op, outcome) in answers {
                    reply(op, outcome);
                }
            }
            Err(error) => {
                tracing::error!(%error, "outbox commit failed; nothing of this batch was saved");
                let text = error.to_string();
                for (op, _) in answers {
                    let failed = OutboxError::Storage {
                        operation: "commit",
                        source: Box::new(redb::Error::Io(std::io::Error::other(text.clone()))),
                    };
                    reply(op, Err(failed));
                }
            }
        }
    }
}

fn reply(op: WriteOp, outcome: Result<u64, OutboxError>) {
    // A caller that gave up waiting is not an error.
    match op {
        WriteOp::Append { reply, .. } => {
            let _ = reply.send(outcome);
        }
        WriteOp::Remove { reply, .. } => {
            let _ = reply.send(outcome.map(|_| ()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, ShortString};

    fn entry(i: usize, body_len: usize) -> OutboxEntry {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-n"),
            AMQPValue::LongLongInt(i64::try_from(i).unwrap_or(0)),
        );
        OutboxEntry {
            exchange: "notes".into(),
            routing_key: "notes".into(),
            properties: BasicProperties::default()
                .with_message_id(format!("m-{i}").into())
                .with_headers(headers)
                .with_delivery_mode(2),
            body: vec![u8::try_from(i % 251).unwrap_or(0); body_len],
        }
    }

    fn ids(entries: &[(u64, OutboxEntry)]) -> Vec<String> {
        entries
            .iter()
            .map(|(_, e)| {
                e.properties
                    .message_id()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect()
    }

    #[tokio::test]
    async fn entries_come_back_in_publish_order_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox.redb");
        {
            let outbox = Outbox::open(&path, OutboxLimits::default()).expect("open");
            let appends: Vec<_> = (0..50).map(|i| entry(i, 10)).collect();
            // Concurrent appends still get increasing sequence numbers in call order per caller.
            let mut seqs = Vec::new();
            for e in &appends {
                seqs.push(outbox.append(e).await.expect("append"));
            }
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            outbox.remove(seqs[..10].to_vec()).await.expect("remove");
            assert_eq!(outbox.len(), 40);
        }
        let reopened = Outbox::open(&path, OutboxLimits::default()).expect("reopen");
        assert_eq!(reopened.len(), 40);
        let oldest = reopened.oldest(5).await.expect("read");
        assert_eq!(ids(&oldest), ["m-10", "m-11", "m-12", "m-13", "m-14"]);
        assert_eq!(oldest[0].1, entry(10, 10), "properties and body round-trip");
        // New entries go behind the survivors.
        let seq = reopened.append(&entry(99, 1)).await.expect("append");
        assert!(seq > oldest.last().map_or(0, |(s, _)| *s));
        let all = reopened.oldest(usize::MAX).await.expect("read");
        assert_eq!(ids(&all).last().map(String::as_str), Some("m-99"));
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_with_a_typed_error_and_frees_space_on_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = OutboxLimits {
            max_messages: 3,
            max_bytes: 1 << 20,
        };
        let outbox = Outbox::open(dir.path().join("o.redb"), limits).expect("open");
        let mut seqs = Vec::new();
        for i in 0..3 {
            seqs.push(outbox.append(&entry(i, 1)).await.expect("fits"));
        }
        let full = outbox.append(&entry(3, 1)).await;
        assert!(
            matches!(
                full,
                Err(OutboxError::Full {
                    messages: 3,
                    max_messages: 3,
                    ..
                })
            ),
            "{full:?}"
        );
        outbox.remove(vec![seqs[0]]).await.expect("remove");
        outbox.append(&entry(3, 1)).await.expect("fits again");
        assert_eq!(
            ids(&outbox.oldest(10).await.expect("read")),
            ["m-1", "m-2", "m-3"]
        );
    }

    #[tokio::test]
    async fn the_byte_limit_counts_encoded_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = OutboxLimits {
            max_messages: 1_000,
            max_bytes: 5_000,
        };
        let outbox = Outbox::open(dir.path().join("o.redb"), limits).expect("open");
        outbox.append(&entry(0, 3_000)).await.expect("fits");
        assert!(outbox.bytes() > 3_000);
        let too_big = outbox.append(&entry(1, 3_000)).await;
        assert!(
            matches!(too_big, Err(OutboxError::Full { .. })),
            "{too_big:?}"
        );
        outbox.append(&entry(2, 10)).await.expect("small one fits");
        assert_eq!(outbox.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed_without_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox =
            Outbox::open(dir.path().join("o.redb"), OutboxLimits::default()).expect("open");
        let mut tasks = Vec::new();
        for i in 0..200 {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(
                async move { outbox.append(&entry(i, 8)).await },
            ));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.expect("join").expect("append"));
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 200);
        assert_eq!(outbox.len(), 200);
    }

    #[test]
    fn corrupt_values_are_reported_not_panicked_on() {
        for bytes in [
            &[][..],
            &[9, 0, 0][..],
            &[FORMAT_V1, 200, 0, 0, 0, b'{'][..],
        ] {
            assert!(OutboxEntry::decode(7, bytes).is_err());
        }
    }
}
