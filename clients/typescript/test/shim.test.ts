/** The conformance shim (conformance/SHIM.md) as the runner drives it: stdin commands, stdout events. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { before, test } from 'node:test';

import { REPO, TestVhost, cleanup, ensureBroker } from './support.js';

const SHIM = join(REPO, 'clients/typescript/dist/shim.js');

before(() => ensureBroker());

test('the shim publishes, consumes by script and stops gracefully', { skip: !existsSync(SHIM) && 'run npm run build first' }, async (t) => {
  const vhost = await TestVhost.create('shim');
  cleanup(t, vhost);
  await vhost.writePipeline({ maxAttempts: 3 });
  await vhost.apply();
  const shim = spawn(process.execPath, [SHIM], {
    cwd: REPO,
    env: {
      ...process.env,
      MSGPIPE_URI: vhost.uri,
      MSGPIPE_PIPELINE_CONFIG: vhost.configPath,
      MSGPIPE_SHIM_STATE_DIR: join(vhost.dir, 'state'),
      MSGPIPE_SHIM_FLAG_POLL_MS: '200',
    },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const exited = new Promise<number | null>((resolve) => shim.once('exit', (code) => resolve(code)));
  const stderr: string[] = [];
  shim.stderr.on('data', (chunk: Buffer) => stderr.push(chunk.toString()));
  const events: Array<Record<string, unknown>> = [];
  const waiters: Array<() => void> = [];
  createInterface({ input: shim.stdout }).on('line', (line) => {
    events.push(JSON.parse(line) as Record<string, unknown>);
    for (const w of waiters.splice(0)) w();
  });
  const next = async (predicate: (e: Record<string, unknown>) => boolean, timeoutMs = 10_000): Promise<Record<string, unknown>> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = events.find(predicate);
      if (found !== undefined) return found;
      if (Date.now() > deadline) throw new Error(`no such event; saw ${JSON.stringify(events)}; stderr ${stderr.join('')}`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 100);
      });
    }
  };
  const send = (command: unknown): void => {
    shim.stdin.write(`${JSON.stringify(command)}\n`);
  };

  await next((e) => e.event === 'ready');
  send({ op: 'consume', script: { m1: ['retry', 'ok'] }, default: ['permanent'] });
  await next((e) => e.event === 'consuming');
  send({ op: 'publish', id: 'm1', body: 'one', headers: { k: 'v' } });
  assert.deepEqual(await next((e) => e.event === 'published' && e.id === 'm1'), { event: 'published', id: 'm1', result: 'confirmed' });
  await next((e) => e.event === 'delivery' && e.id === 'm1' && e.attempt === 2);
  send({ op: 'publish', id: 'm2', body: 'two' });
  await next((e) => e.event === 'delivery' && e.id === 'm2');
  send({ op: 'bogus' });
  await next((e) => e.event === 'error');
  send({ op: 'stop' });
  await next((e) => e.event === 'stopped');
  assert.equal(await exited, 0);
  const deliveries = events.filter((e) => e.event === 'delivery').map((e) => [e.id, e.attempt, e.outcome]);
  assert.deepEqual(deliveries, [
    ['m1', 1, 'retry'],
    ['m1', 2, 'ok'],
    ['m2', 1, 'permanent'],
  ]);
  assert.ok(!stderr.join('').includes('guest:guest'), 'no credentials in the logs');
});
