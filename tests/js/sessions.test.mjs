// 4. unsubscribe stops delivery for that session only.
// 5. Many sessions per socket, and sessions that have no events yet.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, waitForN, expectNoEvent, postOk, emitAck,
  uniqueId, assertIsoMs, assertSessionEvent, sampleData, closeAll, safeJson, eventsOf, KINDS,
} from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(); });
after(async () => { await stopAndAssertClean(server); });

async function subscribed(socket, sessionId) {
  socket.emit('subscribe', sessionId);
  return waitFor(socket, 'subscribed', 5000, (p) => p.sessionId === sessionId);
}

describe('unsubscribe', () => {
  for (const transports of [['websocket'], ['polling']]) {
    test(`stops that session only (${transports[0]})`, async () => {
      const a = uniqueId('unsub-a');
      const b = uniqueId('unsub-b');
      const socket = connect(server.url, { transports });
      const other = connect(server.url, { transports: ['websocket'] });
      try {
        await Promise.all([waitFor(socket, 'connected'), waitFor(other, 'connected')]);
        await subscribed(socket, a);
        await subscribed(socket, b);
        await subscribed(other, a);

        // both sessions deliver before unsubscribe
        await postOk(server.url, a, { event: 'progress', data: sampleData('progress', 1) });
        await postOk(server.url, b, { event: 'progress', data: sampleData('progress', 1) });
        await waitFor(socket, 'progress', 5000, (p) => p.sessionId === a && p.seq === 1);
        await waitFor(socket, 'progress', 5000, (p) => p.sessionId === b && p.seq === 1);
        await waitFor(other, 'progress', 5000, (p) => p.sessionId === a && p.seq === 1);

        socket.emit('unsubscribe', a);
        const unsub = await waitFor(socket, 'unsubscribed');
        assert.deepStrictEqual(Object.keys(unsub).sort(), ['sessionId', 'timestamp'], safeJson(unsub));
        assert.equal(unsub.sessionId, a);
        assertIsoMs(unsub.timestamp, 'unsubscribed.timestamp');

        // a is posted first, then b; b arrives, a must not
        const dataA = sampleData('model_result', 2);
        const dataB = sampleData('model_result', 2);
        await postOk(server.url, a, { event: 'model_result', data: dataA });
        await postOk(server.url, b, { event: 'model_result', data: dataB });
        const gotB = await waitFor(socket, 'model_result', 5000, (p) => p.sessionId === b);
        assertSessionEvent(gotB, { sessionId: b, seq: 2, data: dataB });
        // the other socket, still subscribed to a, does receive it (so it was emitted)
        const gotA = await waitFor(other, 'model_result', 5000, (p) => p.sessionId === a);
        assertSessionEvent(gotA, { sessionId: a, seq: 2, data: dataA });
        await expectNoEvent(socket, 'model_result', 300, (p) => p.sessionId === a,
          'events of an unsubscribed session must not arrive');
        for (const kind of KINDS) {
          await expectNoEvent(socket, kind, 0, (p) => p && p.sessionId === a && p.seq > 1, `no ${kind} for ${a}`);
        }
        assert.equal(socket.connected, true);
      } finally {
        closeAll(socket, other);
      }
    });
  }

  test('unsubscribe with ack, object payload, and of a session never subscribed', async () => {
    const a = uniqueId('unsub-ack');
    const never = uniqueId('unsub-never');
    const socket = connect(server.url, { transports: ['websocket'] });
    try {
      await waitFor(socket, 'connected');
      await subscribed(socket, a);

      const ack = await emitAck(socket, 'unsubscribe', a);
      assert.deepStrictEqual(ack, { ok: true, sessionId: a }, `unsubscribe ack: ${safeJson(ack)}`);
      assert.equal((await waitFor(socket, 'unsubscribed')).sessionId, a);

      // never subscribed: not an error, still `unsubscribed`
      const ack2 = await emitAck(socket, 'unsubscribe', never);
      assert.deepStrictEqual(ack2, { ok: true, sessionId: never }, `unsubscribe (not subscribed) ack: ${safeJson(ack2)}`);
      assert.equal((await waitFor(socket, 'unsubscribed')).sessionId, never);

      // object form, seed style
      await subscribed(socket, a);
      socket.emit('unsubscribe', { sessionId: a });
      assert.equal((await waitFor(socket, 'unsubscribed')).sessionId, a);
      await postOk(server.url, a, { event: 'progress', data: sampleData('progress') });
      await expectNoEvent(socket, 'progress', 300, () => true, 'unsubscribed via {sessionId}');
      await expectNoEvent(socket, 'error', 0, () => true, 'unsubscribe never errors for valid ids');
    } finally {
      closeAll(socket);
    }
  });

  test('resubscribe after unsubscribe delivers again', async () => {
    const a = uniqueId('resub');
    const socket = connect(server.url, { transports: ['polling'] });
    try {
      await waitFor(socket, 'connected');
      await subscribed(socket, a);
      socket.emit('unsubscribe', a);
      await waitFor(socket, 'unsubscribed');
      await postOk(server.url, a, { event: 'progress', data: sampleData('progress', 1) });
      const sub = await subscribed(socket, a);
      assert.equal(sub.lastSeq, 1);
      await postOk(server.url, a, { event: 'progress', data: sampleData('progress', 2) });
      const ev = await waitFor(socket, 'progress');
      assert.equal(ev.seq, 2, `only the live event after resubscribe: ${safeJson(ev)}`);
    } finally {
      closeAll(socket);
    }
  });
});

