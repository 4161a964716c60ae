/**
 * The publisher's durable outbox (P-4, P-5, P-12): messages the broker did not confirm, kept
 * on disk in publish order until a resend is confirmed.
 *
 * SQLite through better-sqlite3, in WAL mode with `synchronous = FULL`: every commit is
 * fsync'd before the caller hears about it, so a message reported as queued survives `kill -9`
 * and power loss. Appends made in the same turn of the event loop are committed together
 * (group commit): a burst of publishes during an outage costs one fsync, not one per message.
 * The file is opened with `locking_mode = EXCLUSIVE`: one publisher process per outbox.
 */
import Database from 'better-sqlite3';
import type { Options } from 'amqplib';

/** How large the outbox may grow (P-12). */
export interface OutboxLimits {
  /** Most messages stored. Default 100,000. */
  maxMessages: number;
  /** Most bytes (bodies plus encoded properties). Default 256 MiB. */
  maxBytes: number;
}

export const DEFAULT_OUTBOX_LIMITS: OutboxLimits = { maxMessages: 100_000, maxBytes: 256 * 1024 * 1024 };

/** One saved message: where it goes and what it is. */
export interface OutboxEntry {
  readonly exchange: string;
  readonly routingKey: string;
  /** Publish options, `messageId` included. */
  readonly options: Options.Publish & { messageId: string };
  readonly body: Buffer;
}

export interface StoredEntry extends OutboxEntry {
  /** Position in the outbox (increasing, never reused). */
  readonly seq: number;
}

/** The message does not fit the outbox's limits. */
export class OutboxFullError extends Error {
  override readonly name = 'OutboxFullError';
}

/** The outbox file could not be opened, read or written. */
export class OutboxError extends Error {
  override readonly name = 'OutboxError';
}

interface Row {
  seq: number;
  exchange: string;
  routing_key: string;
  options: string;
  body: Buffer;
}

interface PendingAppend {
  readonly entry: OutboxEntry;
  readonly encodedOptions: string;
  readonly size: number;
  resolve(seq: number): void;
  reject(error: Error): void;
}

/** JSON that keeps Buffers (header values of type `x`): `{"$buffer": base64}`. */
function encodeOptions(options: Options.Publish): string {
  return JSON.stringify(options, function (this: Record<string, unknown>, key: string, value: unknown) {
    const raw = this[key];
    return Buffer.isBuffer(raw) ? { $buffer: raw.toString('base64') } : value;
  });
}

function decodeOptions(text: string): Options.Publish & { messageId: string } {
  return JSON.parse(text, (_key, value: unknown) => {
    if (typeof value === 'object' && value !== null && '$buffer' in value) {
      const encoded = value.$buffer;
      if (typeof encoded === 'string') return Buffer.from(encoded, 'base64');
    }
    return value;
  }) as Options.Publish & { messageId: string };
}

export class Outbox {
  readonly #db: Database.Database;
  readonly #limits: OutboxLimits;
  #messages: number;
  #bytes: number;
  #queue: PendingAppend[] = [];
  #flushScheduled = false;
  readonly #insert: Database.Statement;
  readonly #delete: Database.Statement;
  readonly #select: Database.Statement;
  readonly #sizeOf: Database.Statement;

  private constructor(db: Database.Database, limits: OutboxLimits) {
    this.#db = db;
    this.#limits = limits;
    this.#insert = db.prepare('INSERT INTO outbox (exchange, routing_key, options, body, size) VALUES (?, ?, ?, ?, ?)');
    this.#delete = db.prepare('DELETE FROM outbox WHERE seq = ? RETURNING size');
    this.#select = db.prepare('SELECT seq, exchange, routing_key, options, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?');
    this.#sizeOf = db.prepare('SELECT count(*) AS n, coalesce(sum(size), 0) AS bytes FROM outbox');
    const { n, bytes } = this.#sizeOf.get() as { n: number; bytes: number };
    this.#messages = n;
    this.#bytes = bytes;
  }

