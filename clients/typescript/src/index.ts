/**
 * @msgpipe/client: the TypeScript client of msgpipe pipelines (protocol 1, docs/protocol.md).
 *
 * - {@link Consumer}: runs a handler per message; retries with backoff through the pipeline's
 *   retry tiers and dead-letters with reasons.
 * - {@link Publisher}: confirmed publishes with a durable SQLite outbox, so a message the
 *   broker could not take is never dropped.
 * - {@link LiveConfig}: `pipeline.json` (from the operator's ConfigMap), re-read while running.
 */
export { CONFIG_PATH_ENV, CONFIG_VERSION, ConfigError, type Features, type PipelineConfig, type RetryTier, configPathFromEnv, loadPipelineConfig, parsePipelineConfig, tierForAttempt } from './config.js';
export { DEFAULT_POLL_MS, LiveConfig, type WatchOptions } from './live.js';
export { Consumer, type ConsumerOptions, type ConsumerStats, type Handler, Message, PermanentError, RetryableError } from './consumer.js';
export {
  InvalidNameError,
  type PublishOptions,
  type PublishOutcome,
  type PublishResult,
  Publisher,
  type PublisherOptions,
  type PublisherStats,
} from './publisher.js';
export { DEFAULT_OUTBOX_LIMITS, OutboxError, OutboxFullError, type OutboxLimits } from './outbox.js';
export { type DeadLetterReason, Headers } from './headers.js';
export { type Destination, type FailureKind, MAX_ERROR_BYTES, retryCount } from './retry.js';
export { type BackoffPolicy, RECONNECT_BACKOFF, SHORT_BACKOFF } from './backoff.js';
export { type LogFields, type Logger, consoleLogger, redactUri, silentLogger } from './logger.js';
export { uuidv7 } from './uuid.js';
export { CA_FILE_ENV } from './amqp.js';
