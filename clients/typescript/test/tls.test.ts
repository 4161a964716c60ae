/** amqps with a private CA: trusted through `caFile`, refused without it. A node of its own with a TLS listener. */
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { Consumer, LiveConfig, Publisher } from '../src/index.js';
import { BROKER_NAME, BROKER_PORT, MemoryLogger, REPO, TestVhost, cleanup, eventually } from './support.js';

const run = promisify(execFile);
const NAME = `${BROKER_NAME}-tls`;
const PORT = BROKER_PORT + 43; // 5746; its TLS listener on PORT + 1
const TLS_PORT = PORT + 1;
const CERTS = join(process.env.MSGPIPE_TEST_BROKER_DIR ?? '/tmp', NAME, 'certs');

function makeCertificates(): void {
  mkdirSync(CERTS, { recursive: true });
  const openssl = (args: string): void => {
    execFileSync('openssl', args.split(' '), { cwd: CERTS, stdio: 'ignore' });
  };
  openssl(
    'req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt -subj /CN=msgpipe-ts-test-CA -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign',
  );
  openssl('req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost');
  writeFileSync(
    join(CERTS, 'server.ext'),
    'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n',
  );
  openssl('x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile server.ext -out server.crt');
}

async function node(command: string): Promise<void> {
  const conf = [
    `listeners.ssl.default = 127.0.0.1:${TLS_PORT}`,
    `ssl_options.cacertfile = ${join(CERTS, 'ca.crt')}`,
    `ssl_options.certfile = ${join(CERTS, 'server.crt')}`,
    `ssl_options.keyfile = ${join(CERTS, 'server.key')}`,
    'ssl_options.verify = verify_none',
    'ssl_options.fail_if_no_peer_cert = false',
  ].join('\n');
  await run(join(REPO, 'scripts/test-broker.sh'), [command, NAME, String(PORT)], {
    env: { ...process.env, MSGPIPE_TEST_BROKER_EXTRA_CONF: conf },
    timeout: 300_000,
  });
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

test('amqps: confirmed with the CA file, offline and queued without it', async (t) => {
  if (!existsSync(join(CERTS, 'server.crt'))) {
    await node('stop');
    makeCertificates();
  }
  await node('ensure');
  if (!(await listening(TLS_PORT))) {
    // A node started before the certificates existed: restart it with its TLS listener.
    await node('stop');
    await node('ensure');
  }
  assert.ok(await listening(TLS_PORT), `a TLS listener on ${TLS_PORT}`);
  const vhost = await TestVhost.create('tls', PORT);
  cleanup(t, vhost);
  await vhost.writePipeline();
  await vhost.apply();
  const uri = `amqps://guest:guest@localhost:${TLS_PORT}/${encodeURIComponent(vhost.name)}`;
  const config = LiveConfig.watch(vhost.configPath);
  cleanup(t, config);

  const trusted = await Publisher.start({ uri, config, outboxPath: join(vhost.dir, 'a.db'), caFile: join(CERTS, 'ca.crt'), logger: new MemoryLogger() });
  cleanup(t, trusted);
  assert.equal((await trusted.publish('over tls')).outcome, 'confirmed');

  const logger = new MemoryLogger();
  const untrusted = await Publisher.start({ uri, config, outboxPath: join(vhost.dir, 'b.db'), logger, connectTimeoutMs: 2_000 });
  cleanup(t, untrusted);
  assert.equal(untrusted.connected, false);
  assert.equal((await untrusted.publish('kept')).outcome, 'queued');
  assert.match(JSON.stringify(logger.lines), /certificate/i);
  assert.ok(!JSON.stringify(logger.lines).includes('guest:guest'));

  const bodies: string[] = [];
  const consumer = new Consumer({ uri, config, caFile: join(CERTS, 'ca.crt'), logger: new MemoryLogger() });
  cleanup(t, { close: () => consumer.stop() });
  void consumer.run((message) => {
    bodies.push(message.text());
  });
  await eventually('the message over tls', 10_000, () => bodies.includes('over tls'));
});
