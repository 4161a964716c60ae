/**
 * The consumer: runs a handler per message and settles every delivery by the retry protocol
 * (docs/protocol.md §3).
 *
 * Success acks. A failure publishes a copy (to the retry tier of this attempt, or to the
 * dead-letter exchange) on a confirm channel with `mandatory`, and acks the original only once
 * the broker confirmed the copy and did not return it. Otherwise the original is *given back*:
 * after a pause (500 ms doubling to 30 s while give-backs continue) it is rejected with
 * `requeue = true`. Never `nack`: RabbitMQ 4.3 does not count `basic.nack(requeue)` toward a
 * quorum queue's `delivery-limit`, while `basic.reject(requeue)` counts on every supported
 * version, so a message the consumer can never move still ends in the DLQ (B-1).
 */
import type { Channel, ChannelModel, ConsumeMessage, MessageProperties } from 'amqplib';

import { ConfirmedChannel, caFileFrom, closeQuietly, describe, openConnection } from './amqp.js';
import { Backoff, type BackoffPolicy, RECONNECT_BACKOFF, SHORT_BACKOFF, nthWait, sleep, withTimeout } from './backoff.js';
import type { PipelineConfig } from './config.js';
import { Headers } from './headers.js';
import { LiveConfig } from './live.js';
import { type Logger, consoleLogger } from './logger.js';
import {
  type Destination,
  type FailureKind,
  type HeaderTable,
  copyOptions,
  destinationFor,
  failureHeaders,
  headerText,
  nowRfc3339,
  retryCount,
} from './retry.js';

/** Throw this from a handler for a failure worth retrying (the same as any other exception, without the "crashed" note). */
export class RetryableError extends Error {
  override readonly name: string = 'RetryableError';
}

/** Throw this from a handler when retrying cannot help: the message goes to the DLQ now. */
export class PermanentError extends Error {
  override readonly name: string = 'PermanentError';
}

/** A delivered message, as the handler sees it. */
export class Message {
  readonly #delivery: ConsumeMessage;
  readonly #config: PipelineConfig;
  /** This delivery's attempt, 1-based: `x-retry-count + 1` (C-1). A redelivery repeats it. */
  readonly attempt: number;

  constructor(delivery: ConsumeMessage, config: PipelineConfig) {
    this.#delivery = delivery;
    this.#config = config;
    this.attempt = retryCount(this.headers) + 1;
  }

  get body(): Buffer {
    return this.#delivery.content;
  }

  /** The body as UTF-8 text. */
  text(): string {
    return this.#delivery.content.toString('utf8');
  }

  /** The body parsed as JSON (not validated: check it, and throw a PermanentError when it is wrong). */
  // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-parameters -- the usual shape of a typed JSON accessor
  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }

  get properties(): MessageProperties {
    return this.#delivery.properties;
  }

  get headers(): HeaderTable {
    return this.#delivery.properties.headers ?? {};
  }

  /** A header as text (e.g. `Headers.ERROR`), when it is one. */
  header(name: string): string | undefined {
    return headerText(this.headers, name);
  }

  /** The message id, when the publisher set one (the msgpipe publisher always does). */
  get messageId(): string | undefined {
    const id: unknown = this.#delivery.properties.messageId;
    return typeof id === 'string' ? id : undefined;
  }

  /** Attempts the pipeline allows (`max_attempts` when this message was delivered). */
  get maxAttempts(): number {
    return this.#config.max_attempts;
  }

  /** True when a failure now sends the message to the DLQ rather than to a retry tier. */
  get isLastAttempt(): boolean {
    return this.attempt >= this.#config.max_attempts;
  }

  /** The broker's redelivered flag: an earlier delivery may have been handled already (dedupe by messageId). */
  get redelivered(): boolean {
    return this.#delivery.fields.redelivered;
  }

  /** Exchange this copy came from (empty for a message back from a retry tier). */
  get exchange(): string {
    return this.#delivery.fields.exchange;
  }

  /** Routing key of this copy (the queue name for a message back from a retry tier). */
  get routingKey(): string {
    return this.#delivery.fields.routingKey;
  }

  /** Where a failure of this kind would send the message now. */
  failureDestination(kind: FailureKind): Destination {
    return destinationFor(this.#config, this.attempt, kind);
  }

  /** @internal */
  get delivery(): ConsumeMessage {
    return this.#delivery;
  }
}

/** Handles one message: resolve for success, throw (or reject) for failure. */
export type Handler = (message: Message) => Promise<void> | void;

