// 6. A large model_result (300 kB result, multi-byte UTF-8) arrives intact,
//    over polling-only (the case that breaks length framing) and over websocket.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, postOk,
  uniqueId, assertSessionEvent, sampleData, closeAll,
} from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(); });
after(async () => { await stopAndAssertClean(server); });

function bigResult(targetBytes) {
  // mixes 1-, 2-, 3- and 4-byte UTF-8 sequences plus JSON-escaped characters
  const unit = 'token ë 中 🚀 "quoted" \\ \n\t line; ';
  const parts = [];
  let bytes = 0;
  for (let i = 0; bytes < targetBytes; i++) {
    const part = `${i}:${unit}`;
    parts.push(part);
    bytes += Buffer.byteLength(part);
  }
  return parts.join('');
}

describe('large payloads', () => {
  for (const transports of [['polling'], ['websocket']]) {
    test(`300 kB model_result over ${transports[0]} only`, async () => {
      const sessionId = uniqueId(`large-${transports[0]}`);
      const result = bigResult(300 * 1024);
      assert.ok(Buffer.byteLength(result) >= 300 * 1024);
      const data = { ...sampleData('model_result'), status: 'completed', result };
      const socket = connect(server.url, { transports });
      socket.on('connect', () => socket.emit('subscribe', sessionId));
      try {
        await waitFor(socket, 'subscribed');
        const small = sampleData('progress');
        const body = await postOk(server.url, sessionId, [
          { event: 'progress', data: small },
          { event: 'model_result', data },
          { event: 'progress', data: { ...small, progress: 100 } },
        ]);
        assert.equal(body.lastSeq, 3);
        const before = await waitFor(socket, 'progress', 10000, (p) => p.seq === 1);
        const got = await waitFor(socket, 'model_result', 10000);
        const afterEv = await waitFor(socket, 'progress', 10000, (p) => p.seq === 3);
        assert.equal(before.seq, 1);
        assert.equal(afterEv.progress, 100);
        assert.equal(got.result.length, result.length, 'result length');
        assert.ok(got.result === result, 'result string arrives byte-for-byte intact');
        assertSessionEvent(got, { sessionId, seq: 2, data });
        assert.equal(socket.io.engine.transport.name, transports[0]);
        assert.equal(socket.connected, true);
        assert.deepStrictEqual(socket.__rec.disconnects, []);
      } finally {
        closeAll(socket);
      }
    });
  }

  test('large event replayed over polling after lastSeq', async () => {
    const sessionId = uniqueId('large-replay');
    const result = bigResult(300 * 1024);
    const data = { ...sampleData('model_result'), status: 'completed', result };
    await postOk(server.url, sessionId, [{ event: 'progress', data: sampleData('progress') }, { event: 'model_result', data }]);
    const socket = connect(server.url, { transports: ['polling'] });
    socket.on('connect', () => socket.emit('subscribe', { sessionId, lastSeq: 1 }));
    try {
      const sub = await waitFor(socket, 'subscribed');
      assert.equal(sub.recovered, true);
      const got = await waitFor(socket, 'model_result', 10000);
      assert.ok(got.result === result, 'replayed result intact');
      assertSessionEvent(got, { sessionId, seq: 2, data });
    } finally {
      closeAll(socket);
    }
  });
});