describe('several sessions per socket', () => {
  test('sessions with no events yet, events arrive live with per-session seq', async () => {
    const ids = [uniqueId('multi-a'), uniqueId('multi-b'), uniqueId('multi-c')];
    const [a, b, c] = ids;
    const socket = connect(server.url, { transports: ['websocket'] });
    try {
      await waitFor(socket, 'connected');
      for (const id of ids) {
        const sub = await subscribed(socket, id);
        assert.equal(sub.lastSeq, 0, `new session ${id}`);
        assert.equal(sub.epoch, '', `new session ${id}`);
        assertIsoMs(sub.timestamp);
      }
      // the same session twice on one socket: still delivered once per event
      const again = await subscribed(socket, a);
      assert.equal(again.lastSeq, 0);

      const plan = [[a, 'progress'], [b, 'model_result'], [a, 'clarification'], [c, 'completed'], [b, 'error'], [a, 'progress']];
      const expectedSeq = { [a]: 0, [b]: 0, [c]: 0 };
      const sent = [];
      for (const [id, kind] of plan) {
        const data = sampleData(kind, sent.length + 1);
        const body = await postOk(server.url, id, { event: kind, data });
        expectedSeq[id] += 1;
        assert.equal(body.lastSeq, expectedSeq[id], `per-session lastSeq for ${id}`);
        sent.push({ id, kind, data, seq: expectedSeq[id] });
      }
      for (const s of sent) {
        const got = await waitFor(socket, s.kind, 5000, (p) => p.sessionId === s.id && p.seq === s.seq);
        assertSessionEvent(got, { sessionId: s.id, seq: s.seq, data: s.data, what: `${s.kind} ${s.id}#${s.seq}` });
      }
      await expectNoEvent(socket, 'progress', 300, () => true, 'no duplicates (double subscribe)');
      const all = eventsOf(socket, (e) => KINDS.includes(e.event));
      assert.deepStrictEqual(all.map((e) => `${e.payload.sessionId}#${e.payload.seq}`),
        sent.map((s) => `${s.id}#${s.seq}`), 'each event exactly once, in posting order');

      // a later subscriber on another socket sees the heads
      const late = connect(server.url, { transports: ['polling'] });
      try {
        await waitFor(late, 'connected');
        const heads = {};
        for (const id of ids) heads[id] = (await subscribed(late, id)).lastSeq;
        assert.deepStrictEqual(heads, { [a]: 3, [b]: 2, [c]: 1 });
      } finally {
        closeAll(late);
      }
    } finally {
      closeAll(socket);
    }
  });

  test('one socket, many sessions at once (20) over polling', async () => {
    const ids = Array.from({ length: 20 }, (_, i) => uniqueId(`many-${i}`));
    const socket = connect(server.url, { transports: ['polling'] });
    try {
      await waitFor(socket, 'connected');
      const acks = await Promise.all(ids.map((id) => emitAck(socket, 'subscribe', id)));
      acks.forEach((ack, i) => assert.equal(ack.ok, true, `subscribe ${ids[i]}: ${safeJson(ack)}`));
      await waitForN(socket, 'subscribed', 20);
      await Promise.all(ids.map((id) => postOk(server.url, id, { event: 'progress', data: sampleData('progress') })));
      const got = await waitForN(socket, 'progress', 20, 10000);
      assert.deepStrictEqual(got.map((p) => p.sessionId).sort(), [...ids].sort());
      assert.ok(got.every((p) => p.seq === 1));
    } finally {
      closeAll(socket);
    }
  });
});
