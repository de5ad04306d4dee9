// The other ways in (SPEC §6) with the clients our users run: the `eventsource` package (the
// browser EventSource, for Node) resuming by itself after herald drops it, a bare `ws`
// client speaking the JSON protocol, and the browser bundle from /socket.io/socket.io.js
// evaluated as a page would and connecting.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import vm from 'node:vm';
import { EventSource } from 'eventsource';
import WebSocket from 'ws';
import { spawnHerald, stopAndAssertClean, postOk, uniqueId } from './helpers.mjs';

let server;
before(async () => {
  server = await spawnHerald();
});
after(async () => {
  await stopAndAssertClean(server);
});

function progressItem(n) {
  return { event: 'progress', data: { status: 'PROCESSING', progress: n % 101, n } };
}

async function postRange(sessionId, from, count) {
  const items = [];
  for (let n = from; n < from + count; n++) items.push(progressItem(n));
  await postOk(server.url, sessionId, items);
}

async function dropFollowers(sessionId) {
  const response = await fetch(`${server.url}/api/dev/session/${sessionId}/drop-sockets`, { method: 'POST' });
  assert.equal(response.status, 200);
  return (await response.json()).dropped;
}

/** Resolves when `check()` is true, polling on the given events' arrival (bounded). */
function until(check, what, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      if (check()) return resolve();
      if (Date.now() - started > timeoutMs) return reject(new Error(`timed out: ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

test('EventSource replays, follows live and resumes by itself after a drop, gap-free', async () => {
  const sessionId = uniqueId('es');
  await postRange(sessionId, 1, 5);
  const source = new EventSource(`${server.url}/api/wizard/session/${sessionId}/stream?lastSeq=0`);
  const seqs = [];
  const subscribed = [];
  let errors = 0;
  source.addEventListener('subscribed', (e) => subscribed.push(JSON.parse(e.data)));
  source.addEventListener('progress', (e) => {
    const event = JSON.parse(e.data);
    assert.equal(String(event.seq), e.lastEventId);
    seqs.push(event.seq);
  });
  source.onerror = () => { errors += 1; };
  try {
    await until(() => seqs.length === 5, 'the replay');
    assert.equal(subscribed[0].recovered, true);
    await postRange(sessionId, 6, 5);
    await until(() => seqs.length === 10, 'live events');

    assert.equal(await dropFollowers(sessionId), 1);
    // Logged while it is away: it must get these on its own reconnect.
    await postRange(sessionId, 11, 10);
    await until(() => subscribed.length === 2 && seqs.length === 20, 'the reconnect and its replay');
    assert.ok(errors >= 1, 'the drop was seen as an error');
    assert.equal(subscribed[1].recovered, true);
    assert.deepEqual(seqs, Array.from({ length: 20 }, (_, i) => i + 1));
  } finally {
    source.close();
  }
});

/** A bare `ws` client with a queue of parsed messages. */
function openWs(url) {
  const socket = new WebSocket(url);
  const inbox = [];
  const waiters = [];
  socket.on('message', (data, isBinary) => {
    assert.equal(isBinary, false);
    inbox.push(JSON.parse(data.toString()));
    while (waiters.length && inbox.length) waiters.shift()(inbox.shift());
  });
  const next = (timeoutMs = 5000) => new Promise((resolve, reject) => {
    if (inbox.length) return resolve(inbox.shift());
    const timer = setTimeout(() => reject(new Error('no WebSocket message in time')), timeoutMs);
    waiters.push((m) => { clearTimeout(timer); resolve(m); });
  });
  const send = (value) => socket.send(JSON.stringify(value));
  return { socket, next, send };
}

test('a bare ws client subscribes with type or action, pings, replays and resumes', async () => {
  const sessionId = uniqueId('ws');
  await postRange(sessionId, 1, 3);
  const url = server.url.replace('http', 'ws') + '/ws';
  const ws = openWs(url);
  try {
    const hello = await ws.next();
    assert.equal(hello.type, 'connected');
    ws.send({ action: 'subscribe', sessionId, lastSeq: 0 });
    const subscribed = await ws.next();
    assert.equal(subscribed.type, 'subscribed');
    assert.equal(subscribed.lastSeq, 3);
    for (let seq = 1; seq <= 3; seq++) {
      const event = await ws.next();
      assert.deepEqual([event.type, event.seq, event.n], ['progress', seq, seq]);
    }
    ws.send({ type: 'ping' });
    assert.equal((await ws.next()).type, 'pong');
    await postRange(sessionId, 4, 1);
    assert.equal((await ws.next()).seq, 4);

    const closed = new Promise((resolve) => ws.socket.once('close', (code) => resolve(code)));
    assert.equal(await dropFollowers(sessionId), 1);
    assert.equal(await closed, 1013, 'closed with "try again later"');
    await postRange(sessionId, 5, 2);

    const again = openWs(url);
    assert.equal((await again.next()).type, 'connected');
    again.send({ type: 'subscribe', sessionId, lastSeq: 4, epoch: subscribed.epoch });
    assert.equal((await again.next()).recovered, true);
    assert.deepEqual([(await again.next()).seq, (await again.next()).seq], [5, 6]);
    again.send({ type: 'subscribe' });
    const error = await again.next();
    assert.deepEqual([error.type, error.code], ['error', 'INVALID_PAYLOAD']);
    again.socket.close();
  } finally {
    ws.socket.close();
  }
});

test('the /socket.io/socket.io.js bundle, evaluated as a page does, connects and follows a session', async () => {
  const response = await fetch(`${server.url}/socket.io/socket.io.min.js`);
  assert.equal(response.status, 200);
  const etag = response.headers.get('etag');
  assert.match(etag, /^"4\.\d+\.\d+"$/);
  const source = await response.text();
  const revalidated = await fetch(`${server.url}/socket.io/socket.io.min.js`, { headers: { 'if-none-match': etag } });
  assert.equal(revalidated.status, 304);

  // A page's global scope: the bundle defines `io` on it. Node's own WebSocket stands in
  // for the browser's.
  const page = { WebSocket, setTimeout, clearTimeout, setInterval, clearInterval, console, location: new URL(server.url) };
  page.window = page;
  page.self = page;
  vm.createContext(page);
  vm.runInContext(source, page);
  assert.equal(typeof page.io, 'function');
  const socket = page.io(server.url, { transports: ['websocket'], forceNew: true, reconnection: false });
  const sessionId = uniqueId('bundle');
  try {
    await new Promise((resolve, reject) => {
      socket.on('connect', resolve);
      socket.on('connect_error', reject);
    });
    const ack = await socket.timeout(5000).emitWithAck('subscribe', { sessionId, lastSeq: 0 });
    assert.equal(ack.ok, true);
    const got = new Promise((resolve) => socket.on('progress', resolve));
    await postRange(sessionId, 1, 1);
    const event = await got;
    assert.equal(event.seq, 1);
  } finally {
    socket.close();
  }
});
