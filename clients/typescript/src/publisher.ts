/**
 * The publisher: confirmed publishes, and a durable outbox for what the broker did not take
 * (docs/protocol.md §4, §5).
 *
 * `publish` sends with `mandatory` on a confirm channel and resolves `confirmed` once the broker
 * acked and routed the message. When the broker is unreachable, nacks, returns the message,
 * has no such exchange, or does not confirm in time, the message is committed to the outbox
 * (fsync) and `publish` resolves `queued`. While the outbox holds anything (and
 * `retry_pending` is on), new messages queue behind it, so the broker sees them in publish
 * order. A message leaves the outbox only after its resend is confirmed.
 *
 * Resending (flags read live from `pipeline.json`):
 * - at start, when the link comes (back) up (after up to 0.5 s of jitter), and when
 *   `retry_pending` is switched on;
 * - while the route is missing (no exchange: 404; or the message is returned unroutable, or
 *   nacked): a probe (the oldest message alone) every 0.5 s doubling to 4 s, and the whole
 *   outbox as soon as a probe gets through. Said once at warn, never per probe;
 * - while the broker cannot be reached: every `retry_interval_seconds`.
 *
 * `retry_pending: false` parks the outbox: its messages wait on disk, fresh publishes go
 * straight to the broker, and only a fresh message the broker does not take joins it.
 */
import type { ChannelModel, Options } from 'amqplib';

import { ConfirmedChannel, caFileFrom, PublishFailure, closeQuietly, describe, openConnection, vhostOf } from './amqp.js';
import { Backoff, type BackoffPolicy, RECONNECT_BACKOFF, ROUTE_BACKOFF, sleep } from './backoff.js';
import type { PipelineConfig } from './config.js';
import { LiveConfig } from './live.js';
import { type Logger, consoleLogger } from './logger.js';
import { DEFAULT_OUTBOX_LIMITS, Outbox, type OutboxEntry, OutboxFullError, type OutboxLimits } from './outbox.js';
import { uuidv7 } from './uuid.js';

/** What became of a published message: on the broker, or on local disk. Both mean it is safe. */
export type PublishOutcome = 'confirmed' | 'queued';

export interface PublishResult {
  readonly outcome: PublishOutcome;
  /** The caller's message id, or the UUID v7 the publisher set. */
  readonly messageId: string;
}

/** Message properties a caller may set. Header values must survive JSON (plus Buffers) for the outbox. */
export interface PublishOptions {
  messageId?: string;
  headers?: Record<string, unknown>;
  contentType?: string;
  contentEncoding?: string;
  correlationId?: string;
  replyTo?: string;
  /** Per-message TTL, ms. */
  expiration?: string | number;
  priority?: number;
  /** Seconds since the epoch. */
  timestamp?: number;
  type?: string;
  appId?: string;
  userId?: string;
  /** Default true (delivery mode 2). */
  persistent?: boolean;
}

export interface PublisherOptions {
  /** `amqp[s]://user:password@host:port/vhost`. Never logged. */
  uri: string;
  /** The outbox file (SQLite; created if missing). One publisher process per file. */
  outboxPath: string;
  /** The pipeline: a live `pipeline.json`, or a fixed configuration. */
  config: LiveConfig | PipelineConfig;
  logger?: Logger;
  outboxLimits?: Partial<OutboxLimits>;
  /** How long a publish waits for its confirm before the message goes to the outbox. Default 5000 ms. */
  confirmTimeoutMs?: number;
  /** Longest wait for the connection and its channel. Default 5000 ms. */
  connectTimeoutMs?: number;
  /** Waits between reconnect attempts. Default 200 ms doubling to 30 s. */
  reconnect?: BackoffPolicy;
  /** Waits between probes of a missing route. Default 500 ms doubling to 4 s. */
  routeBackoff?: BackoffPolicy;
  /** Messages resent per pipelined batch. Default 256. */
  resendBatch?: number;
  /** Longest random delay before the resend that follows a reconnection. Default 500 ms. */
  resendJitterMs?: number;
  /**
   * PEM file of the CA that signed the broker's certificate, for `amqps` URIs whose CA is not
   * one Node trusts by default. Default: the file named by `MSGPIPE_CA_FILE`, if set.
   */
  caFile?: string;
  /** Shown in the broker's connection list. Default `msgpipe-publisher`. */
  connectionName?: string;
}

