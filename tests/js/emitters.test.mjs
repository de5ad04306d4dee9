// Existing Node workers publish through Redis with the real `@socket.io/redis-emitter`,
// unchanged (SPEC §6): two real herald nodes on a redis-server of this file's own log each
// emit once, a socket.io-client on the other node receives it in order, and what is no
// session event is counted and described in the ingest errors stream.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { Emitter } from '@socket.io/redis-emitter';
import { Redis } from 'ioredis';
import {
  spawnHerald, stopAndAssertClean, connect, waitConnected, emitAck, waitForN, getJson, uniqueId,
  DEFAULT_TIMEOUT,
} from './helpers.mjs';

const REDIS_SERVER = process.env.HERALD_TEST_REDIS_SERVER || 'redis-server';

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function until(predicate, what, timeoutMs = DEFAULT_TIMEOUT) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let redisProc;
let redis;
let nodes = [];
const prefix = uniqueId('js-emit');

before(async () => {
  const port = await freePort();
  redisProc = spawn(REDIS_SERVER, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    { stdio: 'ignore' });
  const accepts = () => new Promise((resolve) => {
    const probe = net.connect(port, '127.0.0.1', () => { probe.destroy(); resolve(true); });
    probe.once('error', () => resolve(false));
  });
  await until(accepts, 'redis-server to start');
  redis = new Redis({ host: '127.0.0.1', port });
  const url = `redis://127.0.0.1:${port}`;
  nodes = await Promise.all([0, 1].map(() => spawnHerald(['--redis-url', url, '--redis-prefix', prefix])));
  // Once the lease is taken its holder has subscribed: emits from here on are heard.
  await until(async () => (await redis.get(`${prefix}:emitters:lease`)) !== null, 'a translator');
});

after(async () => {
  for (const node of nodes) await stopAndAssertClean(node);
  redis?.disconnect();
  redisProc?.kill('SIGKILL');
});

async function history(base, sessionId) {
  const { status, body } = await getJson(base, `/api/wizard/session/${sessionId}/events?after=0&limit=1000`);
  return status === 200 ? body.events : [];
}

function progress(step) {
  return { status: 'PROCESSING', progress: step * 20, currentStep: `page ${step}` };
}

test('redis-emitter emits are logged once and reach a socket.io-client on the other node', async () => {
  const [a, b] = nodes;
  const sessionId = uniqueId('job');
  const other = uniqueId('job');
  const watcher = connect(b.url, { transports: ['websocket'] });
  try {
    await waitConnected(watcher);
    for (const id of [sessionId, other]) {
      const ack = await emitAck(watcher, 'subscribe', { sessionId: id });
      assert.equal(ack.ok, true, JSON.stringify(ack));
    }
    const emitter = new Emitter(redis);
    for (let step = 1; step <= 4; step++) emitter.to(sessionId).emit('progress', progress(step));
    // To two rooms at once (published on the key's broadcast channel): one event in each.
    emitter.to(sessionId).to(other).emit('completed', { result: { pages: 4 } });
    const got = await waitForN(watcher, 'progress', 4, DEFAULT_TIMEOUT, (p) => p.sessionId === sessionId);
    assert.deepEqual(got.map((p) => p.seq), [1, 2, 3, 4]);
    assert.deepEqual(got.map((p) => p.progress), [20, 40, 60, 80]);
    const done = await waitForN(watcher, 'completed', 2);
    assert.deepEqual(done.map((p) => [p.sessionId, p.seq]).sort(), [[sessionId, 5], [other, 1]].sort());
    await until(async () => (await history(a.url, sessionId)).length === 5, 'the log on the first node');
    // A second translator would have logged everything twice by now (a bounded negative check).
    await new Promise((r) => setTimeout(r, 500));
    const logged = await history(a.url, sessionId);
    assert.deepEqual(logged.map((e) => [e.seq, e.event]),
      [[1, 'progress'], [2, 'progress'], [3, 'progress'], [4, 'progress'], [5, 'completed']]);
    assert.deepEqual(await history(b.url, sessionId), logged);
    assert.equal((await history(b.url, other)).length, 1);
  } finally {
    watcher.close();
  }
});

test('redis-emitter messages that are no session event are counted and described', async () => {
  const sessionId = uniqueId('odd');
  const errors = async () => (await redis.xrange(`${prefix}:ingest:errors`, '-', '+'))
    .map(([, fields]) => Object.fromEntries(fields.reduce((pairs, v, i) => {
      if (i % 2 === 0) pairs.push([v]); else pairs[pairs.length - 1].push(v);
      return pairs;
    }, [])));
  const before = (await errors()).length;
  const emitter = new Emitter(redis);
  emitter.emit('progress', progress(1)); // to every socket: names no session
  emitter.of('/chat').to(sessionId).emit('progress', progress(1));
  emitter.to(sessionId).emit('progress', progress(1), 'a second argument');
  emitter.to(sessionId).emit('bogus', { x: 1 }); // an emit, but of no session event
  await redis.publish(`socket.io#/#${sessionId}#`, Buffer.from([0xc1, 0x00])); // not msgpack
  await until(async () => (await errors()).length >= before + 5, 'five refusals');
  const described = (await errors()).slice(before);
  assert.ok(described.every((e) => e.entry.startsWith('pubsub:socket.io#')), JSON.stringify(described));
  assert.deepEqual(described.map((e) => e.code).sort(),
    ['INVALID_ENTRY', 'INVALID_ENTRY', 'INVALID_ENTRY', 'INVALID_ENTRY', 'INVALID_EVENT']);
  const reasons = described.map((e) => e.error).join(' | ');
  for (const words of ['no room', 'namespace', 'has 2', 'msgpack', 'bogus']) assert.ok(reasons.includes(words), reasons);
  let refused = 0;
  for (const node of nodes) {
    const text = await (await fetch(`${node.url}/metrics`)).text();
    refused += Number(/^herald_emitter_refused_total (\d+)$/m.exec(text)[1]);
  }
  assert.equal(refused, 5, 'counted once, by the one translator');
  assert.deepEqual(await history(nodes[0].url, sessionId), []);
});
