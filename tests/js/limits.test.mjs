// Per-socket limits seen through the real client: TOO_MANY_SUBSCRIPTIONS and RATE_LIMITED
// are `error` events / failing acks, and the socket stays connected and usable.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, expectNoEvent, postOk, emitAck,
  uniqueId, assertIsoMs, sampleData, closeAll, safeJson,
} from './helpers.mjs';

const MAX_SUBS = 3;
const RATE = 5; // per second, burst 2 × RATE
let server;
before(async () => {
  server = await spawnHerald(['--max-subscriptions', String(MAX_SUBS), '--subscribe-rate', String(RATE)]);
});
after(async () => { await stopAndAssertClean(server); });

test(`at most ${MAX_SUBS} subscriptions per socket`, async () => {
  const ids = Array.from({ length: MAX_SUBS + 1 }, (_, i) => uniqueId(`subs-${i}`));
  const socket = connect(server.url, { transports: ['websocket'] });
  try {
    await waitFor(socket, 'connected');
    for (const id of ids.slice(0, MAX_SUBS)) {
      assert.equal((await emitAck(socket, 'subscribe', id)).ok, true);
    }
    const over = ids[MAX_SUBS];
    const ack = await emitAck(socket, 'subscribe', over);
    assert.equal(ack.ok, false, safeJson(ack));
    assert.equal(ack.error.code, 'TOO_MANY_SUBSCRIPTIONS', safeJson(ack));
    const err = await waitFor(socket, 'error');
    assert.equal(err.code, 'TOO_MANY_SUBSCRIPTIONS');
    assert.equal(typeof err.error, 'string');
    assertIsoMs(err.timestamp);
    assert.ok(!('seq' in err));

    // resubscribing to one it already follows is not a new subscription
    assert.equal((await emitAck(socket, 'subscribe', ids[0])).ok, true);
    // the refused session is not followed
    await postOk(server.url, over, { event: 'progress', data: sampleData('progress') });
    await expectNoEvent(socket, 'progress', 300, () => true, 'refused subscription must not deliver');
    // after an unsubscribe there is room again
    assert.equal((await emitAck(socket, 'unsubscribe', ids[0])).ok, true);
    const ack2 = await emitAck(socket, 'subscribe', over);
    assert.equal(ack2.ok, true, safeJson(ack2));
    assert.equal(ack2.lastSeq, 1);
    assert.equal(socket.connected, true);
  } finally {
    closeAll(socket);
  }
});

test(`subscribe rate limit (${RATE}/s) answers RATE_LIMITED and keeps the socket`, async () => {
  const socket = connect(server.url, { transports: ['polling'] });
  try {
    await waitFor(socket, 'connected');
    const id = uniqueId('rate');
    const n = RATE * 2 + 5;
    const acks = await Promise.all(Array.from({ length: n }, () => emitAck(socket, 'subscribe', id)));
    const ok = acks.filter((a) => a.ok === true).length;
    const limited = acks.filter((a) => a.ok === false && a.error && a.error.code === 'RATE_LIMITED').length;
    assert.equal(ok + limited, n, `every ack is ok or RATE_LIMITED: ${safeJson(acks)}`);
    assert.ok(limited >= 1, `a burst of ${n} must hit the limit: ${safeJson(acks)}`);
    assert.ok(ok >= RATE * 2 - 1, `the burst allowance is honoured (${ok} ok)`);
    const err = await waitFor(socket, 'error', 5000, (e) => e.code === 'RATE_LIMITED');
    assert.equal(typeof err.error, 'string');
    assert.equal(socket.connected, true);
    // still subscribed and delivering
    await postOk(server.url, id, { event: 'progress', data: sampleData('progress') });
    assert.equal((await waitFor(socket, 'progress')).sessionId, id);
    // the bucket refills: a later request succeeds (await the refill by retrying on acks)
    let later;
    const deadline = Date.now() + 3000;
    do {
      later = await emitAck(socket, 'subscribe', id);
    } while (!later.ok && Date.now() < deadline && (await new Promise((r) => setTimeout(r, 1000 / RATE, true))));
    assert.equal(later.ok, true, `after a pause the limit lifts: ${safeJson(later)}`);
  } finally {
    closeAll(socket);
  }
});