export interface PublisherStats {
  /** Publishes confirmed directly. */
  confirmed: number;
  /** Publishes saved to the outbox. */
  queued: number;
  /** Outbox messages resent and confirmed. */
  resent: number;
  /** Resend rounds started. */
  resendRounds: number;
  /** Connections made (1 + reconnects). */
  connections: number;
  outboxMessages: number;
  outboxBytes: number;
}

/** A name longer than 255 bytes (exchange, routing key, message id). The caller still owns the message. */
export class InvalidNameError extends Error {
  override readonly name = 'InvalidNameError';
}

/** Why the route is missing, while it is. */
interface MissingRoute {
  readonly why: 'not-found' | 'returned' | 'nacked';
  readonly exchange: string;
  /** No fresh publish tries the broker before this (parked outbox only). */
  nextProbeAt: number;
}

type RoundResult = 'drained' | 'parked' | 'unreachable' | 'refused';

function checkName(what: string, value: string): void {
  if (Buffer.byteLength(value) > 255) throw new InvalidNameError(`${what} is longer than 255 bytes`);
}

/**
 * Publishes to a pipeline's work exchange, with a durable outbox. See the module docs.
 *
 * ```ts
 * const publisher = await Publisher.start({ uri, outboxPath: '/var/lib/notes/outbox.db', config });
 * const { outcome, messageId } = await publisher.publish(JSON.stringify({ note: 'hello' }));
 * await publisher.close();
 * ```
 */
export class Publisher {
  readonly #uri: string;
  readonly #config: LiveConfig;
  readonly #ownsConfig: boolean;
  readonly #logger: Logger;
  readonly #outbox: Outbox;
  readonly #confirmTimeoutMs: number;
  readonly #connectTimeoutMs: number;
  readonly #reconnect: BackoffPolicy;
  readonly #resendBatch: number;
  readonly #resendJitterMs: number;
  readonly #connectionName: string;
  readonly #caFile: string | undefined;
  readonly #vhost: string;
  readonly #stop = new AbortController();
  readonly #stats = { confirmed: 0, queued: 0, resent: 0, resendRounds: 0, connections: 0 };

  #model: ChannelModel | undefined;
  #channel: ConfirmedChannel | undefined;
  #reopening: Promise<ConfirmedChannel | undefined> | undefined;
  #missing: MissingRoute | undefined;
  readonly #routeBackoff: Backoff;

  /** When the next resend round is due (ms since the epoch; Infinity: nothing planned). */
  #dueAt = Number.POSITIVE_INFINITY;
  /** When set, the next round is due `retry_interval_seconds` after this (read live, F-2). */
  #intervalFrom: number | undefined;
  #wake: (() => void) | undefined;
  /** The flag as last seen, to tell a switch-on (resend at once) from other changes. */
  #retryPending: boolean;
  /** Publishes in progress, and who waits for them to end (close). */
  #inFlight = 0;
  #quiet: Array<() => void> = [];
  #tasks: Promise<void>[] = [];
  #closed = false;
  /** The broker blocked this connection (connection.blocked). */
  #blocked = false;

  private constructor(options: PublisherOptions, outbox: Outbox) {
    this.#uri = options.uri;
    this.#ownsConfig = !(options.config instanceof LiveConfig);
    this.#config = options.config instanceof LiveConfig ? options.config : LiveConfig.fixed(options.config);
    this.#logger = options.logger ?? consoleLogger;
    this.#outbox = outbox;
    this.#confirmTimeoutMs = options.confirmTimeoutMs ?? 5_000;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 5_000;
    this.#reconnect = options.reconnect ?? RECONNECT_BACKOFF;
    this.#routeBackoff = new Backoff(options.routeBackoff ?? ROUTE_BACKOFF, 'down');
    this.#resendBatch = Math.max(1, options.resendBatch ?? 256);
    this.#resendJitterMs = options.resendJitterMs ?? 500;
    this.#caFile = caFileFrom(options.caFile);
    this.#connectionName = options.connectionName ?? 'msgpipe-publisher';
    this.#vhost = vhostOf(options.uri);
    this.#retryPending = this.#config.features.retry_pending;
  }

