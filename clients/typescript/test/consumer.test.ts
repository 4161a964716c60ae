/** The consumer against a real broker: retries, dead letters, give-backs, shutdown, reconnects. */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';

import { Consumer, type ConsumerOptions, Headers, LiveConfig, type Message, PermanentError, Publisher, RetryableError } from '../src/index.js';
import { MemoryLogger, Peek, TestVhost, ensureBroker, eventually, mgmt } from './support.js';

interface Seen {
  id: string | undefined;
  attempt: number;
  redelivered: boolean;
  headers: Record<string, unknown>;
  at: number;
}

/** A vhost with the pipeline applied, a publisher, and a way to look at queues. */
async function setup(ctx: { after(fn: () => unknown): void }, prefix: string, spec: Parameters<TestVhost['writePipeline']>[0] = {}) {
  const vhost = await TestVhost.create(prefix);
  const consumers: Consumer[] = [];
  await vhost.writePipeline(spec);
  await vhost.apply();
  const config = LiveConfig.watch(vhost.configPath, { pollMs: 100 });
  const logger = new MemoryLogger();
  const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: `${vhost.dir}/outbox.db`, config, logger });
  const peek = await Peek.open(vhost.uri);
  const t = {
    vhost,
    config,
    logger,
    publisher,
    peek,
    consumer(options: Omit<ConsumerOptions, 'uri' | 'config' | 'logger'> = {}): Consumer {
      const consumer = new Consumer({ uri: vhost.uri, config, logger, ...options });
      consumers.push(consumer);
      return consumer;
    },
    async close() {
      await Promise.all(consumers.map((c) => c.stop()));
      await publisher.close();
      await peek.close();
      config.close();
      await vhost.close();
    },
  };
  ctx.after(() => t.close());
  return t;
}

function record(seen: Seen[], message: Message): void {
  seen.push({ id: message.messageId, attempt: message.attempt, redelivered: message.redelivered, headers: { ...message.headers }, at: Date.now() });
}

