/**
 * Throughput of the msgpipe client against raw amqplib, on the same broker in the same run:
 * confirmed publishes (mandatory, persistent, to a quorum work queue) and consume-with-ack.
 *
 *   npm run bench                      # BENCH_MESSAGES=20000 BENCH_WINDOW=256 by default
 *
 * Uses the test broker (scripts/test-broker.sh ensure msgpipe-typescript 5703) and a vhost of
 * its own, provisioned with `msgpipe apply`.
 */
import amqp from 'amqplib';

import { Consumer, LiveConfig, Publisher, silentLogger } from '../src/index.js';
import { Peek, TestVhost, ensureBroker } from '../test/support.js';

const MESSAGES = Number(process.env.BENCH_MESSAGES ?? 20_000);
const WINDOW = Number(process.env.BENCH_WINDOW ?? 256);
const SEQUENTIAL = Number(process.env.BENCH_SEQUENTIAL ?? 2_000);
/** Rounds per benchmark, raw and msgpipe alternating; the median of each side is reported (a shared, busy machine is noisy). */
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? 0;
}
const body = Buffer.from(JSON.stringify({ note: 'x'.repeat(200) }));

interface Row {
  what: string;
  raw: number;
  msgpipe: number;
}

function rate(count: number, startedNs: bigint): number {
  return count / (Number(process.hrtime.bigint() - startedNs) / 1e9);
}

/** raw amqplib: a confirm channel, `window` publishes in flight, mandatory + persistent. */
async function rawPublish(uri: string, count: number, window: number): Promise<number> {
  const model = await amqp.connect(uri);
  const channel = await model.createConfirmChannel();
  let returned = 0;
  channel.on('return', () => (returned += 1));
  const started = process.hrtime.bigint();
  for (let sent = 0; sent < count; sent += window) {
    const n = Math.min(window, count - sent);
    await Promise.all(
      Array.from(
        { length: n },
        (_, i) =>
          new Promise<void>((resolve, reject) => {
            channel.publish('notes', 'notes', body, { mandatory: true, persistent: true, messageId: `raw-${sent + i}` }, (err: unknown) =>
              err === null || err === undefined ? resolve() : reject(new Error('raw publish nacked')),
            );
          }),
      ),
    );
  }
  const result = rate(count, started);
  if (returned > 0) throw new Error(`${returned} raw publishes were returned`);
  await model.close();
  return result;
}

async function msgpipePublish(publisher: Publisher, count: number, window: number): Promise<number> {
  const started = process.hrtime.bigint();
  for (let sent = 0; sent < count; sent += window) {
    const n = Math.min(window, count - sent);
    const results = await Promise.all(Array.from({ length: n }, () => publisher.publish(body)));
    if (results.some((r) => r.outcome !== 'confirmed')) throw new Error('a benchmark publish was queued, not confirmed');
  }
  return rate(count, started);
}

async function fill(uri: string, count: number): Promise<void> {
  await rawPublish(uri, count, 512);
}

async function rawConsume(uri: string, queue: string, count: number): Promise<number> {
  const model = await amqp.connect(uri);
  const channel = await model.createChannel();
  await channel.prefetch(64);
  let seen = 0;
  const started = process.hrtime.bigint();
  await new Promise<void>((resolve) => {
    void channel.consume(queue, (message) => {
      if (message === null) return;
      channel.ack(message);
      seen += 1;
      if (seen === count) resolve();
    });
  });
  const result = rate(count, started);
  await model.close();
  return result;
}

async function msgpipeConsume(uri: string, config: LiveConfig, count: number): Promise<number> {
  const consumer = new Consumer({ uri, config, logger: silentLogger, prefetch: 64, concurrency: 16 });
  let started = 0n;
  let done!: () => void;
  const finished = new Promise<void>((resolve) => (done = resolve));
  const running = consumer.run(() => {
    if (started === 0n) started = process.hrtime.bigint();
  });
  const poll = setInterval(() => {
    if (consumer.stats().acked >= count) done();
  }, 5);
  await finished;
  clearInterval(poll);
  const result = rate(count, started);
  await consumer.stop();
  await running;
  return result;
}

async function main(): Promise<void> {
  await ensureBroker();
  const vhost = await TestVhost.create('bench');
  try {
    await vhost.writePipeline();
    await vhost.apply();
    const config = LiveConfig.watch(vhost.configPath);
    const peek = await Peek.open(vhost.uri);
    const purge = async (): Promise<void> => {
      const model = await amqp.connect(vhost.uri);
      const channel = await model.createChannel();
      await channel.purgeQueue('notes_queue');
      await model.close();
    };
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: `${vhost.dir}/outbox.db`, config, logger: silentLogger });
    const rows: Row[] = [];

    // Warm-up, so neither side pays for the broker's first writes.
    await rawPublish(vhost.uri, 1_000, WINDOW);
    await msgpipePublish(publisher, 1_000, WINDOW);
    await purge();

    for (const [what, count, window] of [
      [`confirmed publish, ${WINDOW} in flight`, MESSAGES, WINDOW],
      ['confirmed publish, one at a time', SEQUENTIAL, 1],
    ] as const) {
      const raw: number[] = [];
      const mine: number[] = [];
      for (let round = 0; round < ROUNDS; round += 1) {
        raw.push(await rawPublish(vhost.uri, count, window));
        await purge();
        mine.push(await msgpipePublish(publisher, count, window));
        await purge();
      }
      rows.push({ what, raw: median(raw), msgpipe: median(mine) });
    }
    await publisher.close();

    const raw: number[] = [];
    const mine: number[] = [];
    for (let round = 0; round < ROUNDS; round += 1) {
      await fill(vhost.uri, MESSAGES);
      raw.push(await rawConsume(vhost.uri, 'notes_queue', MESSAGES));
      await fill(vhost.uri, MESSAGES);
      mine.push(await msgpipeConsume(vhost.uri, config, MESSAGES));
    }
    rows.push({ what: 'consume + ack (prefetch 64)', raw: median(raw), msgpipe: median(mine) });
    if ((await peek.depth('notes_queue')) !== 0) throw new Error('messages left after the consume benchmark');
    await peek.close();
    config.close();

    console.log(`\nRabbitMQ test node, quorum work queue, ${body.length}-byte bodies, ${MESSAGES} messages per run, median of ${ROUNDS} alternating rounds\n`);
    console.log(`${'benchmark'.padEnd(38)} ${'raw amqplib'.padStart(12)} ${'@msgpipe'.padStart(12)} ${'ratio'.padStart(7)}`);
    for (const r of rows) {
      console.log(`${r.what.padEnd(38)} ${`${r.raw.toFixed(0)}/s`.padStart(12)} ${`${r.msgpipe.toFixed(0)}/s`.padStart(12)} ${(r.msgpipe / r.raw).toFixed(2).padStart(7)}`);
    }
  } finally {
    await vhost.close();
  }
}

await main();
