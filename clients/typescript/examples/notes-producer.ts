/**
 * The seed article's notes service, producer side: publishes notes to the notes pipeline with
 * the msgpipe publisher (confirms, and a durable outbox when the broker is away).
 *
 * ```sh
 * (cd clients/typescript && npm run build && npm run build:examples)
 * node clients/typescript/build/examples/notes-producer.js \
 *   --uri amqp://guest:guest@127.0.0.1:5673/%2f --config target/notes-run/pipeline.json
 * ```
 *
 * Flags (or environment): `--uri` (`MSGPIPE_BROKER_URI`), `--config` (`MSGPIPE_PIPELINE_CONFIG`),
 * `--outbox` (`MSGPIPE_OUTBOX`, default `target/notes-run/outbox-typescript.sqlite3`), `--count`
 * (notes to send, default 6). Notes whose text contains "flaky" fail twice in the consumer,
 * "fail" always fails (dead-lettered after max_attempts), "poison" fails permanently
 * (dead-lettered at once). The client logs warnings to stderr; `MSGPIPE_LOG=info` shows more.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { inspect, parseArgs } from 'node:util';

import { LiveConfig, Publisher } from '@msgpipe/client';

const NOTES = [
  'buy milk',
  'flaky: sync lecture 3 notes',
  'call the dentist',
  'this note will fail every time',
  'poison: {not json',
  'review chapter 7',
] as const;

async function main(): Promise<void> {
  const { values: args } = parseArgs({
    options: {
      uri: { type: 'string', default: process.env.MSGPIPE_BROKER_URI ?? 'amqp://guest:guest@127.0.0.1:5673/%2f' },
      config: { type: 'string', default: process.env.MSGPIPE_PIPELINE_CONFIG ?? 'target/notes-run/pipeline.json' },
      outbox: { type: 'string', default: process.env.MSGPIPE_OUTBOX ?? 'target/notes-run/outbox-typescript.sqlite3' },
      count: { type: 'string', default: String(NOTES.length) },
    },
  });
  const count = Number(args.count);
  if (!Number.isInteger(count) || count < 0) throw new Error(`--count: not a count: ${args.count}`);

  const config = LiveConfig.watch(args.config, { pollMs: 2_000 });
  try {
    const pipeline = config.current;
    console.log(
      `producer: pipeline ${pipeline.pipeline} -> exchange ${JSON.stringify(pipeline.exchange)}, ` +
        `routing key ${JSON.stringify(pipeline.routing_key)}; outbox ${args.outbox}`,
    );
    const publisher = await Publisher.start({ uri: args.uri, config, outboxPath: args.outbox });
    try {
      if (publisher.outboxSize > 0) {
        console.log(`producer: ${publisher.outboxSize} notes saved by an earlier run are waiting in the outbox`);
      }
      for (let n = 0; n < count; n++) {
        const text = `note ${n + 1}: ${NOTES[n % NOTES.length] ?? ''}`;
        const { outcome, messageId } = await publisher.publish(text, { contentType: 'text/plain' });
        if (outcome === 'confirmed') {
          console.log(`producer: sent   ${messageId}  ${JSON.stringify(text)} (confirmed)`);
        } else {
          console.log(
            `producer: saved  ${messageId}  ${JSON.stringify(text)} (not confirmed yet: in the outbox, resent automatically)`,
          );
        }
      }
      if (publisher.outboxSize > 0) {
        const features = config.features;
        console.log(
          `producer: ${publisher.outboxSize} notes in the outbox; retry_pending=${features.retry_pending} ` +
            `resends every ${features.retry_interval_seconds}s`,
        );
        const deadline = Date.now() + (features.retry_interval_seconds * 2 + 5) * 1000;
        while (publisher.outboxSize > 0 && Date.now() < deadline) await sleep(200);
        console.log(`producer: ${publisher.outboxSize} notes still in the outbox (kept on disk for the next run)`);
      }
      console.log(`producer: ${inspect(publisher.stats(), { breakLength: Infinity })}`);
    } finally {
      await publisher.close();
    }
  } finally {
    config.close();
  }
}

main().catch((error: unknown) => {
  // One line, as the Rust example's `Error: ...`: a bad flag or pipeline.json is not a crash.
  console.error(`notes-producer: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
});
