/**
 * `pipeline.json` kept live (J-5, F-3): a flipped flag or a changed topology takes effect
 * without a restart.
 *
 * A ConfigMap volume is updated by the kubelet with a symlink swap, so the file is re-read by
 * *path* on every poll and its text compared; no handle or inode is kept. A file missing for
 * one read is ignored; one that does not parse is reported once at warn and the last good
 * configuration stays in force.
 */
import { EventEmitter, on } from 'node:events';
import { readFile } from 'node:fs/promises';

import { type Features, type PipelineConfig, configPathFromEnv, loadPipelineConfig, parsePipelineConfig } from './config.js';
import { type Logger, consoleLogger } from './logger.js';

/** How often the file is re-read by default, ms. */
export const DEFAULT_POLL_MS = 5_000;

export interface WatchOptions {
  /** Re-read interval, ms (default 5000; env `MSGPIPE_PIPELINE_POLL_MS` overrides the default). */
  pollMs?: number;
  logger?: Logger;
}

interface Events {
  change: [PipelineConfig];
  features: [Features];
}

function sameFeatures(a: Features, b: Features): boolean {
  return a.retry_pending === b.retry_pending && a.retry_interval_seconds === b.retry_interval_seconds;
}

/**
 * The current `pipeline.json`. Emits `change` (any change of meaning) and `features` (only
 * when the flags change); {@link LiveConfig.featureChanges} gives the same as an async iterator.
 */
export class LiveConfig extends EventEmitter<Events> {
  #config: PipelineConfig;
  #timer: NodeJS.Timeout | undefined;

  private constructor(config: PipelineConfig) {
    super();
    this.#config = config;
  }

  /** A configuration that never changes (tests, or a client configured in code). */
  static fixed(config: PipelineConfig): LiveConfig {
    return new LiveConfig(config);
  }

  /**
   * Reads `path` now (throwing a ConfigError if it is missing or invalid) and re-reads it every
   * `pollMs`. Without a path, the file named by `MSGPIPE_PIPELINE_CONFIG`. The poll timer does
   * not keep the process alive; {@link LiveConfig.close} stops it.
   */
  static watch(path: string = configPathFromEnv(), options: WatchOptions = {}): LiveConfig {
    const logger = options.logger ?? consoleLogger;
    const envPoll = Number(process.env.MSGPIPE_PIPELINE_POLL_MS);
    const pollMs = options.pollMs ?? (Number.isFinite(envPoll) && envPoll > 0 ? envPoll : DEFAULT_POLL_MS);
    const live = new LiveConfig(loadPipelineConfig(path));
    let lastText = JSON.stringify(live.#config);
    let lastBad: string | undefined;
    let reading = false;
    const poll = async (): Promise<void> => {
      if (reading) return;
      reading = true;
      try {
        let text: string;
        try {
          text = await readFile(path, 'utf8');
        } catch {
          return; // mid-swap the path can be briefly missing
        }
        if (text === lastText || text === lastBad) return;
        try {
          const config = parsePipelineConfig(text, path);
          lastText = text;
          lastBad = undefined;
          live.#update(config, logger);
        } catch (error) {
          lastBad = text;
          logger.warn('ignoring the new pipeline.json; keeping the last good one', {
            error: (error as Error).message,
          });
        }
      } finally {
        reading = false;
      }
    };
    live.#timer = setInterval(() => void poll(), Math.max(pollMs, 10));
    live.#timer.unref();
    return live;
  }

  #update(config: PipelineConfig, logger: Logger): void {
    const before = this.#config;
    if (JSON.stringify(before) === JSON.stringify(config)) return;
    this.#config = config;
    if (!sameFeatures(before.features, config.features)) {
      logger.info('pipeline.json features changed', {
        retry_pending: config.features.retry_pending,
        retry_interval_seconds: config.features.retry_interval_seconds,
      });
      this.emit('features', config.features);
    }
    this.emit('change', config);
  }

  /** The configuration in force now. */
  get current(): PipelineConfig {
    return this.#config;
  }

  /** The feature flags in force now. */
  get features(): Features {
    return this.#config.features;
  }

  /** The flags each time they change, until `signal` aborts. */
  async *featureChanges(signal?: AbortSignal): AsyncGenerator<Features, void, undefined> {
    try {
      for await (const [features] of on(this, 'features', { signal })) {
        yield features as Features;
      }
    } catch (error) {
      if ((error as Error).name !== 'AbortError') throw error;
    }
  }

  /** Stops polling. */
  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