  /**
   * Opens the outbox and connects. When the broker is reachable the link is up when this
   * resolves, so the first publish is confirmed (P-3); an unreachable broker is not an error:
   * the publisher starts offline, queues, and keeps reconnecting.
   */
  static async start(options: PublisherOptions): Promise<Publisher> {
    try {
      new URL(options.uri);
    } catch {
      throw new Error('the AMQP URI is not valid (expected amqp[s]://user:password@host:port/vhost)');
    }
    const outbox = Outbox.open(options.outboxPath, { ...DEFAULT_OUTBOX_LIMITS, ...options.outboxLimits });
    const publisher = new Publisher(options, outbox);
    if (!outbox.isEmpty) {
      publisher.#logger.info('outbox holds messages from an earlier run', { messages: outbox.size });
    }
    let firstError: string | undefined;
    try {
      await publisher.#connect();
    } catch (error) {
      firstError = describe(error);
      publisher.#logger.warn('publisher starts offline; messages go to the outbox', { reason: firstError });
    }
    if (publisher.#model !== undefined) publisher.#planRound(Date.now()); // P-6 (a)
    publisher.#tasks = [publisher.#maintainLink(firstError !== undefined), publisher.#resendLoop()];
    publisher.#config.on('features', publisher.#onFeatures);
    return publisher;
  }

  /** Publishes to the pipeline's work exchange with its routing key (read at each publish, J-6). */
  publish(body: Buffer | Uint8Array | string, options: PublishOptions = {}): Promise<PublishResult> {
    const config = this.#config.current;
    return this.publishTo(config.exchange, config.routing_key, body, options);
  }

  /**
   * Publishes to any exchange and routing key. Resolves `confirmed` or `queued` (the message
   * is safe either way); rejects when it is neither (outbox full, a name too long, the outbox
   * store failed): the caller still owns the message.
   */
  publishTo(exchange: string, routingKey: string, body: Buffer | Uint8Array | string, options: PublishOptions = {}): Promise<PublishResult> {
    this.#inFlight += 1;
    const done = (): void => {
      this.#inFlight -= 1;
      if (this.#inFlight === 0) for (const resolve of this.#quiet.splice(0)) resolve();
    };
    const task = this.#publish(exchange, routingKey, body, options);
    task.then(done, done);
    return task;
  }

  async #publish(exchange: string, routingKey: string, body: Buffer | Uint8Array | string, options: PublishOptions): Promise<PublishResult> {
    if (this.#closed) throw new Error('the publisher is closed');
    checkName('exchange', exchange);
    checkName('routing key', routingKey);
    const { persistent, ...rest } = options;
    const messageId = options.messageId ?? uuidv7();
    checkName('message id', messageId);
    const publishOptions: Options.Publish & { messageId: string } = {
      ...rest,
      messageId,
      deliveryMode: persistent === false ? 1 : 2,
    };
    const content = typeof body === 'string' ? Buffer.from(body, 'utf8') : Buffer.isBuffer(body) ? body : Buffer.from(body);
    const retryPending = this.#config.features.retry_pending;
    // Anything in the outbox reaches the broker first (P-7); a parked outbox is overtaken (F-1).
    const behindOutbox = !this.#outbox.isEmpty && retryPending;
    // While the route is known missing, only a parked publisher tries, once per backoff step.
    const routeDown = this.#missing !== undefined && (retryPending || Date.now() < this.#missing.nextProbeAt);
    if (!behindOutbox && !routeDown && !this.#blocked) {
      const probing = this.#missing !== undefined;
      const ready = this.#channel;
      const channel = ready !== undefined && !ready.closed ? ready : await this.#usableChannel();
      if (channel !== undefined) {
        try {
          await channel.publish(exchange, routingKey, content, publishOptions, this.#confirmTimeoutMs);
          this.#stats.confirmed += 1;
          if (this.#missing !== undefined) this.#routeBack();
          return { outcome: 'confirmed', messageId };
        } catch (error) {
          this.#noteFailure(error, exchange, routingKey, probing);
        }
      }
    }
    const entry: OutboxEntry = { exchange, routingKey, options: publishOptions, body: content };
    await this.#outbox.append(entry); // OutboxFullError / OutboxError reach the caller
    this.#stats.queued += 1;
    if (this.#dueAt === Number.POSITIVE_INFINITY && this.#intervalFrom === undefined) {
      // Nothing planned yet: the message waits for the next round of whatever kept it out.
      if (this.#missing !== undefined) this.#planProbe();
      else this.#planInterval();
    }
    return { outcome: 'queued', messageId };
  }

  /** Messages waiting in the outbox. */
  get outboxSize(): number {
    return this.#outbox.size;
  }

  /** True while the connection is up. */
  get connected(): boolean {
    return this.#model !== undefined;
  }

  /** Counters since start, and the outbox now. */
  stats(): PublisherStats {
    return { ...this.#stats, outboxMessages: this.#outbox.size, outboxBytes: this.#outbox.bytes };
  }

  /** Stops resending and closes the connection; the outbox keeps what is left for next time (P-13). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#config.off('features', this.#onFeatures);
    // Publishes in flight end confirmed or queued before the outbox closes.
    if (this.#inFlight > 0) await new Promise<void>((resolve) => this.#quiet.push(resolve));
    this.#stop.abort();
    this.#wake?.();
    await Promise.allSettled(this.#tasks);
    await this.#channel?.close();
    await closeQuietly(this.#model);
    this.#model = undefined;
    this.#channel = undefined;
    this.#outbox.close();
    if (this.#ownsConfig) this.#config.close();
  }

  /** A call, not a property read: TypeScript would narrow a property across awaits. */
  #stopped(): boolean {
    return this.#stop.signal.aborted;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // --- the link -------------------------------------------------------------------------------

  async #connect(): Promise<void> {
    const model = await openConnection(this.#uri, this.#connectionName, this.#connectTimeoutMs, this.#caFile);
    let channel: ConfirmedChannel;
    try {
      channel = await ConfirmedChannel.open(model, this.#connectTimeoutMs);
    } catch (error) {
      await closeQuietly(model);
      throw new Error(`cannot open a confirm channel: ${describe(error)}`, { cause: error });
    }
    this.#model = model;
    this.#channel = channel;
    this.#blocked = false;
    this.#stats.connections += 1;
    // A broker in a resource alarm (memory, disk) blocks publishers: queue without waiting for
    // confirm timeouts (which would tear the connection down), resend once it unblocks.
    model.on('blocked', (reason: string) => {
      if (this.#model !== model) return;
      this.#blocked = true;
      this.#logger.warn('the broker blocks publishers (resource alarm); queueing to the outbox', { reason });
    });
    model.on('unblocked', () => {
      if (this.#model !== model) return;
      this.#blocked = false;
      this.#logger.info('the broker takes publishes again');
      this.#planRound(Date.now() + Math.random() * this.#resendJitterMs);
    });
  }

  /** Keeps one connection up, reconnecting with capped backoff (P-9): one warn when it goes down, one info when it is back. */
  async #maintainLink(startedDown: boolean): Promise<void> {
    const backoff = new Backoff(this.#reconnect);
    let downSince: number | undefined = startedDown ? Date.now() : undefined;
    const signal = this.#stop.signal;
    while (!signal.aborted) {
      if (this.#model === undefined) {
        try {
          await this.#connect();
        } catch (error) {
          if (downSince === undefined) {
            downSince = Date.now();
            this.#logger.warn('publisher cannot reach the broker; queueing to the outbox', { reason: describe(error) });
          }
          await sleep(backoff.nextWait(), signal);
          continue;
        }
        if (this.#stopped()) break;
        if (downSince !== undefined) {
          this.#logger.info('publisher reconnected', { down_ms: Date.now() - downSince });
          downSince = undefined;
        }
        backoff.reset();
        this.#planRound(Date.now() + Math.random() * this.#resendJitterMs); // P-6 (b)
      }
      const model = this.#model;
      if (model === undefined) continue;
      await new Promise<void>((resolve) => {
        model.once('close', () => resolve());
        signal.addEventListener('abort', () => resolve(), { once: true });
      });
      if (this.#stopped()) break;
      if (this.#model === model) {
        this.#model = undefined;
        this.#channel = undefined;
      }
      downSince = Date.now();
      this.#logger.warn('publisher lost its broker connection; reconnecting');
    }
  }

  /**
   * The confirm channel, reopened on the same connection when the broker closed it (a 404
   * closes the channel, not the connection: P-10). Undefined while there is no connection.
   */
  async #usableChannel(): Promise<ConfirmedChannel | undefined> {
    if (this.#channel !== undefined && !this.#channel.closed) return this.#channel;
    const model = this.#model;
    if (model === undefined || this.#closed) return undefined;
    this.#reopening ??= (async () => {
      try {
        const channel = await ConfirmedChannel.open(model, this.#connectTimeoutMs);
        if (this.#model === model) this.#channel = channel;
        return channel;
      } catch (error) {
        // A connection that cannot open a channel is broken: let the link loop reconnect.
        this.#logger.debug('cannot reopen the confirm channel', { reason: describe(error) });
        if (this.#model === model) await closeQuietly(model);
        return undefined;
      } finally {
        this.#reopening = undefined;
      }
    })();
    return this.#reopening;
  }

  /** What a failed publish says about the link and the route. */
  #noteFailure(error: unknown, exchange: string, routingKey: string, probing: boolean): void {
    if (!(error instanceof PublishFailure)) {
      this.#logger.debug('publish failed; saving to the outbox', { reason: describe(error) });
      return;
    }
    switch (error.kind) {
      case 'not-found':
      case 'returned':
      case 'nacked':
        this.#routeMissing(error.kind, exchange, routingKey, probing);
        break;
      case 'timeout':
        // A blocked connection (resource alarm) explains the silence: keep it. Otherwise a
        // connection that just died may never answer: reconnect (P-9).
        if (this.#blocked) break;
        this.#logger.debug('no confirm in time; reconnecting', { exchange });
        void closeQuietly(this.#model);
        break;
      case 'closed':
        break; // reopened on next use; a lost connection is the link loop's business
    }
  }

  /**
   * Enters (or stays in) the missing-route state: one warn on entry, none per probe (P-10,
   * P-11, L-2). A failed probe moves the next one a (longer) backoff step away; other failures
   * while the route is missing (publishes that were in flight) leave the plan alone.
   */
  #routeMissing(why: MissingRoute['why'], exchange: string, routingKey: string, probe: boolean): void {
    if (this.#missing === undefined) {
      const vhost = this.#vhost;
      if (why === 'not-found') {
        this.#logger.warn(`exchange ${exchange} does not exist in vhost ${vhost}: is the pipeline applied? Messages wait in the outbox`);
      } else if (why === 'returned') {
        this.#logger.warn(
          `exchange ${exchange} in vhost ${vhost} routes routing key ${routingKey} to no queue: is the pipeline applied? Messages wait in the outbox`,
        );
      } else {
        this.#logger.warn(`the broker refuses messages to exchange ${exchange} in vhost ${vhost} (nacked: a queue may be full); they wait in the outbox`);
      }
      this.#missing = { why, exchange, nextProbeAt: 0 };
      this.#planProbe();
    } else if (probe) {
      this.#planProbe();
    }
  }

  #routeBack(): void {
    const missing = this.#missing;
    if (missing === undefined) return;
    this.#missing = undefined;
    this.#routeBackoff.reset();
    this.#logger.info(`exchange ${missing.exchange} takes messages again; resending the outbox`, { outbox: this.#outbox.size });
  }

  // --- resending ------------------------------------------------------------------------------

  readonly #onFeatures = (): void => {
    const retryPending = this.#config.features.retry_pending;
    const switchedOn = retryPending && !this.#retryPending;
    this.#retryPending = retryPending;
    if (switchedOn && !this.#outbox.isEmpty) {
      this.#planRound(Date.now() + Math.random() * this.#resendJitterMs); // P-6 (c)
    } else {
      this.#wake?.(); // a changed interval applies from the next round (F-2)
    }
  };

  /** Plans a round at `at` unless one is due earlier. */
  #planRound(at: number): void {
    if (at < this.#dueAt) {
      this.#dueAt = at;
      this.#intervalFrom = undefined;
    }
    this.#wake?.();
  }

  #planProbe(): void {
    const at = Date.now() + this.#routeBackoff.nextWait();
    if (this.#missing !== undefined) this.#missing.nextProbeAt = at;
    this.#dueAt = at;
    this.#intervalFrom = undefined;
    this.#wake?.();
  }

  #planInterval(): void {
    this.#dueAt = Number.POSITIVE_INFINITY;
    this.#intervalFrom = Date.now();
    this.#wake?.();
  }

  #nextDue(): number {
    if (this.#intervalFrom !== undefined) {
      const seconds = Math.max(this.#config.features.retry_interval_seconds, 1);
      return this.#intervalFrom + seconds * 1000;
    }
    return this.#dueAt;
  }

  async #resendLoop(): Promise<void> {
    const signal = this.#stop.signal;
    while (!signal.aborted) {
      const wait = this.#nextDue() - Date.now();
      if (wait > 0) {
        await new Promise<void>((resolve) => {
          const timer = wait === Number.POSITIVE_INFINITY ? undefined : setTimeout(resolve, Math.min(wait, 2 ** 31 - 1));
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wake = undefined;
        continue; // recompute: plans may have changed
      }
      this.#dueAt = Number.POSITIVE_INFINITY;
      this.#intervalFrom = undefined;
      if (!this.#config.features.retry_pending || this.#outbox.isEmpty) continue; // parked or empty: wait for an event
      const result = await this.#resendRounds();
      if (this.#stopped()) break;
      if (result === 'refused') {
        if (this.#dueAt === Number.POSITIVE_INFINITY) this.#planProbe();
      } else if (result === 'unreachable') {
        if (this.#dueAt === Number.POSITIVE_INFINITY) this.#planInterval(); // P-6 (e)
      }
    }
  }

  /**
   * Resends oldest first in pipelined batches until the outbox is empty or the broker stops
   * taking messages. While the route is missing the first send is a probe: the oldest message
   * alone.
   */
  async #resendRounds(): Promise<RoundResult> {
    this.#stats.resendRounds += 1;
    let cursor = 0;
    let refused = 0;
    let sent = 0;
    for (;;) {
      if (this.#stop.signal.aborted) return 'unreachable';
      if (!this.#config.features.retry_pending) return 'parked';
      if (this.#blocked) return 'unreachable';
      const channel = await this.#usableChannel();
      if (channel === undefined) return 'unreachable';
      const probing = this.#missing !== undefined;
      const batch = this.#outbox.oldest(cursor, probing ? 1 : this.#resendBatch);
      const last = batch[batch.length - 1];
      if (last === undefined) break;
      cursor = last.seq;
      const results = await Promise.allSettled(
        batch.map((entry) => channel.publish(entry.exchange, entry.routingKey, entry.body, entry.options, this.#confirmTimeoutMs)),
      );
      const confirmed: number[] = [];
      let broken: PublishFailure | undefined;
      let refusal: { failure: PublishFailure; entry: OutboxEntry } | undefined;
      results.forEach((result, i) => {
        const entry = batch[i];
        if (entry === undefined) return;
        if (result.status === 'fulfilled') {
          confirmed.push(entry.seq);
          return;
        }
        const failure = result.reason instanceof PublishFailure ? result.reason : new PublishFailure('closed', describe(result.reason));
        if (failure.breaksChannel) broken ??= failure;
        else refusal ??= { failure, entry };
      });
      this.#outbox.remove(confirmed); // P-5: only after the confirm
      this.#stats.resent += confirmed.length;
      sent += confirmed.length;
      if (confirmed.length > 0 && this.#missing !== undefined) this.#routeBack(); // P-6 (d)
      if (broken !== undefined) {
        const entry = batch.find((_, i) => results[i]?.status === 'rejected') ?? last;
        if (broken.kind === 'not-found') {
          this.#routeMissing('not-found', entry.exchange, entry.routingKey, probing);
          return 'refused';
        }
        this.#noteFailure(broken, entry.exchange, entry.routingKey, probing);
        return 'unreachable';
      }
      if (refusal !== undefined) {
        refused += batch.length - confirmed.length;
        if (probing || confirmed.length === 0) {
          // Nothing gets through: wait a backoff step rather than push the whole outbox.
          this.#routeMissing(refusal.failure.kind as 'returned' | 'nacked', refusal.entry.exchange, refusal.entry.routingKey, probing);
          return 'refused';
        }
      }
    }
    if (sent > 0) this.#logger.info('resent outbox messages', { sent, left: this.#outbox.size });
    if (refused > 0) {
      this.#planProbe(); // P-11: refused messages come back on the short backoff
      return 'refused';
    }
    return 'drained';
  }
}

export { OutboxFullError };
