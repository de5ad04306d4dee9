// 1. A seed-shaped socket.io-client front end (exactly the shape users already have)
//    over websocket only, polling only, and the default (polling, then upgrade).
//    Asserts `connected`, `subscribed`, and every session event kind with exact payloads.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import {
  spawnHerald, stopAndAssertClean, record, waitFor, waitForN, expectNoEvent, postOk,
  uniqueId, assertIsoMs, assertSessionEvent, sampleData, KINDS, closeAll, safeJson,
} from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(); });
after(async () => { await stopAndAssertClean(server); });

const VARIANTS = [
  { name: 'websocket only', opts: { transports: ['websocket'] }, finalTransport: 'websocket' },
  { name: 'polling only', opts: { transports: ['polling'] }, finalTransport: 'polling' },
  { name: 'default (polling with upgrade)', opts: undefined, finalTransport: 'websocket', upgrade: true },
];

describe('seed-shaped client receives every session event kind', () => {
  for (const variant of VARIANTS) {
    test(variant.name, async () => {
      const url = server.url;
      const sessionId = uniqueId(`seed-${variant.finalTransport}`);

      // --- the seed front end, verbatim in shape ---
      // (the default variant is literally `io(url)`; the others add only `transports`)
      const socket = variant.opts ? io(url, variant.opts) : io(url);
      record(socket);
      const upgraded = new Promise((resolve) => socket.io.engine.once('upgrade', (t) => resolve(t.name)));
      let upgrades = 0;
      socket.io.engine.on('upgrade', () => { upgrades += 1; });
      const seen = [];
      socket.on('connect', () => socket.emit('subscribe', sessionId));
      socket.on('progress', (d) => seen.push(['progress', d]));
      socket.on('model_result', (d) => seen.push(['model_result', d]));
      socket.on('clarification', (d) => seen.push(['clarification', d]));
      socket.on('completed', (d) => seen.push(['completed', d]));
      socket.on('error', (d) => seen.push(['error', d]));
      // ---

      try {
        const connected = await waitFor(socket, 'connected');
        assert.deepStrictEqual(Object.keys(connected).sort(), ['socketId', 'timestamp'],
          `connected payload keys: ${safeJson(connected)}`);
        assert.equal(typeof connected.socketId, 'string');
        assert.ok(connected.socketId.length > 0, 'socketId must not be empty');
        assert.equal(connected.socketId, socket.id, 'connected.socketId must be the socket.io socket id the client sees');
        assertIsoMs(connected.timestamp, 'connected.timestamp');

        const subscribed = await waitFor(socket, 'subscribed');
        assert.equal(subscribed.sessionId, sessionId);
        assert.equal(typeof subscribed.lastSeq, 'number');
        assert.equal(subscribed.lastSeq, 0, 'a session with no events has lastSeq 0');
        assert.equal(typeof subscribed.epoch, 'string');
        assert.equal(subscribed.epoch, '', 'epoch is "" while the session has no events');
        assertIsoMs(subscribed.timestamp, 'subscribed.timestamp');
        assert.ok(!('recovered' in subscribed), `recovered must be absent when no lastSeq was given: ${safeJson(subscribed)}`);

        if (variant.upgrade) {
          // the default client starts on polling and must upgrade to websocket
          const name = await Promise.race([
            upgraded,
            new Promise((_, rej) => setTimeout(() => rej(new Error('no transport upgrade within 5 s')), 5000)),
          ]);
          assert.equal(name, 'websocket');
        }

        // One batch with all five kinds (a producer timestamp on one of them is kept),
        // then one single POST per kind. The batch's `completed` ends the session, so the
        // singles reopen it (a late event without `?reopen=true` gets 409 SESSION_ENDED).
        const batchData = KINDS.map((k, i) => sampleData(k, i + 1));
        batchData[1] = { ...batchData[1], timestamp: '2026-01-02T03:04:05.678Z' };
        const batchBody = await postOk(url, sessionId, KINDS.map((k, i) => ({ event: k, data: batchData[i] })));
        assert.equal(batchBody.accepted, 5, `batch 202 body: ${safeJson(batchBody)}`);
        assert.equal(batchBody.lastSeq, 5, `batch 202 body: ${safeJson(batchBody)}`);
        assert.equal(batchBody.duplicates, 0, `batch 202 body: ${safeJson(batchBody)}`);
        assert.deepStrictEqual(batchBody.seqs, [1, 2, 3, 4, 5], `batch 202 body: ${safeJson(batchBody)}`);

        const singleData = KINDS.map((k, i) => ({ ...sampleData(k, i + 6), snake_case_field: 'kept', someCamelCase: true }));
        for (let i = 0; i < KINDS.length; i++) {
          const body = await postOk(url, sessionId, { event: KINDS[i], data: singleData[i] }, { query: '?reopen=true' });
          assert.equal(body.accepted, 1, `single 202 body: ${safeJson(body)}`);
          assert.equal(body.lastSeq, 6 + i, `single 202 body: ${safeJson(body)}`);
          assert.equal(body.duplicates, 0, `single 202 body: ${safeJson(body)}`);
          assert.deepStrictEqual(body.seqs, [6 + i], `single 202 body: ${safeJson(body)}`);
        }

        // Each kind arrives twice (batch + single), with exact payloads.
        const expected = [
          ...KINDS.map((k, i) => ({ event: k, seq: i + 1, data: batchData[i] })),
          ...KINDS.map((k, i) => ({ event: k, seq: i + 6, data: singleData[i] })),
        ];
        for (const exp of expected) {
          const got = await waitFor(socket, exp.event, 5000, (p) => p && p.seq === exp.seq);
          assertSessionEvent(got, { sessionId, seq: exp.seq, data: exp.data, what: `${variant.name} ${exp.event} #${exp.seq}` });
          if (exp.event === 'error') assert.equal(typeof got.seq, 'number', 'a session error event carries seq');
        }

        // Arrival order over the wire is seq order: 1..10, nothing else, no duplicates.
        await expectNoEvent(socket, 'progress', 200, () => true, 'no extra progress');
        const sessionEvents = socket.__rec.log.filter((e) => KINDS.includes(e.event));
        assert.deepStrictEqual(sessionEvents.map((e) => [e.event, e.payload.seq]),
          expected.map((e) => [e.event, e.seq]), 'events arrive once each, in seq order');
        // The seed's own handlers saw the same thing.
        assert.deepStrictEqual(seen.map(([ev, d]) => [ev, d.seq]), expected.map((e) => [e.event, e.seq]));

        assert.equal(socket.connected, true);
        assert.equal(socket.io.engine.transport.name, variant.finalTransport, 'transport in use at the end');
        if (variant.finalTransport === 'polling') assert.equal(upgrades, 0, 'polling-only must never upgrade');
        assert.deepStrictEqual(socket.__rec.disconnects, [], 'no disconnect during the test');
      } finally {
        closeAll(socket);
      }
    });
  }
});

describe('polling delivers many events in order', () => {
  test('a batch of 50 events over polling-only arrives complete and ordered', async () => {
    const sessionId = uniqueId('poll-batch');
    const socket = io(server.url, { transports: ['polling'], forceNew: true, reconnection: false });
    record(socket);
    socket.on('connect', () => socket.emit('subscribe', sessionId));
    try {
      await waitFor(socket, 'subscribed');
      const items = Array.from({ length: 50 }, (_, i) => ({
        event: 'model_result',
        data: { ...sampleData('model_result', i), result: `chunk ${i} `.repeat(20) },
      }));
      const body = await postOk(server.url, sessionId, items);
      assert.equal(body.accepted, 50);
      assert.equal(body.lastSeq, 50);
      const got = await waitForN(socket, 'model_result', 50, 10000);
      assert.deepStrictEqual(got.map((g) => g.seq), Array.from({ length: 50 }, (_, i) => i + 1));
      got.forEach((g, i) => assertSessionEvent(g, { sessionId, seq: i + 1, data: items[i].data, what: `model_result #${i + 1}` }));
      assert.equal(socket.io.engine.transport.name, 'polling');
    } finally {
      closeAll(socket);
    }
  });
});
