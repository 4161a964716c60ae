/** Capped exponential backoff with ±20 % jitter, and abortable sleeps. */

export interface BackoffPolicy {
  /** Wait after the first failure, ms. */
  readonly initialMs: number;
  /** Longest wait, ms. */
  readonly maxMs: number;
}

/** Reconnect waits (C-14, P-9): 200 ms doubling to 30 s. */
export const RECONNECT_BACKOFF: BackoffPolicy = { initialMs: 200, maxMs: 30_000 };
/** Give-back pauses (C-9): 500 ms doubling to 30 s. */
export const SHORT_BACKOFF: BackoffPolicy = { initialMs: 500, maxMs: 30_000 };
/**
 * Route probes (P-10, P-11): 500 ms doubling to 4 s, so a publisher that waited for its
 * pipeline however long delivers within 5 s of the route appearing.
 */
export const ROUTE_BACKOFF: BackoffPolicy = { initialMs: 500, maxMs: 4_000 };

/**
 * The waits of one outage: initial, doubled each time up to max, with jitter: ±20 % by
 * default, or `'down'` (-20 % to 0) where a wait must never exceed its step, as for the probes
 * of a missing route (delivery within one step of the route appearing, P-10).
 */
export class Backoff {
  #next: number;

  constructor(
    readonly policy: BackoffPolicy,
    readonly jitter: 'both' | 'down' = 'both',
  ) {
    this.#next = policy.initialMs;
  }

  reset(): void {
    this.#next = this.policy.initialMs;
  }

  nextWait(): number {
    const base = Math.min(this.#next, this.policy.maxMs);
    this.#next = Math.min(base * 2, this.policy.maxMs);
    const spread = this.jitter === 'both' ? 0.4 : 0.2;
    return Math.round(base * (0.8 + Math.random() * spread));
  }
}

/** `initial * 2^n` capped at max, with jitter: the n-th wait of a series (0-based). */
export function nthWait(policy: BackoffPolicy, n: number): number {
  const base = Math.min(policy.initialMs * 2 ** Math.min(n, 32), policy.maxMs);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/** Resolves after `ms`, or at once when `signal` aborts (never rejects). */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const onAbort = (): void => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** A promise that rejects with `error()` after `ms` unless `promise` settles first. */
export async function withTimeout<T>(promise: Promise<T>, ms: number, error: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(error()), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
