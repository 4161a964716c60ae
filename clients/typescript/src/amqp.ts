/**
 * AMQP plumbing shared by the consumer and the publisher: connecting (with a timeout, a
 * connection name, errors that never quote the URI) and the confirmed, mandatory publish that
 * both rely on (C-8, P-1): success means the broker acked the message *and* did not return it.
 */
import { readFile } from 'node:fs/promises';
import { rootCertificates } from 'node:tls';

import { connect, type ChannelModel, type ConfirmChannel, type Message as AmqpMessage, type Options } from 'amqplib';

import { withTimeout } from './backoff.js';
import { redactUri } from './logger.js';

/** Why a publish is not known to be safe on the broker. */
export type PublishFailureKind =
  /** `mandatory` and no queue took it: a missing binding (or tier). */
  | 'returned'
  /** The broker nacked it (e.g. a queue at max length with `overflow: reject-publish`). */
  | 'nacked'
  /** The exchange does not exist: the broker closed the channel with 404 (B-3). */
  | 'not-found'
  /** The channel or connection closed for another reason, or was closed already. */
  | 'closed'
  /** No confirm in time. */
  | 'timeout';

export class PublishFailure extends Error {
  override readonly name = 'PublishFailure';
  constructor(
    readonly kind: PublishFailureKind,
    message: string,
  ) {
    super(message);
  }

  /** True when the channel is unusable, as opposed to a refusal of this one message. */
  get breaksChannel(): boolean {
    return this.kind === 'not-found' || this.kind === 'closed' || this.kind === 'timeout';
  }
}

/** Opens a connection within `timeoutMs`. Errors are described without the URI (L-1). */
/** Environment variable naming a PEM file of CA certificates to trust for `amqps` URIs (as the Rust client). */
export const CA_FILE_ENV = 'MSGPIPE_CA_FILE';

/** The CA file to use: the option, else `MSGPIPE_CA_FILE` when set. */
export function caFileFrom(option: string | undefined): string | undefined {
  const fromEnv = process.env[CA_FILE_ENV];
  return option ?? (fromEnv === undefined || fromEnv === '' ? undefined : fromEnv);
}

/**
 * Opens a connection within `timeoutMs`. Errors are described without the URI (L-1).
 * `caFile`: PEM certificates trusted for `amqps` besides Node's default CAs.
 */
export async function openConnection(uri: string, name: string, timeoutMs: number, caFile?: string): Promise<ChannelModel> {
  let ca: Buffer | undefined;
  if (caFile !== undefined) {
    try {
      ca = await readFile(caFile);
    } catch (error) {
      throw new Error(`cannot read the CA file ${caFile}: ${describe(error)}`, { cause: error });
    }
  }
  const attempt = connect(uri, {
    ...(ca === undefined ? {} : { ca: [ca, ...rootCertificates.map((pem) => Buffer.from(pem))] }),
    timeout: timeoutMs,
    // Acks, confirms and small publishes must not wait for Nagle's algorithm (as the broker's own sockets).
    noDelay: true,
    clientProperties: { connection_name: name, product: '@msgpipe/client' },
  });
  let model: ChannelModel;
  try {
    model = await withTimeout(attempt, timeoutMs, () => new Error(`no answer within ${timeoutMs / 1000}s`));
  } catch (error) {
    // A connection that arrives after the timeout is closed at once.
    attempt.then((late) => late.close().catch(() => undefined)).catch(() => undefined);
    throw new Error(`cannot connect: ${describe(error)}`, { cause: error });
  }
  // Without a listener an 'error' event would crash the process; 'close' follows it.
  model.on('error', () => undefined);
  return model;
}

/** Closes a connection politely; errors do not matter any more. */
export async function closeQuietly(model: ChannelModel | undefined): Promise<void> {
  if (model === undefined) return;
  await withTimeout(model.close(), 2_000, () => new Error('close timed out')).catch(() => undefined);
}

/** An error's text, without any URI password. */
export function describe(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return redactUri(text);
}

/** The vhost a URI names (percent-decoded; `/` when absent). */
export function vhostOf(uri: string): string {
  try {
    const path = new URL(uri).pathname;
    if (path === '' || path === '/') return '/';
    return decodeURIComponent(path.slice(1));
  } catch {
    return '/';
  }
}

interface Pending {
  readonly messageId: string;
  readonly exchange: string;
  readonly routingKey: string;
  /** When the confirm is overdue (ms since the epoch). */
  readonly deadline: number;
  readonly timeoutMs: number;
  resolve(): void;
  reject(failure: PublishFailure): void;
}

/**
 * A channel in confirm mode that turns each `mandatory` publish into a promise: resolved when
 * the broker acked it and did not return it, rejected with a {@link PublishFailure} otherwise.
 *
 * Returns carry no delivery tag; RabbitMQ sends `basic.return` right before the `basic.ack` of
 * the same message, so a return is matched to the next ack of a publish with its message id
 * (every msgpipe message has one).
 */
