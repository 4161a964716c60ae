/**
 * Test setup against a real RabbitMQ node (scripts/test-broker.sh, RabbitMQ 4.3 by default):
 * one vhost per test, the topology provisioned by the real `msgpipe apply`, `pipeline.json`
 * from the real `msgpipe render`.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import amqp from 'amqplib';

import type { LogFields, Logger } from '../src/logger.js';

const run = promisify(execFile);

/** The repository root (this file runs from clients/typescript/build/test). */
export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..');
export const BROKER_NAME = process.env.MSGPIPE_TS_BROKER_NAME ?? 'msgpipe-typescript';
export const BROKER_PORT = Number(process.env.MSGPIPE_TS_BROKER_PORT ?? 5703);
export const MSGPIPE_BIN = process.env.MSGPIPE_BIN ?? join(REPO, 'target/debug/msgpipe');

let ensured: Promise<void> | undefined;

/** Starts (or finds running) a test broker node. */
export async function ensureBroker(name = BROKER_NAME, port = BROKER_PORT): Promise<void> {
  const start = async (): Promise<void> => {
    await run(join(REPO, 'scripts/test-broker.sh'), ['ensure', name, String(port)], { timeout: 300_000 });
  };
  if (name !== BROKER_NAME || port !== BROKER_PORT) return start();
  ensured ??= start();
  return ensured;
}

export async function brokerScript(command: string, name: string, port: number, args: string[] = []): Promise<void> {
  await run(join(REPO, 'scripts/test-broker.sh'), [command, name, String(port), ...args], { timeout: 300_000 });
}

