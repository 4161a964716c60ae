/** The publisher against a real broker: confirms, the outbox, a missing pipeline, flags, restarts. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { before, describe, test } from 'node:test';

import { LiveConfig, Publisher, type PublishResult } from '../src/index.js';
import { BROKER_NAME, BROKER_PORT, MemoryLogger, Peek, TestVhost, brokerScript, cleanup, ensureBroker, eventually, unbind } from './support.js';

const here = dirname(fileURLToPath(import.meta.url));

async function bodiesIn(peek: Peek, queue: string): Promise<string[]> {
  return (await peek.drain(queue)).map((m) => m.content.toString());
}

describe('publisher', { concurrency: true }, () => {
  before(() => ensureBroker());

  test('a publisher started before its pipeline exists delivers within 5 s of msgpipe apply, logging once', async (t) => {
    const vhost = await TestVhost.create('early');
    cleanup(t, vhost);
    await vhost.writePipeline({ retryIntervalSeconds: 120 }); // rendered, not applied
    const logger = new MemoryLogger();
    const config = LiveConfig.watch(vhost.configPath, { pollMs: 100 });
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: join(vhost.dir, 'outbox.db'), config, logger });
    cleanup(t, publisher);
    const results: PublishResult[] = [];
    for (const body of ['n1', 'n2', 'n3']) results.push(await publisher.publish(body, { messageId: body }));
    assert.deepEqual(
      results.map((r) => r.outcome),
      ['queued', 'queued', 'queued'],
    );
    // The figure: started 30 s before the pipeline (probes back off to the 4 s cap).
    await new Promise((r) => setTimeout(r, 30_000));
    const before = [...logger.lines];
    const warns = before.filter((l) => l.level === 'warn');
    assert.equal(warns.length, 1, JSON.stringify(before));
    assert.equal(warns[0]?.message.startsWith(`exchange notes does not exist in vhost ${vhost.name}: is the pipeline applied?`), true, warns[0]?.message);
    assert.ok(!JSON.stringify(before).includes('guest:guest'), 'no credentials in logs');
    // Probes at ~0.5, 1.5, 3.5 s, then every 4 s or less: no line of their own (at most one
    // per backoff step).
    const probes = publisher.stats().resendRounds;
    assert.ok(probes >= 5 && probes <= 14, `probes in 30 s: ${probes}`);
    assert.ok(before.length <= probes, `log lines ${before.length} for ${probes} backoff steps`);
    assert.equal(publisher.stats().connections, 1, 'a 404 reopens the channel, never the connection');

    const applied = Date.now();
    await vhost.apply();
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    await eventually('the outbox to reach the work queue', 5_000, async () => (await peek.depth('notes_queue')) === 3);
    const delay = Date.now() - applied;
    assert.ok(delay <= 5_000, `delivered ${delay} ms after apply`);
    assert.deepEqual(await bodiesIn(peek, 'notes_queue'), ['n1', 'n2', 'n3'], 'oldest first');
    assert.equal(publisher.outboxSize, 0);
    assert.equal((await publisher.publish('n4')).outcome, 'confirmed');
    assert.equal(logger.at('warn').length, 1, 'still the single warn line');
    assert.equal(publisher.stats().connections, 1);
    await publisher.close();
    await peek.close();
    config.close();
    await vhost.close();
  });

  test('a message returned unroutable is kept and delivered once the binding is back', async (t) => {
    const vhost = await TestVhost.create('unroutable');
    cleanup(t, vhost);
    await vhost.writePipeline();
    await vhost.apply();
    const logger = new MemoryLogger();
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: join(vhost.dir, 'outbox.db'), config: LiveConfig.watch(vhost.configPath), logger });
    cleanup(t, publisher);
    assert.equal((await publisher.publish('first')).outcome, 'confirmed', 'the first publish on a reachable broker is confirmed');
    await unbind(vhost, 'notes', 'notes_queue');
    assert.equal((await publisher.publish('returned')).outcome, 'queued');
    assert.equal((await publisher.publish('behind')).outcome, 'queued', 'queued behind the outbox');
    await new Promise((r) => setTimeout(r, 1_500));
    assert.equal(logger.at('warn').length, 1);
    assert.match(logger.at('warn')[0]?.message ?? '', /routes routing key notes to no queue/);
    await vhost.apply();
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    await eventually('the kept messages', 5_000, async () => (await peek.depth('notes_queue')) === 3);
    assert.deepEqual(await bodiesIn(peek, 'notes_queue'), ['first', 'returned', 'behind']);
    await publisher.close();
    await peek.close();
    await vhost.close();
  });

  test('messages a full queue nacks are kept and resent on the short backoff once it has room (P-11)', async (t) => {
    const vhost = await TestVhost.create('nacked');
    cleanup(t, vhost);
    await vhost.writePipeline({ maxLength: 2, retryIntervalSeconds: 120 });
    await vhost.apply();
    const logger = new MemoryLogger();
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: join(vhost.dir, 'outbox.db'), config: LiveConfig.watch(vhost.configPath), logger });
    cleanup(t, publisher);
    // Quorum queues enforce max-length loosely: one or two past the limit may still get in.
    const bodies = ['m0', 'm1', 'm2', 'm3', 'm4', 'm5'];
    const outcomes: string[] = [];
    for (const body of bodies) outcomes.push((await publisher.publish(body)).outcome);
    const firstQueued = outcomes.indexOf('queued');
    assert.ok(firstQueued >= 2 && firstQueued <= 4, outcomes.join(','));
    assert.ok(outcomes.slice(firstQueued).every((o) => o === 'queued'), `the rest queue behind: ${outcomes.join(',')}`);
    assert.equal(logger.at('warn').length, 1);
    assert.match(logger.at('warn')[0]?.message ?? '', /nacked/);
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    // A consumer makes room; the kept messages come on the short probe backoff, not after
    // retry_interval_seconds (120 s).
    const received: string[] = [];
    await eventually('every message', 10_000, async () => {
      received.push(...(await bodiesIn(peek, 'notes_queue')));
      return received.length >= bodies.length;
    });
    assert.deepEqual(received, bodies, 'in publish order');
    assert.equal(publisher.outboxSize, 0);
    assert.equal(logger.at('warn').length, 1);
  });

  test('queued messages survive SIGKILL of the publishing process and are delivered by the next one', async (t) => {
    const vhost = await TestVhost.create('sigkill');
    cleanup(t, vhost);
    await vhost.writePipeline(); // not applied yet: every publish is queued
    const outboxPath = join(vhost.dir, 'outbox.db');
    const child = spawn(process.execPath, [join(here, 'fixtures/child-publisher.js'), vhost.uri, outboxPath, vhost.configPath, '20'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const outcomes: string[] = [];
    for await (const line of createInterface({ input: child.stdout })) {
      const event = JSON.parse(line) as { done?: boolean; outcome?: string };
      if (event.done === true) break;
      outcomes.push(event.outcome ?? '?');
    }
    assert.deepEqual(outcomes, Array<string>(20).fill('queued'));
    child.kill('SIGKILL');
    await once(child, 'exit');

    await vhost.apply();
    const logger = new MemoryLogger();
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath, config: LiveConfig.watch(vhost.configPath), logger });
    cleanup(t, publisher);
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    await eventually('the outbox of the killed process', 5_000, async () => (await peek.depth('notes_queue')) === 20);
    const ids = (await peek.drain('notes_queue')).map((m) => m.properties.messageId as string);
    assert.deepEqual(
      ids,
      Array.from({ length: 20 }, (_, i) => `kill-${i}`),
      'same ids, publish order',
    );
    assert.equal(publisher.outboxSize, 0);
    await publisher.close();
    await peek.close();
    await vhost.close();
  });

  test('retry_pending: false parks the outbox; switching it on in pipeline.json resends at once', async (t) => {
    const vhost = await TestVhost.create('flags');
    cleanup(t, vhost);
    await vhost.writePipeline({ retryPending: false });
    const config = LiveConfig.watch(vhost.configPath, { pollMs: 100 });
    const logger = new MemoryLogger();
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: join(vhost.dir, 'outbox.db'), config, logger });
    cleanup(t, publisher);
    assert.equal((await publisher.publish('p1')).outcome, 'queued'); // no pipeline yet
    assert.equal((await publisher.publish('p2')).outcome, 'queued');
    await vhost.apply();
    await new Promise((r) => setTimeout(r, 1_500));
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    assert.equal(await peek.depth('notes_queue'), 0, 'a parked outbox is not resent');
    assert.equal(publisher.outboxSize, 2);
    assert.equal((await publisher.publish('fresh')).outcome, 'confirmed', 'fresh messages overtake a parked outbox');
    assert.equal(publisher.outboxSize, 2);

    await vhost.writePipeline({ retryPending: true, retryIntervalSeconds: 7 });
    await eventually('the flags to reload', 2_000, () => config.features.retry_pending);
    assert.equal(config.features.retry_interval_seconds, 7);
    await eventually('the parked outbox to drain', 3_000, () => publisher.outboxSize === 0);
    await eventually('three messages', 2_000, async () => (await peek.depth('notes_queue')) === 3);
    assert.deepEqual(await bodiesIn(peek, 'notes_queue'), ['fresh', 'p1', 'p2']);
    await publisher.close();
    await peek.close();
    config.close();
    await vhost.close();
  });

  test('the outbox drains after a broker restart and after a resource alarm', async (t) => {
    // A node of this test's own: restarting the shared one would disturb the other tests.
    const name = `${BROKER_NAME}-restart`;
    const port = BROKER_PORT + 1;
    await ensureBroker(name, port);
    const vhost = await TestVhost.create('restart', port);
    cleanup(t, vhost);
    await vhost.writePipeline();
    await vhost.apply();
    const logger = new MemoryLogger();
    const publisher = await Publisher.start({ uri: vhost.uri, outboxPath: join(vhost.dir, 'outbox.db'), config: LiveConfig.watch(vhost.configPath), logger });
    cleanup(t, publisher);
    assert.equal((await publisher.publish('before')).outcome, 'confirmed');
    await brokerScript('stop', name, port);
    await eventually('the publisher to notice', 10_000, () => !publisher.connected);
    const queued = await Promise.all(['down-1', 'down-2', 'down-3'].map((b) => publisher.publish(b)));
    assert.deepEqual(
      queued.map((r) => r.outcome),
      ['queued', 'queued', 'queued'],
    );
    await ensureBroker(name, port);
    const peek = await Peek.open(vhost.uri);
    cleanup(t, peek);
    await eventually('the outbox to drain after the restart', 20_000, async () => (await peek.depth('notes_queue')) === 4);
    assert.deepEqual(await bodiesIn(peek, 'notes_queue'), ['before', 'down-1', 'down-2', 'down-3']);
    assert.equal(logger.at('warn').filter((l) => l.message.includes('lost its broker connection')).length, 1, 'one warn per outage');
    assert.equal(publisher.outboxSize, 0);

    // A memory alarm blocks publishers: queued at once, no reconnect, resent once it clears.
    const connections = publisher.stats().connections;
    await brokerScript('ctl', name, port, ['set_vm_memory_high_watermark', 'absolute', '1MB']);
    try {
      // The broker blocks a connection when it next publishes: this one waits for its confirm.
      const first = await publisher.publish('alarm-1');
      await eventually('connection.blocked', 10_000, () => logger.lines.some((l) => l.message.includes('blocks publishers')));
      const started = Date.now();
      assert.equal((await publisher.publish('alarm-2')).outcome, 'queued');
      assert.ok(Date.now() - started < 1_000, 'queued without waiting for a confirm timeout');
      assert.ok(['confirmed', 'queued'].includes(first.outcome));
    } finally {
      await brokerScript('ctl', name, port, ['set_vm_memory_high_watermark', '0.4']);
    }
    await eventually('the alarm messages', 20_000, async () => (await peek.depth('notes_queue')) >= 2);
    // alarm-1 may be there twice: its confirm did not come in time, so it was also queued (D-2).
    assert.deepEqual([...new Set(await bodiesIn(peek, 'notes_queue'))], ['alarm-1', 'alarm-2']);
    assert.equal(publisher.stats().connections, connections, 'a blocked connection is kept');
    await publisher.close();
    await peek.close();
    await vhost.close();
  });
});