export class ConfirmedChannel {
  readonly #channel: ConfirmChannel;
  /** Returns seen and not yet matched to their ack, by message id. */
  readonly #returned = new Map<string, number>();
  readonly #pending = new Set<Pending>();
  #closeError: (Error & { code?: number }) | undefined;
  #closed = false;
  #drain: Promise<void> | undefined;
  #sweep: NodeJS.Timeout | undefined;
  readonly #onClose: Array<(error: (Error & { code?: number }) | undefined) => void> = [];

  private constructor(channel: ConfirmChannel) {
    this.#channel = channel;
    channel.on('error', (error: Error & { code?: number }) => {
      this.#closeError = error;
    });
    channel.on('return', (message: AmqpMessage) => {
      const id = String(message.properties.messageId ?? '');
      this.#returned.set(id, (this.#returned.get(id) ?? 0) + 1);
    });
    channel.on('close', () => {
      this.#closed = true;
      clearInterval(this.#sweep);
      this.#sweep = undefined;
      const failure = this.#closeFailure();
      for (const pending of this.#pending) pending.reject(failure);
      this.#pending.clear();
      for (const listener of this.#onClose) listener(this.#closeError);
    });
  }

  /** Opens a confirm channel on `model`. */
  static async open(model: ChannelModel, timeoutMs: number): Promise<ConfirmedChannel> {
    const channel = await withTimeout(model.createConfirmChannel(), timeoutMs, () => new Error('no answer opening a confirm channel'));
    return new ConfirmedChannel(channel);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Called once when the channel closes, with the broker's error (its `code`, e.g. 404) if any. */
  onClose(listener: (error: (Error & { code?: number }) | undefined) => void): void {
    if (this.#closed) listener(this.#closeError);
    else this.#onClose.push(listener);
  }

  #closeFailure(): PublishFailure {
    const error = this.#closeError;
    if (error?.code === 404) return new PublishFailure('not-found', describe(error));
    return new PublishFailure('closed', error === undefined ? 'the channel closed' : describe(error));
  }

  /**
   * Publishes with `mandatory` and waits for the confirm (at most `timeoutMs`). `options.messageId`
   * must be set.
   */
  publish(exchange: string, routingKey: string, body: Buffer, options: Options.Publish & { messageId: string }, timeoutMs: number): Promise<void> {
    if (this.#drain !== undefined) {
      // The socket buffer is full: wait for it to drain, keeping publish order.
      const drained = this.#drain;
      return drained.then(() => this.publish(exchange, routingKey, body, options, timeoutMs));
    }
    if (this.#closed) return Promise.reject(this.#closeFailure());
    return new Promise<void>((resolve, reject) => {
      const pending: Pending = {
        messageId: options.messageId,
        exchange,
        routingKey,
        deadline: Date.now() + timeoutMs,
        timeoutMs,
        resolve,
        reject,
      };
      this.#pending.add(pending);
      this.#armSweep(timeoutMs);
      let writable: boolean;
      try {
        writable = this.#channel.publish(exchange, routingKey, body, { ...options, mandatory: true }, (err: unknown) => {
          if (!this.#pending.delete(pending)) return; // timed out, or failed by the close handler
          if (this.#takeReturn(options.messageId)) {
            reject(new PublishFailure('returned', `unroutable: exchange ${exchange} has no binding for routing key ${routingKey} (returned)`));
          } else if (err === null || err === undefined) {
            resolve();
          } else if (this.#closed || (err as Error).message === 'channel closed') {
            reject(this.#closeFailure());
          } else {
            reject(new PublishFailure('nacked', 'the broker nacked the message'));
          }
        });
      } catch (error) {
        // amqplib throws at once on a closed channel, and on a frame it cannot encode.
        this.#pending.delete(pending);
        reject(this.#closed ? this.#closeFailure() : new PublishFailure('closed', describe(error)));
        return;
      }
      if (!writable) {
        this.#drain ??= new Promise<void>((done) => {
          const finish = (): void => {
            this.#channel.off('drain', finish);
            this.#channel.off('close', finish);
            this.#drain = undefined;
            done();
          };
          this.#channel.on('drain', finish);
          this.#channel.on('close', finish);
        });
      }
    });
  }

  /**
   * One timer for all confirm deadlines (not one per message): pending publishes are kept in
   * publish order, so the sweep stops at the first one still in time.
   */
  #armSweep(timeoutMs: number): void {
    if (this.#sweep !== undefined) return;
    const every = Math.max(10, Math.min(250, Math.floor(timeoutMs / 10)));
    this.#sweep = setInterval(() => {
      const now = Date.now();
      for (const pending of this.#pending) {
        if (pending.deadline > now) break;
        this.#pending.delete(pending);
        pending.reject(new PublishFailure('timeout', `no confirm within ${pending.timeoutMs / 1000}s`));
      }
      if (this.#pending.size === 0) {
        clearInterval(this.#sweep);
        this.#sweep = undefined;
      }
    }, every);
  }

  #takeReturn(messageId: string): boolean {
    const count = this.#returned.get(messageId);
    if (count === undefined) return false;
    if (count <= 1) this.#returned.delete(messageId);
    else this.#returned.set(messageId, count - 1);
    return true;
  }

  /** Closes the channel; errors do not matter. */
  async close(): Promise<void> {
    if (this.#closed) return;
    await withTimeout(this.#channel.close(), 2_000, () => new Error('close timed out')).catch(() => undefined);
  }
}