export interface ConsumerOptions {
  /** `amqp[s]://user:password@host:port/vhost`. Never logged. */
  uri: string;
  /** The pipeline: a live `pipeline.json`, or a fixed configuration. */
  config: LiveConfig | PipelineConfig;
  logger?: Logger;
  /** Unacknowledged deliveries the broker may push ahead (`basic.qos`). Default 64. */
  prefetch?: number;
  /** Handlers running at once. Default 16. */
  concurrency?: number;
  /** How long a copy may wait for its confirm before the original is given back. Default 10000 ms. */
  confirmTimeoutMs?: number;
  /** Longest wait for the connection and its channels. Default 10000 ms. */
  connectTimeoutMs?: number;
  /** Waits between reconnect attempts. Default 200 ms doubling to 30 s. */
  reconnect?: BackoffPolicy;
  /** Pause before a give-back; doubles with each give-back in a row. Default 500 ms to 30 s. */
  giveBackBackoff?: BackoffPolicy;
  /**
   * PEM file of the CA that signed the broker's certificate, for `amqps` URIs whose CA is not
   * one Node trusts by default. Default: the file named by `MSGPIPE_CA_FILE`, if set.
   */
  caFile?: string;
  /** Shown in the broker's connection list. Default `msgpipe-consumer`. */
  connectionName?: string;
}

export interface ConsumerStats {
  /** Messages handed to the handler. */
  delivered: number;
  /** Handled successfully and acked. */
  acked: number;
  /** Moved to a retry tier (copy confirmed, original acked). */
  retried: number;
  /** Moved to the DLQ (copy confirmed, original acked). */
  deadLettered: number;
  /** Copy not confirmed: the original was given back (reject, requeue). */
  givenBack: number;
  /** Connections made (1 + reconnects). */
  connections: number;
}

/** One connection's channels. */
interface Session {
  readonly model: ChannelModel;
  readonly channel: Channel;
  copies: ConfirmedChannel;
  reopening: Promise<ConfirmedChannel> | undefined;
  alive: boolean;
}

/**
 * Reads a pipeline's work queue and runs a handler per message.
 *
 * ```ts
 * const consumer = new Consumer({ uri, config });
 * process.once('SIGTERM', () => void consumer.stop());
 * await consumer.run(async (message) => {
 *   const note = message.json<{ text: string }>();
 *   if (typeof note.text !== 'string') throw new PermanentError('no text');
 *   await saveNote(note); // a throw here is retried
 * });
 * ```
 */
export class Consumer {
  readonly #uri: string;
  readonly #config: LiveConfig;
  readonly #logger: Logger;
  readonly #prefetch: number;
  readonly #concurrency: number;
  readonly #confirmTimeoutMs: number;
  readonly #connectTimeoutMs: number;
  readonly #reconnect: BackoffPolicy;
  readonly #giveBack: BackoffPolicy;
  readonly #connectionName: string;
  readonly #caFile: string | undefined;
  readonly #stop = new AbortController();
  readonly #stats: ConsumerStats = { delivered: 0, acked: 0, retried: 0, deadLettered: 0, givenBack: 0, connections: 0 };
  #giveBacksInARow = 0;
  #running = 0;
  #waiting: Array<{ delivery: ConsumeMessage; session: Session }> = [];
  #idle: Array<() => void> = [];
  #runPromise: Promise<void> | undefined;
  #consuming: { promise: Promise<void>; resolve: () => void };

  constructor(options: ConsumerOptions) {
    try {
      new URL(options.uri);
    } catch {
      throw new Error('the AMQP URI is not valid (expected amqp[s]://user:password@host:port/vhost)');
    }
    const prefetch = options.prefetch ?? 64;
    const concurrency = options.concurrency ?? 16;
    if (prefetch < 1 || concurrency < 1) throw new RangeError('prefetch and concurrency must be at least 1');
    this.#uri = options.uri;
    this.#config = options.config instanceof LiveConfig ? options.config : LiveConfig.fixed(options.config);
    this.#logger = options.logger ?? consoleLogger;
    this.#prefetch = prefetch;
    this.#concurrency = concurrency;
    this.#confirmTimeoutMs = options.confirmTimeoutMs ?? 10_000;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.#reconnect = options.reconnect ?? RECONNECT_BACKOFF;
    this.#giveBack = options.giveBackBackoff ?? SHORT_BACKOFF;
    this.#caFile = caFileFrom(options.caFile);
    this.#connectionName = options.connectionName ?? 'msgpipe-consumer';
    let resolve = (): void => undefined;
    const promise = new Promise<void>((r) => {
      resolve = r;
    });
    this.#consuming = { promise, resolve };
  }