describe('consumer', { concurrency: true }, () => {
  before(() => ensureBroker());

  test('a retryable failure goes to its tier with the protocol headers and comes back at the next attempt', async (ctx) => {
    const t = await setup(ctx, 'retry');
    const seen: Seen[] = [];
    const consumer = t.consumer();
    const running = consumer.run((message) => {
      record(seen, message);
      if (message.attempt === 1) throw new RetryableError('db timeout');
    });
    await consumer.whenConsuming();
    const { outcome, messageId } = await t.publisher.publish('hello', { headers: { 'x-app': 'notes' }, correlationId: 'c-1', expiration: 60_000 });
    assert.equal(outcome, 'confirmed');
    await eventually('the second attempt', 10_000, () => seen.length >= 2 && t.peek.depth('notes_queue').then((n) => n === 0));
    const [first, second] = seen;
    assert.ok(first && second);
    assert.equal(first.attempt, 1);
    assert.equal(second.attempt, 2);
    assert.equal(second.id, messageId, 'the copy keeps the message id');
    assert.ok(second.at - first.at >= 180, `waited the tier delay (${second.at - first.at} ms)`);
    const h = second.headers;
    assert.equal(h[Headers.RETRY_COUNT], 1);
    assert.equal(h[Headers.ERROR], 'db timeout');
    assert.equal(h[Headers.ORIGINAL_EXCHANGE], 'notes');
    assert.equal(h[Headers.ORIGINAL_ROUTING_KEY], 'notes');
    assert.equal(h[Headers.ORIGINAL_EXPIRATION], '60000');
    assert.match(String(h[Headers.FIRST_FAILURE]), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
    assert.equal(h[Headers.FIRST_FAILURE], h[Headers.LAST_FAILURE]);
    assert.equal(h[Headers.REASON], undefined, 'no reason on a retried copy');
    assert.equal(h['x-app'], 'notes', 'user headers are kept');
    await consumer.stop();
    await running;
    assert.deepEqual(consumer.stats().retried, 1);
    assert.deepEqual(consumer.stats().acked, 1);
    assert.equal(await t.peek.depth('notes_dlq'), 0);
    
  });

  test('the last failed attempt dead-letters with the reason headers; a permanent failure does so at once', async (ctx) => {
    const t = await setup(ctx, 'dlq', { maxAttempts: 3 });
    const seen: Seen[] = [];
    const consumer = t.consumer();
    void consumer.run((message) => {
      record(seen, message);
      if (message.text() === 'bad') throw new PermanentError('malformed note');
      throw new Error('always down');
    });
    await consumer.whenConsuming();
    const flaky = await t.publisher.publish('flaky', { messageId: 'flaky-1' });
    const bad = await t.publisher.publish('bad', { messageId: 'bad-1' });
    assert.equal(flaky.outcome, 'confirmed');
    assert.equal(bad.outcome, 'confirmed');
    const dead = await eventually('two dead letters', 15_000, async () => {
      const n = await t.peek.depth('notes_dlq');
      return n >= 2 ? t.peek.drain('notes_dlq') : undefined;
    });
    const byId = new Map(dead.map((m) => [m.properties.messageId as string, m]));
    const exhausted = byId.get('flaky-1');
    const permanent = byId.get('bad-1');
    assert.ok(exhausted && permanent);
    const eh = exhausted.properties.headers ?? {};
    assert.equal(eh[Headers.REASON], 'max-attempts');
    assert.equal(eh[Headers.ATTEMPTS], 3);
    assert.equal(eh[Headers.RETRY_COUNT], 2);
    assert.equal(eh[Headers.ERROR], 'the handler threw Error: always down');
    assert.equal(eh[Headers.ORIGINAL_ROUTING_KEY], 'notes');
    assert.equal(exhausted.fields.routingKey, 'notes', 'a dead letter keeps its original routing key');
    assert.equal(exhausted.properties.deliveryMode, 2);
    assert.ok(String(eh[Headers.FIRST_FAILURE]) < String(eh[Headers.LAST_FAILURE]));
    const ph = permanent.properties.headers ?? {};
    assert.equal(ph[Headers.REASON], 'permanent');
    assert.equal(ph[Headers.ATTEMPTS], 1);
    assert.equal(ph[Headers.RETRY_COUNT], 0);
    assert.equal(ph[Headers.ERROR], 'malformed note');
    assert.deepEqual(
      seen.filter((s) => s.id === 'flaky-1').map((s) => s.attempt),
      [1, 2, 3],
    );
    assert.deepEqual(
      seen.filter((s) => s.id === 'bad-1').map((s) => s.attempt),
      [1],
    );
    assert.equal(await t.peek.depth('notes_queue'), 0);
    assert.equal(consumer.stats().deadLettered, 2);
    
  });

  test('a copy that cannot be placed is given back with reject, which the quorum delivery-limit counts (4.3 ignores nack)', async (ctx) => {
    const t = await setup(ctx, 'giveback', { maxAttempts: 3 });
    // The retry exchange disappears: every copy is answered by a 404 channel close.
    await mgmt('DELETE', t.vhost.path('exchanges', 'notes_queue.retry'));
    const seen: Seen[] = [];
    const consumer = t.consumer({
      giveBackBackoff: { initialMs: 100, maxMs: 400 },
    });
    void consumer.run((message) => {
      record(seen, message);
      throw new RetryableError('still failing');
    });
    await consumer.whenConsuming();
    await t.publisher.publish('stuck', { messageId: 'stuck-1' });
    // delivery-limit = max_attempts = 3: the broker dead-letters it after the third give-back.
    const [dead] = await eventually('the broker to dead-letter the message', 15_000, async () =>
      (await t.peek.depth('notes_dlq')) > 0 ? t.peek.drain('notes_dlq') : undefined,
    );
    assert.ok(dead);
    assert.equal(dead.properties.messageId, 'stuck-1');
    const headers = dead.properties.headers ?? {};
    assert.equal(headers[Headers.BROKER_FIRST_DEATH_REASON], 'delivery_limit');
    assert.equal(headers[Headers.REASON], undefined, 'the client never placed a copy');
    assert.ok(seen.length >= 3, `handler calls: ${seen.length}`);
    assert.ok(
      seen.every((s) => s.attempt === 1),
      'a give-back repeats the same attempt',
    );
    assert.ok(seen.slice(1).every((s) => s.redelivered));
    const gaps = seen.slice(1).map((s, i) => s.at - (seen[i]?.at ?? 0));
    assert.ok(
      gaps.every((g) => g >= 70),
      `give-backs paused (${gaps.join(', ')} ms)`,
    );
    assert.equal(consumer.stats().acked + consumer.stats().retried, 0);
    assert.ok(consumer.stats().givenBack >= 3);
    
  });

  test('stop() lets the handler in flight finish and acks it; nothing is redelivered', async (ctx) => {
    const t = await setup(ctx, 'shutdown');
    let finished = 0;
    const consumer = t.consumer();
    let started!: () => void;
    const handlerStarted = new Promise<void>((r) => (started = r));
    const running = consumer.run(async () => {
      started();
      await new Promise((r) => setTimeout(r, 600));
      finished += 1;
    });
    await consumer.whenConsuming();
    await t.publisher.publish('slow');
    await handlerStarted;
    const stopping = Date.now();
    await consumer.stop();
    await running;
    assert.equal(finished, 1, 'the handler finished before stop() resolved');
    assert.ok(Date.now() - stopping >= 400);
    assert.equal(consumer.stats().acked, 1);
    await eventually('the queue to be empty', 5_000, async () => (await t.peek.depth('notes_queue')) === 0);
    
  });

  test('re-subscribes after the connection is closed and after its queue is deleted, without a hot loop', async (ctx) => {
    const t = await setup(ctx, 'reconnect');
    const bodies: string[] = [];
    const consumer = t.consumer({ connectionName: `c-${t.vhost.name}` });
    void consumer.run((message) => {
      bodies.push(message.text());
    });
    await consumer.whenConsuming();
    await t.publisher.publish('one');
    await eventually('one', 5_000, () => bodies.includes('one'));
    // The broker closes the consumer's connection (as on a node restart or an admin's action).
    const connections = await eventually('the connection listed', 10_000, async () => {
      const list = (await mgmt('GET', `/vhosts/${encodeURIComponent(t.vhost.name)}/connections`)) as Array<{
        name: string;
        client_properties?: { connection_name?: string };
      }>;
      const mine = list.filter((c) => c.client_properties?.connection_name === `c-${t.vhost.name}`);
      return mine.length > 0 ? mine : undefined;
    });
    for (const c of connections) await mgmt('DELETE', `/connections/${encodeURIComponent(c.name)}`);
    await eventually('a second connection', 10_000, () => consumer.stats().connections >= 2);
    await t.publisher.publish('two');
    await eventually('two', 5_000, () => bodies.includes('two'));
    // The queue goes away (basic.cancel from the broker) for 3 s, then comes back.
    const warnsBefore = t.logger.at('warn').length;
    await mgmt('DELETE', t.vhost.path('queues', 'notes_queue'));
    await new Promise((r) => setTimeout(r, 3_000));
    const warnsWhileMissing = t.logger.at('warn').length - warnsBefore;
    // 0.2 + 0.4 + 0.8 + 1.6 s: at most ~5 attempts in 3 s; a hot loop would log hundreds.
    assert.ok(warnsWhileMissing >= 1 && warnsWhileMissing <= 6, `warn lines while the queue was missing: ${warnsWhileMissing}`);
    await t.vhost.apply();
    await eventually('consuming again', 10_000, async () => {
      await t.publisher.publish('three');
      await new Promise((r) => setTimeout(r, 300));
      return bodies.includes('three');
    });
    
  });
});
