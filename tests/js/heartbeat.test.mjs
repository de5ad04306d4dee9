// Engine.IO heartbeat with the real client: with a short ping interval, websocket and
// polling clients answer several server pings and stay connected and subscribed.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, postOk, uniqueId, sampleData, closeAll,
} from './helpers.mjs';

let server;
before(async () => {
  server = await spawnHerald(['--ping-interval-ms', '200', '--ping-timeout-ms', '400']);
});
after(async () => { await stopAndAssertClean(server); });

/** Resolve after the manager has seen `n` pings from the server. */
function pings(socket, n, timeoutMs) {
  return new Promise((resolve, reject) => {
    let count = 0;
    const timer = setTimeout(() => reject(new Error(`only ${count}/${n} pings in ${timeoutMs} ms`)), timeoutMs);
    socket.io.on('ping', () => {
      count += 1;
      if (count === n) { clearTimeout(timer); resolve(count); }
    });
  });
}

for (const transports of [['websocket'], ['polling']]) {
  test(`stays connected across server pings (${transports[0]})`, async () => {
    const sessionId = uniqueId(`hb-${transports[0]}`);
    const socket = connect(server.url, { transports });
    const seenPings = pings(socket, 5, 5000);
    socket.on('connect', () => socket.emit('subscribe', sessionId));
    try {
      await waitFor(socket, 'subscribed');
      await seenPings;
      assert.equal(socket.connected, true);
      assert.deepStrictEqual(socket.__rec.disconnects, [], 'no disconnect across pings');
      await postOk(server.url, sessionId, { event: 'progress', data: sampleData('progress') });
      const ev = await waitFor(socket, 'progress');
      assert.equal(ev.seq, 1);
      assert.equal(socket.io.engine.transport.name, transports[0]);
    } finally {
      closeAll(socket);
    }
  });
}
