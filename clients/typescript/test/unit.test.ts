/** Pure parts, no broker: pipeline.json, the decision table, headers, ids, redaction, the outbox file. */
import assert from 'node:assert/strict';
import { mkdtempSync, renameSync, rmSync, symlinkSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';

import { inspect } from 'node:util';

import { ConfigError, Consumer, Headers, LiveConfig, Publisher, type PipelineConfig, parsePipelineConfig, redactUri, retryCount, silentLogger, tierForAttempt, uuidv7 } from '../src/index.js';
import { Backoff, SHORT_BACKOFF } from '../src/backoff.js';
import { Outbox, OutboxFullError } from '../src/outbox.js';
import { copyOptions, destinationFor, failureHeaders, truncateUtf8 } from '../src/retry.js';

function notes(overrides: Partial<PipelineConfig> = {}): Record<string, unknown> {
  return {
    version: 1,
    pipeline: 'notes-app/notes',
    vhost: '/',
    exchange: 'notes',
    routing_key: 'notes',
    queue: 'notes_queue',
    max_attempts: 5,
    retry: {
      exchange: 'notes_queue.retry',
      tiers: [1, 2, 3, 4].map((i) => ({
        index: i,
        routing_key: String(i),
        queue: `notes_queue.retry.${i}`,
        delay_ms: 1000 * 2 ** (i - 1),
        first_attempt: i,
        last_attempt: i,
      })),
    },
    dead_letter: { exchange: 'notes_dlq_exchange', queue: 'notes_queue_dlq' },
    features: { retry_pending: true, retry_interval_seconds: 120 },
    ...overrides,
  };
}

const config = (overrides: Partial<PipelineConfig> = {}): PipelineConfig => parsePipelineConfig(JSON.stringify(notes(overrides)));

describe('pipeline.json', () => {
  test('parses the contract and ignores unknown fields (J-3)', () => {
    const parsed = parsePipelineConfig(JSON.stringify({ ...notes(), added_later: { x: 1 } }));
    assert.equal(parsed.queue, 'notes_queue');
    assert.equal(parsed.retry.tiers.length, 4);
    assert.equal('added_later' in parsed, false);
  });

  test('refuses another version, a missing field or a wrong type, naming the file (J-2)', () => {
    const bad: Array<[unknown, RegExp]> = [
      [{ ...notes(), version: 2 }, /contract version 2/],
      [{ ...notes(), queue: undefined }, /queue must be a string/],
      [{ ...notes(), max_attempts: '5' }, /max_attempts must be an integer/],
      [{ ...notes(), features: { retry_pending: 'yes', retry_interval_seconds: 1 } }, /features\.retry_pending must be a boolean/],
      [{ ...notes(), retry: { exchange: 'x', tiers: [{ index: 1 }] } }, /retry\.tiers\[0\]\.routing_key/],
    ];
    for (const [doc, message] of bad) {
      assert.throws(
        () => parsePipelineConfig(JSON.stringify(doc), '/etc/msgpipe/pipeline.json'),
        (error: unknown) => error instanceof ConfigError && message.test(error.message) && error.message.includes('/etc/msgpipe/pipeline.json'),
      );
    }
    assert.throws(() => parsePipelineConfig('{ not json', 'x.json'), ConfigError);
  });

  test('a failure at attempt k uses the tier that covers k; capped attempts share the last tier (J-4)', () => {
    const c = config();
    assert.equal(tierForAttempt(c, 1)?.index, 1);
    assert.equal(tierForAttempt(c, 4)?.index, 4);
    assert.equal(tierForAttempt(c, 5), undefined);
    const handWritten = config({ max_attempts: 8 });
    assert.equal(tierForAttempt(handWritten, 7)?.index, 4, 'no tier names 7: the last one');
    assert.equal(tierForAttempt(config({ max_attempts: 3, retry: { exchange: 'r', tiers: [] } }), 1), undefined);
  });

  test('LiveConfig sees a kubelet-style symlink swap and keeps the last good file (J-5)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'msgpipe-live-'));
    const write = (generation: number, text: string): void => {
      const target = join(dir, `..gen_${generation}`);
      mkdirSync(target);
      writeFileSync(join(target, 'pipeline.json'), text);
      symlinkSync(target, join(dir, '..data_tmp'));
      renameSync(join(dir, '..data_tmp'), join(dir, '..data'));
    };
    write(1, JSON.stringify(notes()));
    symlinkSync('..data/pipeline.json', join(dir, 'pipeline.json'));
    const live = LiveConfig.watch(join(dir, 'pipeline.json'), { pollMs: 20, logger: silentLogger });
    const keepAlive = setInterval(() => undefined, 1_000); // the poll timer alone does not hold the process
    assert.equal(live.features.retry_pending, true);
    const changes = live.featureChanges();
    write(2, JSON.stringify(notes({ features: { retry_pending: false, retry_interval_seconds: 7 } })));
    const next = await changes.next();
    assert.deepEqual(next.value, { retry_pending: false, retry_interval_seconds: 7 });
    write(3, '{ not json');
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(live.features.retry_pending, false, 'last good config kept');
    assert.equal(live.features.retry_interval_seconds, 7);
    await changes.return();
    clearInterval(keepAlive);
    live.close();
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('retry protocol', () => {
  test('x-retry-count reads every integer form; absent, negative or garbage is 0 (H-2)', () => {
    assert.equal(retryCount(undefined), 0);
    assert.equal(retryCount({}), 0);
    for (const value of [3, ' 3 ', '3', { '!': 'long', value: 3 }, 3n]) {
      assert.equal(retryCount({ [Headers.RETRY_COUNT]: value }), 3, String(value));
    }
    for (const value of [-4, 'x', 1.5, true, null, Buffer.from('3')]) {
      assert.equal(retryCount({ [Headers.RETRY_COUNT]: value }), 0, String(value));
    }
    assert.equal(retryCount({ [Headers.RETRY_COUNT]: 2 ** 60 }), 0xffff_ffff);
  });

  test('the decision table: tier k before the last attempt, DLQ after it, DLQ at once when permanent', () => {
    const c = config();
    assert.deepEqual(destinationFor(c, 2, 'retryable'), { kind: 'retry', exchange: 'notes_queue.retry', routingKey: '2', tier: 2, delayMs: 2000 });
    assert.deepEqual(destinationFor(c, 5, 'retryable'), { kind: 'dead-letter', exchange: 'notes_dlq_exchange', reason: 'max-attempts' });
    assert.deepEqual(destinationFor(c, 1, 'permanent'), { kind: 'dead-letter', exchange: 'notes_dlq_exchange', reason: 'permanent' });
    assert.deepEqual(destinationFor(config({ max_attempts: 1 }), 1, 'retryable').kind, 'dead-letter');
  });

  test('copy headers: first values kept, counts as int64, reason and attempts only on dead letters (§2, H-4)', () => {
    const failure = { attempt: 2, error: 'db timeout', at: '2026-12-06T09:30:00.000Z', deliveryExchange: '', deliveryRoutingKey: 'notes_queue' };
    const existing = {
      [Headers.FIRST_FAILURE]: '2026-12-06T09:29:59.000Z',
      [Headers.ORIGINAL_EXCHANGE]: 'notes',
      [Headers.ORIGINAL_ROUTING_KEY]: 'notes',
      [Headers.RETRY_COUNT]: 1,
      'x-app': 'kept',
    };
    const retried = failureHeaders(existing, failure, destinationFor(config(), 2, 'retryable'));
    assert.deepEqual(retried, {
      ...existing,
      [Headers.LAST_FAILURE]: failure.at,
      [Headers.ERROR]: 'db timeout',
      [Headers.RETRY_COUNT]: { '!': 'long', value: 2 },
    });
    const dead = failureHeaders(existing, { ...failure, attempt: 5 }, destinationFor(config(), 5, 'retryable'));
    assert.deepEqual(dead[Headers.RETRY_COUNT], { '!': 'long', value: 4 });
    assert.deepEqual(dead[Headers.ATTEMPTS], { '!': 'long', value: 5 });
    assert.equal(dead[Headers.REASON], 'max-attempts');
    const first = failureHeaders(undefined, { ...failure, deliveryExchange: 'notes', deliveryRoutingKey: 'notes' }, destinationFor(config(), 1, 'permanent'));
    assert.equal(first[Headers.FIRST_FAILURE], failure.at);
    assert.equal(first[Headers.ORIGINAL_EXCHANGE], 'notes');
  });

  test('error texts are cut to 4096 bytes at a character boundary (H-1)', () => {
    const text = 'é'.repeat(3000); // 6000 bytes
    const cut = truncateUtf8(text, 4096);
    assert.equal(Buffer.byteLength(cut), 4096);
    const odd = truncateUtf8(`x${text}`, 4096);
    assert.equal(Buffer.byteLength(odd), 4095);
    assert.ok(!odd.includes('\uFFFD'));
    assert.equal(truncateUtf8('short', 4096), 'short');
  });

  test('a copy keeps every property, is persistent, moves expiration to a header and keeps or gets an id (H-3, H-5)', () => {
    const props = {
      contentType: 'application/json',
      contentEncoding: undefined,
      headers: {},
      deliveryMode: 1,
      priority: 3,
      correlationId: 'c-1',
      replyTo: undefined,
      expiration: '60000',
      messageId: 'm-1',
      timestamp: 1_700_000_000,
      type: 'note',
      userId: undefined,
      appId: 'notes',
      clusterId: undefined,
    };
    const copy = copyOptions(props, { a: 1 });
    assert.equal(copy.deliveryMode, 2);
    assert.equal(copy.expiration, undefined);
    assert.equal(copy.headers[Headers.ORIGINAL_EXPIRATION], '60000');
    assert.equal(copy.messageId, 'm-1');
    assert.equal(copy.contentType, 'application/json');
    assert.equal(copy.correlationId, 'c-1');
    assert.equal(copy.priority, 3);
    assert.equal(copy.timestamp, 1_700_000_000);
    assert.equal(copy.type, 'note');
    assert.equal(copy.appId, 'notes');
    const fresh = copyOptions({ ...props, messageId: undefined, expiration: undefined }, {});
    assert.match(fresh.messageId, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(fresh.headers[Headers.ORIGINAL_EXPIRATION], undefined);
  });
});

describe('backoff', () => {
  test('doubles to the cap with ±20 % jitter; route probes never wait longer than their step', () => {
    const steps = [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000];
    for (let run = 0; run < 200; run += 1) {
      const both = new Backoff(SHORT_BACKOFF);
      const down = new Backoff(SHORT_BACKOFF, 'down');
      for (const step of steps) {
        const b = both.nextWait();
        const d = down.nextWait();
        assert.ok(b >= step * 0.8 && b <= step * 1.2, `${b} for ${step}`);
        assert.ok(d >= step * 0.8 && d <= step, `${d} for ${step}`);
      }
      both.reset();
      assert.ok(both.nextWait() <= 600);
    }
  });
});

describe('ids and logs', () => {
  test('UUID v7: version and variant bits, increasing within a millisecond and across', () => {
    const ids = Array.from({ length: 5000 }, () => uuidv7());
    for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual([...ids].sort(), ids, 'sorted by creation');
    assert.equal(new Set(ids).size, ids.length);
    const ms = parseInt(uuidv7(Date.UTC(2030, 0, 1)).replace(/-/g, '').slice(0, 12), 16);
    assert.ok(ms >= Date.UTC(2030, 0, 1));
  });

  test('URIs lose their password whatever its length, and nothing else (L-1)', () => {
    for (const [uri, shown] of [
      ['amqp://u:p@h:5672/%2f', 'amqp://u:***@h:5672/%2f'],
      ['amqps://notes:s3cr3t-Pa55word-0123456789@rabbitmq/v', 'amqps://notes:***@rabbitmq/v'],
      ['amqp://user@h/v', 'amqp://user@h/v'],
      ['cannot connect to amqp://a:b@h: refused', 'cannot connect to amqp://a:***@h: refused'],
    ] as const) {
      assert.equal(redactUri(uri), shown);
    }
  });
});

describe('offline', () => {
  test('a publisher with no broker starts offline and queues; no output shows the password (P-3, L-1)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'msgpipe-offline-'));
    const lines: string[] = [];
    const keep = (message: string, fields?: object): void => {
      lines.push(`${message} ${JSON.stringify(fields ?? {})}`);
    };
    const logger = { debug: keep, info: keep, warn: keep, error: keep };
    // Port 9 (discard): nothing listens.
    const uri = 'amqp://notes:s3cr3t-Pa55word@127.0.0.1:9/%2f';
    const publisher = await Publisher.start({ uri, config: config(), outboxPath: join(dir, 'outbox.db'), logger, connectTimeoutMs: 500 });
    const result = await publisher.publish('kept');
    assert.equal(result.outcome, 'queued');
    assert.equal(publisher.outboxSize, 1);
    const consumer = new Consumer({ uri, config: config(), logger });
    for (const shown of [inspect(publisher, { showHidden: true, depth: 9 }), inspect(consumer, { showHidden: true, depth: 9 }), ...lines]) {
      assert.ok(!shown.includes('s3cr3t'), shown);
    }
    assert.ok(lines.some((l) => l.includes('publisher starts offline')));
    await publisher.close();
    await consumer.stop();
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('flags', () => {
  test('retry_interval_seconds is read live: a longer interval slows the resend rounds without a restart (F-2)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'msgpipe-interval-'));
    const path = join(dir, 'pipeline.json');
    writeFileSync(path, JSON.stringify(notes({ features: { retry_pending: true, retry_interval_seconds: 1 } })));
    const live = LiveConfig.watch(path, { pollMs: 50, logger: silentLogger });
    const publisher = await Publisher.start({
      uri: 'amqp://guest:guest@127.0.0.1:9/%2f', // nothing listens: every round finds the broker unreachable
      config: live,
      outboxPath: join(dir, 'outbox.db'),
      logger: silentLogger,
      connectTimeoutMs: 200,
    });
    assert.equal((await publisher.publish('waiting')).outcome, 'queued');
    await new Promise((r) => setTimeout(r, 3_300));
    const fast = publisher.stats().resendRounds;
    assert.ok(fast >= 2 && fast <= 4, `rounds at a 1 s interval in 3.3 s: ${fast}`);
    writeFileSync(path, JSON.stringify(notes({ features: { retry_pending: true, retry_interval_seconds: 60 } })));
    await new Promise((r) => setTimeout(r, 1_100)); // the reload, and a round of the old plan
    const before = publisher.stats().resendRounds;
    await new Promise((r) => setTimeout(r, 2_500));
    assert.equal(publisher.stats().resendRounds, before, 'no round at the old 1 s pace');
    assert.equal(publisher.outboxSize, 1);
    await publisher.close();
    live.close();
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('outbox', () => {
  test('keeps publish order across reopen, removes by position, refuses past its limits, and locks its file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'msgpipe-outbox-'));
    const path = join(dir, 'outbox.db');
    const outbox = Outbox.open(path, { maxMessages: 3, maxBytes: 1 << 20 });
    const entry = (i: number) => ({
      exchange: 'notes',
      routingKey: 'notes',
      options: { messageId: `m${i}`, headers: { bin: Buffer.from([0, 1, 2]), n: { '!': 'long', value: i } } },
      body: Buffer.from(`body ${i}`),
    });
    const seqs = await Promise.all([0, 1, 2].map((i) => outbox.append(entry(i))));
    assert.deepEqual([...seqs].sort((a, b) => a - b), seqs);
    await assert.rejects(outbox.append(entry(3)), OutboxFullError);
    assert.throws(() => Outbox.open(path), /in use by another process/);
    outbox.remove([seqs[0] ?? 0]);
    outbox.close();
    const again = Outbox.open(path);
    assert.equal(again.size, 2);
    const rows = again.oldest(0, 10);
    assert.deepEqual(
      rows.map((r) => r.options.messageId),
      ['m1', 'm2'],
    );
    const headers = (rows[0]?.options.headers ?? {}) as Record<string, unknown>;
    assert.deepEqual(headers.bin, Buffer.from([0, 1, 2]));
    assert.deepEqual(headers.n, { '!': 'long', value: 1 });
    assert.equal(rows[1]?.body.toString(), 'body 2');
    again.close();
    rmSync(dir, { recursive: true, force: true });
  });
});
