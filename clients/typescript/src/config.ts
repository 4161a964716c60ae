/**
 * The `pipeline.json` contract between the operator and its clients (docs/protocol.md §1).
 *
 * Unknown fields are ignored, so a client keeps working when a newer operator adds some (J-3);
 * a missing field, a field of another JSON type or another `version` is refused (J-2).
 */
import { readFileSync } from 'node:fs';

/** Environment variable holding the path of `pipeline.json` (J-1). */
export const CONFIG_PATH_ENV = 'MSGPIPE_PIPELINE_CONFIG';
/** The contract version this client understands. */
export const CONFIG_VERSION = 1;

/** One retry queue and the failed attempts that use it. */
export interface RetryTier {
  /** 1-based tier number. */
  readonly index: number;
  /** Routing key that reaches this tier on the retry exchange. */
  readonly routing_key: string;
  /** The tier queue (informative). */
  readonly queue: string;
  /** How long a copy waits in this tier, in milliseconds (informative). */
  readonly delay_ms: number;
  /** A failure at attempt k uses this tier when `first_attempt <= k <= last_attempt`. */
  readonly first_attempt: number;
  readonly last_attempt: number;
}

/** Client feature flags. */
export interface Features {
  /** Resend the publisher's outbox; off parks it. */
  readonly retry_pending: boolean;
  /** Seconds between resend rounds while the broker cannot be reached. */
  readonly retry_interval_seconds: number;
}

/** Everything a client needs to publish to, consume from and retry on a pipeline. */
export interface PipelineConfig {
  readonly version: number;
  /** `<namespace>/<name>` of the MessagePipeline. */
  readonly pipeline: string;
  readonly vhost: string;
  /** Work exchange publishers send to. */
  readonly exchange: string;
  /** Routing key publishers use on `exchange`. */
  readonly routing_key: string;
  /** Work queue consumers read. */
  readonly queue: string;
  /** Handler calls a message gets before it is dead-lettered (1 = no retry). */
  readonly max_attempts: number;
  readonly retry: { readonly exchange: string; readonly tiers: readonly RetryTier[] };
  readonly dead_letter: { readonly exchange: string; readonly queue: string };
  readonly features: Features;
}

/** `pipeline.json` could not be read or does not follow the contract. The message names the file. */
export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  constructor(
    message: string,
    readonly path: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

type Json = unknown;

function isObject(value: Json): value is Record<string, Json> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Field readers that name what is wrong; `where` is a JSON path like `retry.tiers[0]`. */
class Reader {
  constructor(private readonly origin: string) {}

  fail(message: string): never {
    throw new ConfigError(`${this.origin} is not a valid pipeline.json: ${message}`, this.origin);
  }

  object(value: Json, where: string): Record<string, Json> {
    if (!isObject(value)) this.fail(`${where} must be an object`);
    return value;
  }

  string(obj: Record<string, Json>, key: string, where: string): string {
    const value = obj[key];
    if (typeof value !== 'string') this.fail(`${join(where, key)} must be a string`);
    return value;
  }

  integer(obj: Record<string, Json>, key: string, where: string, min: number): number {
    const value = obj[key];
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
      this.fail(`${join(where, key)} must be an integer >= ${min}`);
    }
    return value;
  }

  boolean(obj: Record<string, Json>, key: string, where: string): boolean {
    const value = obj[key];
    if (typeof value !== 'boolean') this.fail(`${join(where, key)} must be a boolean`);
    return value;
  }
}

function join(where: string, key: string): string {
  return where === '' ? key : `${where}.${key}`;
}

/** Parses and checks `pipeline.json` text; `origin` (a path) names it in errors. */
export function parsePipelineConfig(text: string, origin = 'pipeline.json'): PipelineConfig {
  const r = new Reader(origin);
  let raw: Json;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new ConfigError(`${origin} is not valid JSON: ${(error as Error).message}`, origin, {
      cause: error,
    });
  }
  const root = r.object(raw, 'the document');
  const version = r.integer(root, 'version', '', 0);
  if (version !== CONFIG_VERSION) {
    throw new ConfigError(
      `${origin} has contract version ${version}; this client understands version ${CONFIG_VERSION}`,
      origin,
    );
  }
  const retry = r.object(root.retry, 'retry');
  const tiersRaw: unknown = retry.tiers;
  if (!Array.isArray(tiersRaw)) r.fail('retry.tiers must be an array');
  const tiers = (tiersRaw as unknown[]).map((value: Json, i: number): RetryTier => {
    const where = `retry.tiers[${i}]`;
    const tier = r.object(value, where);
    return {
      index: r.integer(tier, 'index', where, 1),
      routing_key: r.string(tier, 'routing_key', where),
      queue: r.string(tier, 'queue', where),
      delay_ms: r.integer(tier, 'delay_ms', where, 0),
      first_attempt: r.integer(tier, 'first_attempt', where, 1),
      last_attempt: r.integer(tier, 'last_attempt', where, 1),
    };
  });
  const deadLetter = r.object(root.dead_letter, 'dead_letter');
  const features = r.object(root.features, 'features');
  return {
    version,
    pipeline: r.string(root, 'pipeline', ''),
    vhost: r.string(root, 'vhost', ''),
    exchange: r.string(root, 'exchange', ''),
    routing_key: r.string(root, 'routing_key', ''),
    queue: r.string(root, 'queue', ''),
    max_attempts: r.integer(root, 'max_attempts', '', 1),
    retry: { exchange: r.string(retry, 'exchange', 'retry'), tiers },
    dead_letter: {
      exchange: r.string(deadLetter, 'exchange', 'dead_letter'),
      queue: r.string(deadLetter, 'queue', 'dead_letter'),
    },
    features: {
      retry_pending: r.boolean(features, 'retry_pending', 'features'),
      retry_interval_seconds: r.integer(features, 'retry_interval_seconds', 'features', 0),
    },
  };
}

/** Reads and checks a `pipeline.json` file (J-1, J-2). */
export function loadPipelineConfig(path: string = configPathFromEnv()): PipelineConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new ConfigError(`cannot read ${path}: ${(error as Error).message}`, path, { cause: error });
  }
  return parsePipelineConfig(text, path);
}

/** The path in `MSGPIPE_PIPELINE_CONFIG`; throws a ConfigError when it is not set. */
export function configPathFromEnv(): string {
  const path = process.env[CONFIG_PATH_ENV];
  if (path === undefined || path === '') {
    throw new ConfigError(`${CONFIG_PATH_ENV} is not set`, '');
  }
  return path;
}

/**
 * The tier for a failure at `attempt` (1-based), or undefined when the message has used all
 * its attempts. A file that names no tier although attempts remain gets the last tier (J-4).
 */
export function tierForAttempt(config: PipelineConfig, attempt: number): RetryTier | undefined {
  if (attempt >= config.max_attempts) return undefined;
  const { tiers } = config.retry;
  return (
    tiers.find((tier) => tier.first_attempt <= attempt && attempt <= tier.last_attempt) ??
    tiers[tiers.length - 1]
  );
}
