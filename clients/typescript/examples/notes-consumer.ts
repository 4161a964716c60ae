/**
 * The seed article's notes service, consumer side: a handler that saves notes, with the msgpipe
 * retry protocol around it. It prints every attempt, the backoff delay each retried note
 * actually waited, and what gets dead-lettered.
 *
 * ```sh
 * (cd clients/typescript && npm run build && npm run build:examples)
 * node clients/typescript/build/examples/notes-consumer.js \
 *   --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json
 * ```
 *
 * The handler: a note containing "flaky" fails on its first two attempts, "fail" fails every
 * time (the consumer dead-letters it after max_attempts), "poison" fails permanently (straight
 * to the DLQ); anything else is saved. Flags (or environment): `--uri` (`MSGPIPE_BROKER_URI`),
 * `--config` (`MSGPIPE_PIPELINE_CONFIG`), `--idle-exit SECONDS` (stop after this long without
 * a message; default: the longest retry delay + 5 s; 0 = run until Ctrl-C).
 */
import { parseArgs } from 'node:util';

import { Consumer, Headers, LiveConfig, type Message, PermanentError, RetryableError } from '@msgpipe/client';


/** The notes service's own work: save the note (here: decide by its text). */
function saveNote(text: string, attempt: number): void {
  if (text.includes('poison')) throw new PermanentError('cannot parse the note');
  if (text.includes('fail')) throw new RetryableError('notes database refused the write');
  if (text.includes('flaky') && attempt <= 2) throw new RetryableError('sync service timed out');
}

/** What the consumer will do with a failure, for the printout. */
function nextStep(message: Message, error: unknown): string {
  const destination = message.failureDestination(error instanceof PermanentError ? 'permanent' : 'retryable');
  return destination.kind === 'retry'
    ? `retry tier ${destination.tier} in ${(destination.delayMs / 1000).toFixed(1)}s`
    : `DEAD-LETTERED (${destination.reason})`;
}

/** How long the message waited since its last failure (the backoff actually seen). */
function waited(message: Message): string {
  const last = message.header(Headers.LAST_FAILURE);
  const at = last === undefined ? Number.NaN : Date.parse(last);
  if (Number.isNaN(at) || Date.now() < at) return '';
  return `, waited ${((Date.now() - at) / 1000).toFixed(2)}s since the last failure`;
}

async function main(): Promise<void> {
  const { values: args } = parseArgs({
    options: {
      uri: { type: 'string', default: process.env.MSGPIPE_BROKER_URI ?? 'amqp://guest:guest@127.0.0.1:5673/%2f' },
      config: { type: 'string', default: process.env.MSGPIPE_PIPELINE_CONFIG ?? 'target/notes-run/pipeline.json' },
      'idle-exit': { type: 'string' },
    },
  });
  const config = LiveConfig.watch(args.config, { pollMs: 2_000 });
  try {
    const pipeline = config.current;
    const delays = pipeline.retry.tiers.map((tier) => tier.delay_ms);
    const idleExit = args['idle-exit'] === undefined ? Math.floor(Math.max(0, ...delays) / 1000) + 5 : Number(args['idle-exit']);
    if (!Number.isInteger(idleExit) || idleExit < 0) throw new Error(`--idle-exit: not a number of seconds: ${args['idle-exit'] ?? ''}`);
    console.log(
      `consumer: queue ${JSON.stringify(pipeline.queue)}, ${pipeline.max_attempts} attempts, ` +
        `tiers [${delays.join(', ')}] ms, DLQ ${JSON.stringify(pipeline.dead_letter.queue)}`,
    );

    const consumer = new Consumer({ uri: args.uri, config });
    const stop = (): void => void consumer.stop();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    let lastActivity = Date.now();
    const watchdog = setInterval(() => {
      if (idleExit > 0 && Date.now() - lastActivity > idleExit * 1000) {
        console.log(`consumer: no message for ${idleExit}s, stopping`);
        clearInterval(watchdog);
        stop();
      }
    }, 250);

    try {
      await consumer.run((message) => {
        lastActivity = Date.now();
        const text = message.text();
        const prefix = `consumer: ${message.messageId ?? '?'} attempt ${message.attempt}/${message.maxAttempts} ${JSON.stringify(text)}`;
        try {
          saveNote(text, message.attempt);
        } catch (error) {
          const why = error instanceof Error ? error.message : String(error);
          console.log(`${prefix}: failed (${why})${waited(message)} -> ${nextStep(message, error)}`);
          throw error;
        }
        console.log(`${prefix}: saved${waited(message)}`);
      });
    } finally {
      clearInterval(watchdog);
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
    }
    const stats = consumer.stats();
    console.log(
      `consumer: saved ${stats.acked}, retried ${stats.retried}, dead-lettered ${stats.deadLettered}, requeued ${stats.givenBack}`,
    );
  } finally {
    config.close();
  }
}

main().catch((error: unknown) => {
  // One line, as the Rust example's `Error: ...`: a bad flag or pipeline.json is not a crash.
  console.error(`notes-consumer: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
});