  /** Counters since the consumer was made. */
  stats(): ConsumerStats {
    return { ...this.#stats };
  }

  /** Resolves once the consumer is first registered on the broker. */
  whenConsuming(): Promise<void> {
    return this.#consuming.promise;
  }

  /**
   * Consumes until {@link Consumer.stop} (or `signal`), reconnecting by itself (C-14). Resolves
   * once the handlers in flight have finished and been settled.
   */
  run(handler: Handler, options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.#runPromise !== undefined) throw new Error('the consumer is already running');
    options.signal?.addEventListener('abort', () => void this.stop(), { once: true });
    this.#runPromise = this.#run(handler);
    return this.#runPromise;
  }

  /** Graceful shutdown (C-11): no new deliveries; handlers in flight finish and are settled. */
  async stop(): Promise<void> {
    this.#stop.abort();
    await this.#runPromise;
  }

  /** A call, not a property read: TypeScript would narrow a property across awaits. */
  #stopped(): boolean {
    return this.#stop.signal.aborted;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }

  async #run(handler: Handler): Promise<void> {
    const signal = this.#stop.signal;
    const backoff = new Backoff(this.#reconnect);
    while (!signal.aborted) {
      const started = Date.now();
      const settledBefore = this.#settled();
      let reason: string;
      let model: ChannelModel | undefined;
      try {
        model = await openConnection(this.#uri, this.#connectionName, this.#connectTimeoutMs, this.#caFile);
        reason = await this.#session(model, handler);
      } catch (error) {
        reason = describe(error);
      }
      if (this.#stopped()) {
        await closeQuietly(model);
        break;
      }
      await closeQuietly(model);
      // A healthy session starts the backoff over; one that died at once keeps it growing, so a
      // broken topology (a missing queue) cannot cause a reconnect loop (C-14).
      if (this.#settled() > settledBefore || Date.now() - started >= this.#reconnect.maxMs) backoff.reset();
      const wait = backoff.nextWait();
      this.#logger.warn('consumer lost its broker connection', { reason, retry_in_ms: wait });
      await sleep(wait, signal);
    }
    await this.#handlersDone();
  }

  #settled(): number {
    return this.#stats.acked + this.#stats.retried + this.#stats.deadLettered;
  }

  /** One connection's life; resolves with why it ended ('stopped' on shutdown, after settling). */
  async #session(model: ChannelModel, handler: Handler): Promise<string> {
    const queue = this.#config.current.queue; // read when connecting (J-6)
    const channel = await withTimeout(model.createChannel(), this.#connectTimeoutMs, () => new Error('no answer opening a channel'));
    channel.on('error', () => undefined);
    await withTimeout(channel.prefetch(this.#prefetch), this.#connectTimeoutMs, () => new Error('no answer to basic.qos'));
    const copies = await ConfirmedChannel.open(model, this.#connectTimeoutMs);
    const session: Session = { model, channel, copies, reopening: undefined, alive: true };
    this.#stats.connections += 1;
    const signal = this.#stop.signal;
    let consumerTag: string | undefined;
    const ended = await new Promise<string>((resolve) => {
      model.once('close', () => resolve('the connection closed'));
      channel.once('close', () => resolve('the consuming channel closed'));
      signal.addEventListener('abort', () => resolve('stopped'), { once: true });
      channel
        .consume(queue, (delivery) => {
          if (delivery === null) resolve(`the broker cancelled the consumer on ${queue}`);
          else this.#dispatch(delivery, session, handler);
        })
        .then(
          (ok) => {
            consumerTag = ok.consumerTag;
            this.#logger.info('consuming', { queue, prefetch: this.#prefetch, concurrency: this.#concurrency });
            this.#consuming.resolve();
          },
          (error: unknown) => resolve(`cannot consume from ${queue}: ${describe(error)}`),
        );
    });
    if (ended !== 'stopped') {
      session.alive = false;
      this.#waiting = this.#waiting.filter((w) => w.session !== session); // the broker requeues them
      return ended;
    }
    // Shutdown: take no new delivery, let the handlers in flight settle on this connection.
    if (consumerTag !== undefined) {
      await withTimeout(channel.cancel(consumerTag), 5_000, () => new Error('cancel timed out')).catch(() => undefined);
    }
    this.#waiting = []; // prefetched, never started: closing the channel returns them (C-11)
    await this.#handlersDone();
    session.alive = false;
    await withTimeout(channel.close(), 2_000, () => new Error('close timed out')).catch(() => undefined);
    await session.copies.close();
    return ended;
  }

  #dispatch(delivery: ConsumeMessage, session: Session, handler: Handler): void {
    if (this.#running >= this.#concurrency) {
      this.#waiting.push({ delivery, session });
      return;
    }
    this.#running += 1;
    void this.#settle(delivery, session, handler).finally(() => {
      this.#running -= 1;
      const next = this.#stop.signal.aborted ? undefined : this.#waiting.shift();
      if (next !== undefined) this.#dispatch(next.delivery, next.session, handler);
      else if (this.#running === 0) {
        const waiters = this.#idle;
        this.#idle = [];
        for (const resolve of waiters) resolve();
      }
    });
  }

  async #handlersDone(): Promise<void> {
    while (this.#running > 0) {
      await new Promise<void>((resolve) => this.#idle.push(resolve));
    }
  }

  /** Runs the handler and settles the delivery: ack, or copy-then-ack, or give back. */
  async #settle(delivery: ConsumeMessage, session: Session, handler: Handler): Promise<void> {
    this.#stats.delivered += 1;
    const message = new Message(delivery, this.#config.current);
    let failure: { kind: FailureKind; text: string } | undefined;
    try {
      await handler(message);
    } catch (error) {
      failure = classify(error);
    }
    if (failure === undefined) {
      if (this.#ack(session, delivery)) this.#stats.acked += 1;
      return;
    }
    await this.#moveFailed(message, failure, session);
  }

  #ack(session: Session, delivery: ConsumeMessage): boolean {
    try {
      session.channel.ack(delivery);
      return true;
    } catch {
      // The channel is gone: the broker redelivers the message.
      return false;
    }
  }

  /** Publishes the copy where the protocol says, then acks; gives the original back if that fails (C-8, C-9). */
  async #moveFailed(message: Message, failure: { kind: FailureKind; text: string }, session: Session): Promise<void> {
    const delivery = message.delivery;
    const destination = message.failureDestination(failure.kind);
    const headers = failureHeaders(
      message.headers,
      {
        attempt: message.attempt,
        error: failure.text,
        at: nowRfc3339(),
        deliveryExchange: delivery.fields.exchange,
        deliveryRoutingKey: delivery.fields.routingKey,
      },
      destination,
    );
    const options = copyOptions(delivery.properties, headers);
    // A dead letter keeps its original routing key (C-8); the DLX routes every key.
    const routingKey =
      destination.kind === 'retry' ? destination.routingKey : (headerText(headers, Headers.ORIGINAL_ROUTING_KEY) ?? delivery.fields.routingKey);
    const fields = { message_id: options.messageId, attempt: message.attempt, error: failure.text };
    try {
      const copies = await this.#copyChannel(session);
      await copies.publish(destination.exchange, routingKey, delivery.content, options, this.#confirmTimeoutMs);
    } catch (error) {
      await this.#giveBackLater(session, delivery, { ...fields, reason: describe(error) });
      return;
    }
    this.#giveBacksInARow = 0;
    if (destination.kind === 'retry') {
      this.#logger.info('retry scheduled', { ...fields, tier: destination.tier, delay_ms: destination.delayMs });
      if (this.#ack(session, delivery)) this.#stats.retried += 1;
    } else {
      this.#logger.warn('dead-lettered', { ...fields, reason: destination.reason });
      if (this.#ack(session, delivery)) this.#stats.deadLettered += 1;
    }
  }

  /** The confirm channel for copies, reopened on the same connection after a 404 closed it (C-10). */
  async #copyChannel(session: Session): Promise<ConfirmedChannel> {
    if (!session.copies.closed) return session.copies;
    if (!session.alive) throw new Error('the connection is gone');
    session.reopening ??= ConfirmedChannel.open(session.model, this.#connectTimeoutMs)
      .then((channel) => {
        session.copies = channel;
        return channel;
      })
      .finally(() => {
        session.reopening = undefined;
      });
    return session.reopening;
  }

  /** Pause (doubling while give-backs continue), then `basic.reject(requeue)`; never nack (C-9). */
  async #giveBackLater(session: Session, delivery: ConsumeMessage, fields: Record<string, string | number>): Promise<void> {
    const pause = nthWait(this.#giveBack, this.#giveBacksInARow);
    this.#giveBacksInARow += 1;
    this.#logger.warn('copy not confirmed; giving the original back to the queue after a pause', { ...fields, pause_ms: pause });
    await sleep(pause, this.#stop.signal);
    this.#stats.givenBack += 1;
    try {
      session.channel.reject(delivery, true);
    } catch {
      // The channel is gone: the broker requeues the message itself (which counts too).
    }
  }
}

function classify(error: unknown): { kind: FailureKind; text: string } {
  if (error instanceof PermanentError) return { kind: 'permanent', text: error.message };
  if (error instanceof RetryableError) return { kind: 'retryable', text: error.message };
  // Anything else is a crash: retryable, and the text says so (C-7).
  const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return { kind: 'retryable', text: `the handler threw ${text}` };
}
