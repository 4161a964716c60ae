/**
 * The retry protocol as pure functions: where a failed message goes next, and the headers and
 * properties of its copy there (docs/protocol.md §2, §3). The consumer does the I/O.
 */
import type { MessageProperties, Options } from 'amqplib';

import { type PipelineConfig, tierForAttempt } from './config.js';
import { type DeadLetterReason, Headers } from './headers.js';
import { uuidv7 } from './uuid.js';

/** Error texts are cut to this many bytes of UTF-8 before they go into a header (H-1). */
export const MAX_ERROR_BYTES = 4096;
/** Counts above this read as this (H-2). */
const MAX_COUNT = 0xffff_ffff;

/** Header values as amqplib decodes them (strings, numbers, booleans, Buffers, tables, typed values). */
export type HeaderTable = Record<string, unknown>;

/** Where a failed message is republished. */
export type Destination =
  | {
      readonly kind: 'retry';
      readonly exchange: string;
      readonly routingKey: string;
      /** Tier number (1-based). */
      readonly tier: number;
      /** How long the copy waits in the tier, ms. */
      readonly delayMs: number;
    }
  | { readonly kind: 'dead-letter'; readonly exchange: string; readonly reason: DeadLetterReason };

/** How a handler failed. */
export type FailureKind = 'retryable' | 'permanent';

/** AMQP signed 64-bit integer (`l`), the type of the protocol's counts (H-1). */
export function int64(value: number): { '!': 'long'; value: number } {
  return { '!': 'long', value };
}

/**
 * Retries already done, from `x-retry-count`: any integer type, or digits in a string; absent,
 * negative or unreadable reads as 0 (H-2).
 */
export function retryCount(headers: HeaderTable | undefined): number {
  const raw = headers?.[Headers.RETRY_COUNT];
  let count: number;
  if (typeof raw === 'number') {
    count = Number.isInteger(raw) ? raw : 0;
  } else if (typeof raw === 'bigint') {
    count = raw > BigInt(MAX_COUNT) ? MAX_COUNT : Number(raw);
  } else if (typeof raw === 'string') {
    const text = raw.trim();
    count = /^[+-]?\d+$/.test(text) ? Number(text) : 0;
  } else if (typeof raw === 'object' && raw !== null && '!' in raw && 'value' in raw) {
    // amqplib's typed values: timestamps, and counts another client wrote with a type tag.
    const value = (raw as { value: unknown }).value;
    count = typeof value === 'number' && Number.isInteger(value) ? value : 0;
  } else {
    count = 0;
  }
  if (!Number.isFinite(count) || count < 0) return 0;
  return Math.min(count, MAX_COUNT);
}

/** Where a failure at `attempt` (1-based) goes (C-4, C-5, C-6, J-4). */
export function destinationFor(config: PipelineConfig, attempt: number, kind: FailureKind): Destination {
  const deadLetter = (reason: DeadLetterReason): Destination => ({
    kind: 'dead-letter',
    exchange: config.dead_letter.exchange,
    reason,
  });
  if (kind === 'permanent') return deadLetter('permanent');
  const tier = tierForAttempt(config, attempt);
  if (tier === undefined) return deadLetter('max-attempts');
  return {
    kind: 'retry',
    exchange: config.retry.exchange,
    routingKey: tier.routing_key,
    tier: tier.index,
    delayMs: tier.delay_ms,
  };
}

/** One failed attempt, as the consumer saw it. */
export interface Failure {
  /** 1-based attempt that failed. */
  readonly attempt: number;
  readonly error: string;
  /** RFC 3339 UTC time of this failure. */
  readonly at: string;
  /** Exchange and routing key of the failed delivery. */
  readonly deliveryExchange: string;
  readonly deliveryRoutingKey: string;
}

/**
 * Headers of the copy: the delivery's own, plus the protocol headers for `destination` (§2).
 * First-failure time and original exchange/routing key are set only when absent (H-4).
 */
export function failureHeaders(
  existing: HeaderTable | undefined,
  failure: Failure,
  destination: Destination,
): HeaderTable {
  const headers: HeaderTable = { ...existing };
  const keepOrSet = (name: string, value: unknown): void => {
    if (headers[name] === undefined) headers[name] = value;
  };
  keepOrSet(Headers.FIRST_FAILURE, failure.at);
  keepOrSet(Headers.ORIGINAL_EXCHANGE, failure.deliveryExchange);
  keepOrSet(Headers.ORIGINAL_ROUTING_KEY, failure.deliveryRoutingKey);
  headers[Headers.LAST_FAILURE] = failure.at;
  headers[Headers.ERROR] = truncateUtf8(failure.error, MAX_ERROR_BYTES);
  if (destination.kind === 'retry') {
    headers[Headers.RETRY_COUNT] = int64(failure.attempt);
  } else {
    headers[Headers.RETRY_COUNT] = int64(Math.max(failure.attempt - 1, 0));
    headers[Headers.REASON] = destination.reason;
    headers[Headers.ATTEMPTS] = int64(failure.attempt);
  }
  return headers;
}

/**
 * Publish options of the copy: every property of the delivery, with `headers`, persistent,
 * without `expiration` (kept in `x-msgpipe-original-expiration`), and with a UUID v7
 * `messageId` when it had none (H-3, H-5).
 */
export function copyOptions(original: MessageProperties, headers: HeaderTable): Options.Publish & { messageId: string } {
  const copyHeaders: HeaderTable = { ...headers };
  if (original.expiration !== undefined && original.expiration !== null) {
    copyHeaders[Headers.ORIGINAL_EXPIRATION] = String(original.expiration);
  }
  const kept: Record<string, unknown> = {};
  const keep = ['contentType', 'contentEncoding', 'priority', 'correlationId', 'replyTo', 'timestamp', 'type', 'userId', 'appId'] as const;
  for (const key of keep) {
    const value: unknown = original[key];
    if (value !== undefined && value !== null) kept[key] = value;
  }
  return {
    ...(kept as Options.Publish),
    headers: copyHeaders,
    deliveryMode: 2,
    messageId: typeof original.messageId === 'string' && original.messageId !== '' ? original.messageId : uuidv7(),
    mandatory: true,
  };
}

/** Cuts `text` to at most `maxBytes` bytes of UTF-8, at a character boundary (H-1). */
export function truncateUtf8(text: string, maxBytes: number): string {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= maxBytes) return text;
  let end = maxBytes;
  // Step back over continuation bytes (10xxxxxx) to the start of a character.
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end -= 1;
  return bytes.subarray(0, end).toString('utf8');
}

/** Now, as RFC 3339 UTC (`2026-12-06T09:30:00.123Z`). */
export function nowRfc3339(): string {
  return new Date().toISOString();
}

/** A header's text, when it is a string. */
export function headerText(headers: HeaderTable | undefined, name: string): string | undefined {
  const value = headers?.[name];
  if (typeof value === 'string') return value;
  if (Buffer.isBuffer(value)) return value.toString('utf8');
  return undefined;
}
