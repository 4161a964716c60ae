#!/usr/bin/env node
/**
 * The conformance shim (conformance/SHIM.md, kit version 1): drives this client for the
 * conformance runner. Commands arrive on stdin and events leave on stdout, one JSON object per
 * line; the client's logs go to stderr, one line each, level first.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

import { Consumer } from './consumer.js';
import { PermanentError, RetryableError } from './consumer.js';
import { LiveConfig } from './live.js';
import type { LogFields, Logger } from './logger.js';
import { Publisher } from './publisher.js';

type Event = Record<string, unknown> & { event: string };

function emit(event: Event): void {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

function stderrLine(level: string, message: string, fields?: LogFields): void {
  const rest = fields === undefined ? '' : ` ${JSON.stringify(fields)}`;
  process.stderr.write(`${level.toUpperCase()} msgpipe: ${message}${rest}\n`);
}

const logger: Logger = {
  debug: (message, fields) => {
    if (process.env.MSGPIPE_LOG === 'debug') stderrLine('debug', message, fields);
  },
  info: (message, fields) => stderrLine('info', message, fields),
  warn: (message, fields) => stderrLine('warn', message, fields),
  error: (message, fields) => stderrLine('error', message, fields),
};

function env(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === '') throw new Error(`${name} is not set`);
  return value;
}

/** `ok`, `retry`, `permanent`, `throw`, `hang` or `sleep:MS`. */
type Outcome = string;

interface Command {
  op?: unknown;
  id?: unknown;
  body?: unknown;
  headers?: unknown;
  script?: unknown;
  default?: unknown;
}

class Shim {
  #config: LiveConfig | undefined;
  #publisher: Promise<Publisher> | undefined;
  #consumer: Consumer | undefined;
  #consuming: Promise<void> | undefined;

  get config(): LiveConfig {
    const pollMs = Number(process.env.MSGPIPE_SHIM_FLAG_POLL_MS ?? 5_000);
    this.#config ??= LiveConfig.watch(env('MSGPIPE_PIPELINE_CONFIG'), { pollMs: pollMs > 0 ? pollMs : 5_000, logger });
    return this.#config;
  }

  publisher(): Promise<Publisher> {
    this.#publisher ??= (async () => {
      const stateDir = env('MSGPIPE_SHIM_STATE_DIR');
      mkdirSync(stateDir, { recursive: true });
      return Publisher.start({ uri: env('MSGPIPE_URI'), outboxPath: join(stateDir, 'outbox.db'), config: this.config, logger });
    })();
    return this.#publisher;
  }

  async handle(command: Command): Promise<boolean> {
    switch (command.op) {
      case 'publish':
        await this.#publish(command);
        return true;
      case 'start_publisher': {
        const publisher = await this.publisher();
        emit({ event: 'publisher_started', outbox: publisher.outboxSize });
        return true;
      }
      case 'consume':
        await this.#consume(command);
        return true;
      case 'stop':
        await this.#stop();
        return false;
      default:
        emit({ event: 'error', message: `unknown op ${JSON.stringify(command.op)}` });
        return true;
    }
  }

  async #publish(command: Command): Promise<void> {
    const id = typeof command.id === 'string' ? command.id : undefined;
    try {
      const publisher = await this.publisher();
      const headers = typeof command.headers === 'object' && command.headers !== null ? (command.headers as Record<string, string>) : undefined;
      const body = typeof command.body === 'string' ? command.body : '';
      const result = await publisher.publish(body, { ...(id === undefined ? {} : { messageId: id }), ...(headers === undefined ? {} : { headers }) });
      emit({ event: 'published', id: id ?? result.messageId, result: result.outcome });
    } catch (error) {
      emit({ event: 'published', id: id ?? null, result: 'error', error: (error as Error).message });
    }
  }

  async #consume(command: Command): Promise<void> {
    if (this.#consumer !== undefined) {
      emit({ event: 'error', message: 'already consuming' });
      return;
    }
    const script = (typeof command.script === 'object' && command.script !== null ? command.script : {}) as Record<string, Outcome[]>;
    const fallback = Array.isArray(command.default) ? (command.default as Outcome[]) : ['ok'];
    const consumer = new Consumer({ uri: env('MSGPIPE_URI'), config: this.config, logger });
    this.#consumer = consumer;
    this.#consuming = consumer.run(async (message) => {
      const id = message.messageId;
      const plan = (id !== undefined ? script[id] : undefined) ?? fallback;
      const outcome: Outcome = plan[Math.min(message.attempt, plan.length) - 1] ?? 'ok';
      emit({ event: 'delivery', id: id ?? null, attempt: message.attempt, redelivered: message.redelivered, outcome });
      if (outcome === 'ok') return;
      if (outcome === 'retry') throw new RetryableError('scripted retry');
      if (outcome === 'permanent') throw new PermanentError('scripted permanent');
      if (outcome === 'throw') throw new Error('scripted throw');
      if (outcome === 'hang') return new Promise<void>(() => undefined);
      const ms = Number(outcome.slice('sleep:'.length));
      await new Promise((resolve) => setTimeout(resolve, Number.isFinite(ms) ? ms : 0));
    });
    await consumer.whenConsuming();
    emit({ event: 'consuming' });
  }

  async #stop(): Promise<void> {
    await this.#consumer?.stop();
    await this.#consuming;
    if (this.#publisher !== undefined) await (await this.#publisher).close();
    this.#config?.close();
    emit({ event: 'stopped' });
  }
}

async function main(): Promise<void> {
  const shim = new Shim();
  emit({ event: 'ready' });
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (line.trim() === '') continue;
    let command: Command;
    try {
      command = JSON.parse(line) as Command;
    } catch {
      emit({ event: 'error', message: `not JSON: ${line}` });
      continue;
    }
    try {
      if (!(await shim.handle(command))) break;
    } catch (error) {
      emit({ event: 'error', message: (error as Error).message });
    }
  }
  lines.close();
  process.exit(0);
}

await main();