  /** Opens (or creates) the outbox file. Throws OutboxError when another process holds it. */
  static open(path: string, limits: OutboxLimits = DEFAULT_OUTBOX_LIMITS): Outbox {
    let db: Database.Database | undefined;
    try {
      db = new Database(path, { timeout: 2_000 });
      db.pragma('locking_mode = EXCLUSIVE');
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = FULL');
      db.exec(`CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        options TEXT NOT NULL,
        body BLOB NOT NULL,
        size INTEGER NOT NULL
      )`);
      // Takes the exclusive lock now, not at the first write.
      db.exec('BEGIN IMMEDIATE; COMMIT;');
      return new Outbox(db, limits);
    } catch (error) {
      db?.close();
      const busy = (error as { code?: string }).code?.startsWith('SQLITE_BUSY') ?? false;
      const why = busy ? 'it is in use by another process (one publisher per outbox)' : (error as Error).message;
      throw new OutboxError(`cannot open the outbox ${path}: ${why}`, { cause: error });
    }
  }

  /** Messages stored now. */
  get size(): number {
    return this.#messages;
  }

  /** Bytes stored now. */
  get bytes(): number {
    return this.#bytes;
  }

  get isEmpty(): boolean {
    return this.#messages === 0;
  }

  /**
   * Stores a message; resolves with its position once it is committed and fsync'd. Rejects
   * with OutboxFullError when it does not fit.
   */
  append(entry: OutboxEntry): Promise<number> {
    const encodedOptions = encodeOptions(entry.options);
    const size = entry.body.length + Buffer.byteLength(encodedOptions) + entry.exchange.length + entry.routingKey.length;
    const queuedBytes = this.#queue.reduce((sum, p) => sum + p.size, 0);
    if (this.#messages + this.#queue.length + 1 > this.#limits.maxMessages || this.#bytes + queuedBytes + size > this.#limits.maxBytes) {
      return Promise.reject(
        new OutboxFullError(
          `the outbox is full (${this.#messages} messages, ${this.#bytes} bytes; limits ${this.#limits.maxMessages} messages, ${this.#limits.maxBytes} bytes): the broker has been unreachable for a while`,
        ),
      );
    }
    return new Promise<number>((resolve, reject) => {
      this.#queue.push({ entry, encodedOptions, size, resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        setImmediate(() => this.#flush());
      }
    });
  }

  #flush(): void {
    this.#flushScheduled = false;
    const batch = this.#queue;
    this.#queue = [];
    if (batch.length === 0) return;
    try {
      const seqs = this.#db.transaction(() =>
        batch.map((p) => Number(this.#insert.run(p.entry.exchange, p.entry.routingKey, p.encodedOptions, p.entry.body, p.size).lastInsertRowid)),
      )();
      for (const p of batch) {
        this.#messages += 1;
        this.#bytes += p.size;
      }
      batch.forEach((p, i) => p.resolve(seqs[i] ?? 0));
    } catch (error) {
      const failure = new OutboxError(`outbox append failed: ${(error as Error).message}`, { cause: error });
      for (const p of batch) p.reject(failure);
    }
  }

  /** Up to `limit` messages after position `after`, oldest first. */
  oldest(after: number, limit: number): StoredEntry[] {
    const rows = this.#select.all(after, limit) as Row[];
    return rows.map((row) => ({
      seq: row.seq,
      exchange: row.exchange,
      routingKey: row.routing_key,
      options: decodeOptions(row.options),
      body: row.body,
    }));
  }

  /** Removes messages (after their resend was confirmed), in one fsync'd transaction. */
  remove(seqs: readonly number[]): void {
    if (seqs.length === 0) return;
    const removed = this.#db.transaction(() => {
      let count = 0;
      let bytes = 0;
      for (const seq of seqs) {
        const row = this.#delete.get(seq) as { size: number } | undefined;
        if (row !== undefined) {
          count += 1;
          bytes += row.size;
        }
      }
      return { count, bytes };
    })();
    this.#messages -= removed.count;
    this.#bytes -= removed.bytes;
  }

  /** Closes the file (pending appends are committed first). */
  close(): void {
    this.#flush();
    if (this.#db.open) this.#db.close();
  }
}