/** A management API call; returns the parsed body (or undefined). */
export async function mgmt(method: string, path: string, body?: unknown, port = BROKER_PORT): Promise<unknown> {
  const response = await fetch(`http://127.0.0.1:${port + 10_000}/api${path}`, {
    method,
    headers: {
      authorization: `Basic ${Buffer.from('guest:guest').toString('base64')}`,
      'content-type': 'application/json',
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok && response.status !== 404) {
    throw new Error(`${method} ${path} -> ${response.status}: ${await response.text()}`);
  }
  const text = await response.text();
  return text === '' ? undefined : JSON.parse(text);
}

export interface PipelineSpec {
  maxAttempts?: number;
  initialDelay?: string;
  maxDelay?: string;
  queueType?: 'quorum' | 'classic';
  retryPending?: boolean;
  retryIntervalSeconds?: number;
  /** Work queue max length (the operator sets `overflow: reject-publish`: a full queue nacks). */
  maxLength?: number;
}

/** A vhost for one test, deleted by `close()`, with a pipeline manifest for it. */
export class TestVhost {
  readonly name: string;
  readonly dir: string;
  readonly port: number;

  private constructor(name: string, port: number) {
    this.name = name;
    this.port = port;
    this.dir = mkdtempSync(join(tmpdir(), `msgpipe-ts-${name}-`));
  }

  static async create(prefix: string, port = BROKER_PORT): Promise<TestVhost> {
    const name = `ts-${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    const vhost = new TestVhost(name, port);
    const path = `/vhosts/${encodeURIComponent(name)}`;
    await mgmt('DELETE', path, undefined, port);
    await mgmt('PUT', path, undefined, port);
    await mgmt('PUT', `/permissions/${encodeURIComponent(name)}/guest`, { configure: '.*', write: '.*', read: '.*' }, port);
    return vhost;
  }

  get uri(): string {
    return `amqp://guest:guest@127.0.0.1:${this.port}/${encodeURIComponent(this.name)}`;
  }

  get manifest(): string {
    return join(this.dir, 'pipeline.yaml');
  }

  get configPath(): string {
    return join(this.dir, 'pipeline.json');
  }

  /** Writes the manifest and the `pipeline.json` `msgpipe render` makes of it (no broker needed). */
  async writePipeline(spec: PipelineSpec = {}): Promise<void> {
    const yaml = `apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {name: notes, namespace: ts-test}
spec:
  broker: {secretRef: {name: rabbitmq}, vhost: "${this.name}"}
  queue: {name: notes_queue, type: ${spec.queueType ?? 'quorum'}, exchange: notes, routingKey: notes${spec.maxLength === undefined ? '' : `, maxLength: ${spec.maxLength}`}}
  retry: {maxAttempts: ${spec.maxAttempts ?? 3}, backoff: {initialDelay: ${spec.initialDelay ?? '200ms'}, multiplier: 2, maxDelay: ${spec.maxDelay ?? '1s'}}}
  deadLetter: {exchange: notes_dlx, queue: notes_dlq}
  alerts: {enabled: false}
  clientFlags: {retryPending: ${spec.retryPending ?? true}, retryIntervalSeconds: ${spec.retryIntervalSeconds ?? 1}}
`;
    writeFileSync(this.manifest, yaml);
    const { stdout } = await run(MSGPIPE_BIN, ['render', '-f', this.manifest, '-o', 'json']);
    const objects = JSON.parse(stdout) as Array<{ kind?: string; data?: Record<string, string> }>;
    const text = objects.find((o) => o.kind === 'ConfigMap')?.data?.['pipeline.json'];
    if (text === undefined) throw new Error('msgpipe render printed no pipeline.json');
    writeFileSync(this.configPath, text);
  }

  /** `msgpipe apply` of the manifest against this vhost. */
  async apply(): Promise<void> {
    await run(MSGPIPE_BIN, ['apply', '-f', this.manifest, '--management-uri', `http://127.0.0.1:${this.port + 10_000}`], {
      env: { ...process.env, MSGPIPE_BROKER_URI: this.uri },
      timeout: 60_000,
    });
  }

  path(kind: string, object: string): string {
    return `/${kind}/${encodeURIComponent(this.name)}/${encodeURIComponent(object)}`;
  }

  async close(): Promise<void> {
    await mgmt('DELETE', `/vhosts/${encodeURIComponent(this.name)}`, undefined, this.port).catch(() => undefined);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A plain amqplib connection for looking at queues. */
export class Peek {
  private constructor(
    private readonly model: amqp.ChannelModel,
    private readonly channel: amqp.Channel,
  ) {}

  static async open(uri: string): Promise<Peek> {
    const model = await amqp.connect(uri);
    model.on('error', () => undefined);
    const channel = await model.createChannel();
    return new Peek(model, channel);
  }

  /** Messages ready in a queue (passive declare: exact, unlike the management API's lagging counts). */
  async depth(queue: string): Promise<number> {
    const ok = await this.channel.checkQueue(queue);
    return ok.messageCount;
  }

  /** Takes every ready message of a queue (acked). */
  async drain(queue: string): Promise<amqp.GetMessage[]> {
    const out: amqp.GetMessage[] = [];
    for (;;) {
      const message = await this.channel.get(queue, { noAck: true });
      if (message === false) return out;
      out.push(message);
    }
  }

  async close(): Promise<void> {
    await this.model.close().catch(() => undefined);
  }
}

/** Polls `check` until it returns a value other than undefined/false, or fails after `timeoutMs`. */
export async function eventually<T>(what: string, timeoutMs: number, check: () => Promise<T | undefined | false> | T | undefined | false): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last === undefined ? '' : `: ${String(last)}`}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface LogLine {
  level: 'debug' | 'info' | 'warn' | 'error';
  message: string;
  fields: LogFields | undefined;
  at: number;
}

/** A logger that keeps every line (and echoes warn/error when MSGPIPE_TEST_LOG is set). */
export class MemoryLogger implements Logger {
  readonly lines: LogLine[] = [];

  #add(level: LogLine['level'], message: string, fields?: LogFields): void {
    this.lines.push({ level, message, fields, at: Date.now() });
    if (process.env.MSGPIPE_TEST_LOG !== undefined) console.error(`[${level}] ${message} ${JSON.stringify(fields ?? {})}`);
  }

  debug(message: string, fields?: LogFields): void {
    this.#add('debug', message, fields);
  }
  info(message: string, fields?: LogFields): void {
    this.#add('info', message, fields);
  }
  warn(message: string, fields?: LogFields): void {
    this.#add('warn', message, fields);
  }
  error(message: string, fields?: LogFields): void {
    this.#add('error', message, fields);
  }

  at(level: LogLine['level']): LogLine[] {
    return this.lines.filter((l) => l.level === level);
  }
}

export function cleanupDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

/** Removes every binding from `exchange` to `queue` (msgpipe's carry a marker argument). */
export async function unbind(vhost: TestVhost, exchange: string, queue: string): Promise<void> {
  const v = encodeURIComponent(vhost.name);
  const path = `/bindings/${v}/e/${encodeURIComponent(exchange)}/q/${encodeURIComponent(queue)}`;
  const bindings = (await mgmt('GET', path, undefined, vhost.port)) as Array<{ properties_key: string }>;
  for (const b of bindings) await mgmt('DELETE', `${path}/${encodeURIComponent(b.properties_key)}`, undefined, vhost.port);
}

/** Closes things when a test ends, whether it passed or not. */
export function cleanup(t: { after(fn: () => unknown): void }, ...closers: Array<{ close(): unknown }>): void {
  t.after(async () => {
    for (const c of closers) await c.close();
  });
}
