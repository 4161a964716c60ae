/**
 * Message headers of the msgpipe retry and dead-letter protocol (docs/protocol.md §2). The
 * consumer, `msgpipe dlq` and users' tools share these names.
 */
export const Headers = {
  /** Retries already done (0 on the first delivery); attempt = this + 1. AMQP `l`. */
  RETRY_COUNT: 'x-retry-count',
  /** The last handler error, as text (≤ 4096 bytes). */
  ERROR: 'x-msgpipe-error',
  /** Why the consumer dead-lettered the message: `permanent` or `max-attempts`. */
  REASON: 'x-msgpipe-reason',
  /** Handler calls made when the message was dead-lettered. AMQP `l`. */
  ATTEMPTS: 'x-msgpipe-attempts',
  /** RFC 3339 UTC time of the first failed attempt; kept across retries. */
  FIRST_FAILURE: 'x-msgpipe-first-failure',
  /** RFC 3339 UTC time of the latest failed attempt. */
  LAST_FAILURE: 'x-msgpipe-last-failure',
  /** Exchange the message was first published to; kept across retries. */
  ORIGINAL_EXCHANGE: 'x-msgpipe-original-exchange',
  /** Routing key the message was first published with; kept across retries. */
  ORIGINAL_ROUTING_KEY: 'x-msgpipe-original-routing-key',
  /** The `expiration` property the message had before it was copied. */
  ORIGINAL_EXPIRATION: 'x-msgpipe-original-expiration',
  /** Set by `msgpipe dlq replay`. */
  REPLAYED_AT: 'x-msgpipe-replayed-at',
  REPLAY_COUNT: 'x-msgpipe-replay-count',
  /** Set by the broker on messages it dead-lettered itself (`delivery_limit`, `expired`, ...). */
  BROKER_FIRST_DEATH_REASON: 'x-first-death-reason',
  BROKER_FIRST_DEATH_QUEUE: 'x-first-death-queue',
} as const;

/** `x-msgpipe-reason` values. */
export type DeadLetterReason = 'permanent' | 'max-attempts';
