// Graceful shutdown with real clients still connected: SIGTERM → exit code 0, promptly,
// and every connected client (websocket and a pending long-poll) is told it is disconnected.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, connect, waitFor, postOk, uniqueId, sampleData, closeAll, safeJson,
} from './helpers.mjs';

test('SIGTERM with connected websocket and polling clients exits 0 and disconnects them', async () => {
  const server = await spawnHerald();
  const sessionId = uniqueId('shutdown');
  const ws = connect(server.url, { transports: ['websocket'] });
  const poll = connect(server.url, { transports: ['polling'] });
  try {
    for (const s of [ws, poll]) {
      s.emit('subscribe', sessionId);
      await waitFor(s, 'subscribed');
    }
    await postOk(server.url, sessionId, { event: 'progress', data: sampleData('progress') });
    await Promise.all([waitFor(ws, 'progress'), waitFor(poll, 'progress')]);

    const started = Date.now();
    const disconnected = Promise.all([waitFor(ws, 'disconnect', 10000), waitFor(poll, 'disconnect', 10000)]);
    const { code, signal } = await server.stop({ stopTimeoutMs: 10000 });
    const tookMs = Date.now() - started;
    assert.equal(signal, null, `killed by ${signal}\n${server.stderr().slice(-3000)}`);
    assert.equal(code, 0, `exit code after SIGTERM\n${server.stderr().slice(-3000)}`);
    const reasons = await disconnected;
    assert.ok(reasons.every((r) => typeof r === 'string'), safeJson(reasons));
    assert.ok(tookMs < 10000, `shutdown took ${tookMs} ms`);

    // the port no longer accepts requests
    await assert.rejects(fetch(`${server.url}/healthz`), 'server must be gone after exit');
  } finally {
    closeAll(ws, poll);
    if (server.proc.exitCode === null) server.proc.kill('SIGKILL');
  }
});

test('SIGINT also exits 0', async () => {
  const server = await spawnHerald();
  const s = connect(server.url, { transports: ['websocket'] });
  try {
    await waitFor(s, 'connected');
    const { code, signal } = await server.stop({ signal: 'SIGINT' });
    assert.equal(signal, null);
    assert.equal(code, 0, server.stderr().slice(-3000));
  } finally {
    closeAll(s);
  }
});

test('clients of a node shut down come back by themselves when it is up again, and resume', async () => {
  const first = await spawnHerald();
  const sessionId = uniqueId('restart');
  const options = { reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 500, autoConnect: false };
  const clients = [
    connect(first.url, { ...options, transports: ['websocket'] }),
    connect(first.url, { ...options, transports: ['polling'] }),
  ];
  let second;
  try {
    for (const s of clients) {
      // As an unchanged front end does: (re)subscribe from its last seq on every connect.
      let lastSeq = 0;
      s.on('progress', (e) => { lastSeq = e.seq; });
      s.on('connect', () => s.emit('subscribe', { sessionId, lastSeq }));
      s.connect();
      await waitFor(s, 'subscribed');
    }
    await postOk(first.url, sessionId, { event: 'progress', data: sampleData('progress') });
    await Promise.all(clients.map((s) => waitFor(s, 'progress')));
    const reasons = Promise.all(clients.map((s) => waitFor(s, 'disconnect', 10000)));
    assert.equal((await first.stop()).code, 0, first.stderr().slice(-3000));
    // The transport ends (a close, or for a pending long-poll an error), never `io server
    // disconnect`, after which socket.io-client gives up.
    for (const reason of await reasons) {
      assert.ok(['transport close', 'transport error'].includes(reason), reason);
    }

    second = await spawnHerald([], { port: first.port });
    await Promise.all(clients.map((s) => waitFor(s, 'subscribed', 10000)));
    await postOk(second.url, sessionId, { event: 'progress', data: sampleData('progress') });
    const resumed = await Promise.all(clients.map((s) => waitFor(s, 'progress')));
    assert.deepEqual(resumed.map((e) => e.seq), [1, 1], 'a fresh in-memory log starts again at 1');
  } finally {
    closeAll(...clients);
    await first.stop();
    if (second) await second.stop();
  }
});
