// herald's own cut-offs (slow consumer, lagging node, shutdown, the dev drop route) drop the
// transport as a network failure would: an unchanged socket.io-client with reconnection on
// comes back by itself and, re-subscribing with its last seq in its `connect` handler,
// holds every event once and in order. (A Socket.IO DISCONNECT packet would end it for good:
// socket.io-client never retries `io server disconnect`.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { spawnHerald, stopAndAssertClean, post, uniqueId } from './helpers.mjs';

let server;
before(async () => {
  server = await spawnHerald();
});
after(async () => {
  await stopAndAssertClean(server);
});

/** A SPEC §1 `progress` item, about 300 bytes. */
function progressItem(n) {
  return {
    event: 'progress',
    data: {
      status: 'PROCESSING',
      progress: n % 101,
      prompts: { total: 4, completed: 1, processing: 1, pending: 2, failed: 0 },
      hasClarifications: false,
      clarificationCount: 0,
      n,
    },
  };
}

/**
 * A front end as our users write it: plain socket.io-client, `reconnection: true`, and a
 * `connect` handler that (re)subscribes with the last seq it saw.
 */
function follower(url, sessionId, transports) {
  const socket = io(url, { reconnection: true, transports, forceNew: true });
  const state = { socket, seqs: [], connects: 0, reasons: [] };
  socket.on('connect', () => {
    state.connects += 1;
    const lastSeq = state.seqs.length ? state.seqs[state.seqs.length - 1] : 0;
    socket.emit('subscribe', { sessionId, lastSeq });
  });
  socket.on('disconnect', (reason) => state.reasons.push(reason));
  socket.on('progress', (e) => state.seqs.push(e.seq));
  return state;
}

async function until(check, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function dropSockets(sessionId) {
  const res = await fetch(`${server.url}/api/dev/session/${sessionId}/drop-sockets`, { method: 'POST' });
  assert.equal(res.status, 200);
  return (await res.json()).dropped;
}

function assertEveryEventOnceInOrder(state, count, what) {
  const expected = Array.from({ length: count }, (_, i) => i + 1);
  assert.deepEqual(state.seqs, expected, `${what}: seqs received`);
}

for (const transports of [['websocket'], ['polling']]) {
  test(`a server-side drop is retried by an unchanged client (${transports})`, async () => {
    const sessionId = uniqueId('drop');
    const f = follower(server.url, sessionId, transports);
    await until(() => f.connects === 1, 5000, 'the first connect');
    await post(server.url, sessionId, [progressItem(1), progressItem(2)]);
    await until(() => f.seqs.length === 2, 5000, 'the first events');

    assert.equal(await dropSockets(sessionId), 1);
    await until(() => f.reasons.length === 1, 5000, 'the disconnect');
    assert.notEqual(f.reasons[0], 'io server disconnect', 'herald must not send DISCONNECT');
    await post(server.url, sessionId, [progressItem(3), progressItem(4)]);
    await until(() => f.connects === 2, 10000, 'the client reconnecting by itself');
    await until(() => f.seqs.length === 4, 5000, 'the missed events, replayed');
    assertEveryEventOnceInOrder(f, 4, 'after one drop');
    f.socket.close();
  });
}

test('reconnect storm: 1,000 unchanged clients, their sockets dropped every 0.5 s, miss nothing', async () => {
  const SESSIONS = 20;
  const PER_SESSION = 50;
  const EVENTS = 20;
  const sessions = Array.from({ length: SESSIONS }, () => uniqueId('storm'));
  const followers = [];
  for (const sessionId of sessions) {
    for (let i = 0; i < PER_SESSION; i += 1) followers.push(follower(server.url, sessionId, ['websocket']));
  }
  await until(() => followers.every((f) => f.connects >= 1), 30000, 'every client connected');

  // Events are posted in batches of 2 every 100 ms per session while every session's sockets
  // are dropped every 500 ms.
  let stormOver = false;
  const dropper = (async () => {
    while (!stormOver) {
      await Promise.all(sessions.map(dropSockets));
      await new Promise((r) => setTimeout(r, 500));
    }
  })();
  for (let n = 1; n <= EVENTS; n += 2) {
    await Promise.all(sessions.map((s) => post(server.url, s, [progressItem(n), progressItem(n + 1)])));
    await new Promise((r) => setTimeout(r, 100));
  }
  stormOver = true;
  await dropper;

  await until(() => followers.every((f) => f.seqs.length >= EVENTS), 60000,
    `every client holding all ${EVENTS} events (lagging: ${followers.filter((f) => f.seqs.length < EVENTS).length})`);
  for (const [i, f] of followers.entries()) assertEveryEventOnceInOrder(f, EVENTS, `client ${i}`);
  const reconnects = followers.reduce((sum, f) => sum + f.connects - 1, 0);
  assert.ok(reconnects >= followers.length, `every client was dropped and came back (${reconnects} reconnects)`);
  assert.ok(followers.every((f) => !f.reasons.includes('io server disconnect')));
  for (const f of followers) f.socket.close();
});
