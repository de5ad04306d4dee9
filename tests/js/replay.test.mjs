// 2. Ack callbacks (emitWithAck) and replay / recovery semantics of `subscribe`.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, waitForN, expectNoEvent, postOk, getJson,
  emitAck, uniqueId, assertIsoMs, assertSessionEvent, sampleData, closeAll, safeJson, eventsOf,
} from './helpers.mjs';

const RETENTION = 5;
let server;      // default settings
let small;       // --max-events-per-session 5
before(async () => {
  [server, small] = await Promise.all([
    spawnHerald(),
    spawnHerald(['--max-events-per-session', String(RETENTION)]),
  ]);
});
after(async () => {
  await Promise.all([stopAndAssertClean(server), stopAndAssertClean(small)]);
});

const progress = (n) => ({ event: 'progress', data: { ...sampleData('progress', n), progress: n } });
const postProgress = (url, sessionId, from, to) =>
  postOk(url, sessionId, Array.from({ length: to - from + 1 }, (_, i) => progress(from + i)));

/** A connected socket.io-client (websocket unless transports given). */
async function client(url, opts = { transports: ['websocket'] }) {
  const s = connect(url, opts);
  await waitFor(s, 'connected');
  return s;
}

/** Progress seqs received by a socket, in arrival order. */
const progressSeqs = (s) => eventsOf(s, (e) => e.event === 'progress').map((e) => e.payload.seq);

describe('subscribe with an ack callback', () => {
  test('emitWithAck subscribe {sessionId, lastSeq: 0} on a new session', async () => {
    const sessionId = uniqueId('ack-new');
    const s = await client(server.url);
    try {
      const ack = await emitAck(s, 'subscribe', { sessionId, lastSeq: 0 });
      assert.deepStrictEqual(ack, { ok: true, sessionId, lastSeq: 0, epoch: '', recovered: true },
        `ack for a session with no events: ${safeJson(ack)}`);
      const sub = await waitFor(s, 'subscribed');
      assert.equal(sub.sessionId, sessionId);
      assert.equal(sub.lastSeq, 0);
      assert.equal(sub.epoch, '');
      assert.equal(sub.recovered, true, 'lastSeq 0 on an empty log is fully recovered');
      assertIsoMs(sub.timestamp, 'subscribed.timestamp');

      // live events after the ack
      await postProgress(server.url, sessionId, 1, 1);
      const ev = await waitFor(s, 'progress');
      assertSessionEvent(ev, { sessionId, seq: 1, data: progress(1).data });
    } finally {
      closeAll(s);
    }
  });

  test('emitWithAck subscribe with a plain string id has no `recovered`', async () => {
    const sessionId = uniqueId('ack-str');
    await postProgress(server.url, sessionId, 1, 2);
    const s = await client(server.url, { transports: ['polling'] });
    try {
      const ack = await emitAck(s, 'subscribe', sessionId);
      assert.equal(ack.ok, true, safeJson(ack));
      assert.equal(ack.sessionId, sessionId);
      assert.equal(ack.lastSeq, 2);
      assert.equal(typeof ack.epoch, 'string');
      assert.ok(ack.epoch.length > 0, 'epoch is non-empty once the session has events');
      assert.ok(!('recovered' in ack), `no recovered without lastSeq: ${safeJson(ack)}`);
      const sub = await waitFor(s, 'subscribed');
      assert.equal(sub.lastSeq, 2);
      assert.equal(sub.epoch, ack.epoch);
      assert.ok(!('recovered' in sub), `no recovered without lastSeq: ${safeJson(sub)}`);
      // no lastSeq => no replay
      await expectNoEvent(s, 'progress', 300, () => true, 'subscribe without lastSeq must not replay');
    } finally {
      closeAll(s);
    }
  });
});

describe('replay after lastSeq', () => {
  test('lastSeq 2 replays 3,4,5 in order after `subscribed`, then live 6; wrong epoch is not recovered', async () => {
    const sessionId = uniqueId('replay');
    const watcher = await client(server.url);
    const others = [];
    try {
      // a first client subscribes before anything happened
      const ack0 = await emitAck(watcher, 'subscribe', { sessionId, lastSeq: 0 });
      assert.equal(ack0.ok, true);
      await waitFor(watcher, 'subscribed');

      const posted = await postProgress(server.url, sessionId, 1, 5);
      assert.equal(posted.lastSeq, 5);
      assert.deepStrictEqual((await waitForN(watcher, 'progress', 5)).map((p) => p.seq), [1, 2, 3, 4, 5]);

      // learn the epoch as a client would (subscribed without lastSeq)
      const probe = await client(server.url);
      others.push(probe);
      probe.emit('subscribe', sessionId);
      const probeSub = await waitFor(probe, 'subscribed');
      assert.equal(probeSub.lastSeq, 5);
      const epoch = probeSub.epoch;
      assert.equal(typeof epoch, 'string');
      assert.ok(epoch.length > 0, 'epoch must be non-empty once the session has events');

      // (a) lastSeq 2 with the right epoch, over websocket, with ack
      const a = await client(server.url);
      others.push(a);
      const ackA = await emitAck(a, 'subscribe', { sessionId, lastSeq: 2, epoch });
      assert.deepStrictEqual(ackA, { ok: true, sessionId, lastSeq: 5, epoch, recovered: true }, safeJson(ackA));
      const replayA = await waitForN(a, 'progress', 3);
      assert.deepStrictEqual(replayA.map((p) => p.seq), [3, 4, 5]);
      replayA.forEach((p, i) => assertSessionEvent(p, { sessionId, seq: 3 + i, data: progress(3 + i).data, what: `replayed #${3 + i}` }));

      // (b) lastSeq 2 without epoch, over polling, seed style (no ack)
      const b = await client(server.url, { transports: ['polling'] });
      others.push(b);
      b.emit('subscribe', { sessionId, lastSeq: 2 });
      await waitForN(b, 'progress', 3);

      // (c) lastSeq 2 with a wrong epoch: not recovered, no replay
      const c = await client(server.url);
      others.push(c);
      c.emit('subscribe', { sessionId, lastSeq: 2, epoch: 'not-the-epoch' });
      const subC = await waitFor(c, 'subscribed');
      assert.equal(subC.recovered, false, `wrong epoch must give recovered:false: ${safeJson(subC)}`);
      assert.equal(subC.lastSeq, 5);
      assert.equal(subC.epoch, epoch, 'subscribed reports the current epoch');

      // `subscribed` comes first, then the replay in order, on each recovering client
      for (const [name, s] of [['a', a], ['b', b]]) {
        const log = eventsOf(s, (e) => e.event === 'subscribed' || e.event === 'progress');
        assert.deepStrictEqual(log.map((e) => e.event === 'subscribed' ? `subscribed:${e.payload.recovered}` : e.payload.seq),
          ['subscribed:true', 3, 4, 5], `client ${name}: order of subscribed and replay`);
      }
      await expectNoEvent(c, 'progress', 300, () => true, 'wrong epoch: no partial replay');

      // live seq 6 reaches everyone exactly once
      const live = await postProgress(server.url, sessionId, 6, 6);
      assert.equal(live.lastSeq, 6);
      for (const [name, s] of [['watcher', watcher], ['probe', probe], ['a', a], ['b', b], ['c', c]]) {
        const ev = await waitFor(s, 'progress', 5000, (p) => p.seq === 6);
        assertSessionEvent(ev, { sessionId, seq: 6, data: progress(6).data, what: `live #6 on ${name}` });
      }
      await expectNoEvent(a, 'progress', 200, () => true, 'no duplicates after live');
      assert.deepStrictEqual(progressSeqs(watcher), [1, 2, 3, 4, 5, 6]);
      assert.deepStrictEqual(progressSeqs(probe), [6]);
      assert.deepStrictEqual(progressSeqs(a), [3, 4, 5, 6]);
      assert.deepStrictEqual(progressSeqs(b), [3, 4, 5, 6]);
      assert.deepStrictEqual(progressSeqs(c), [6]);

      // the HTTP history agrees on the epoch and head
      const hist = await getJson(server.url, `/api/wizard/session/${encodeURIComponent(sessionId)}/events?after=0`);
      assert.equal(hist.status, 200, safeJson(hist.body));
      assert.equal(hist.body.epoch, epoch, 'HTTP history epoch equals the socket epoch');
      assert.equal(hist.body.lastSeq, 6);
    } finally {
      closeAll(watcher, others);
    }
  });

  test('lastSeq equal to the head: recovered, nothing replayed', async () => {
    const sessionId = uniqueId('replay-head');
    await postProgress(server.url, sessionId, 1, 3);
    const s = await client(server.url);
    try {
      const ack = await emitAck(s, 'subscribe', { sessionId, lastSeq: 3 });
      assert.equal(ack.ok, true);
      assert.equal(ack.recovered, true, safeJson(ack));
      assert.equal(ack.lastSeq, 3);
      await expectNoEvent(s, 'progress', 300);
    } finally {
      closeAll(s);
    }
  });
});

describe(`retention (--max-events-per-session ${RETENTION})`, () => {
  test('lastSeq older than the retained window: recovered false, no replay; inside it: replay', async () => {
    const sessionId = uniqueId('retention');
    const body = await postProgress(small.url, sessionId, 1, 10);
    assert.equal(body.accepted, 10);
    assert.equal(body.lastSeq, 10);

    const sockets = [];
    try {
      // lastSeq 1: seqs 2..5 are gone → not recovered, no (partial) replay
      const s1 = await client(small.url);
      sockets.push(s1);
      s1.emit('subscribe', { sessionId, lastSeq: 1 });
      const sub1 = await waitFor(s1, 'subscribed');
      assert.equal(sub1.recovered, false, `lastSeq 1 with only 6..10 retained: ${safeJson(sub1)}`);
      assert.equal(sub1.lastSeq, 10);
      assert.equal(typeof sub1.epoch, 'string');
      assert.ok(sub1.epoch.length > 0);

      // lastSeq 4: seq 5 is gone → not recovered (boundary)
      const s4 = await client(small.url, { transports: ['polling'] });
      sockets.push(s4);
      const ack4 = await emitAck(s4, 'subscribe', { sessionId, lastSeq: 4, epoch: sub1.epoch });
      assert.equal(ack4.ok, true);
      assert.equal(ack4.recovered, false, `lastSeq 4 with only 6..10 retained: ${safeJson(ack4)}`);
      const sub4 = await waitFor(s4, 'subscribed');
      assert.equal(sub4.recovered, false);

      // lastSeq 5: exactly the retained window 6..10 → recovered, replayed
      const s5 = await client(small.url);
      sockets.push(s5);
      const ack5 = await emitAck(s5, 'subscribe', { sessionId, lastSeq: 5, epoch: sub1.epoch });
      assert.equal(ack5.ok, true);
      assert.equal(ack5.recovered, true, `lastSeq 5 with 6..10 retained: ${safeJson(ack5)}`);
      const replay = await waitForN(s5, 'progress', 5);
      assert.deepStrictEqual(replay.map((p) => p.seq), [6, 7, 8, 9, 10]);

      await expectNoEvent(s1, 'progress', 300, () => true, 'recovered:false must not replay');
      await expectNoEvent(s4, 'progress', 50, () => true, 'recovered:false must not replay');

      // the non-recovered clients are still subscribed to live events
      await postProgress(small.url, sessionId, 11, 11);
      for (const s of sockets) {
        const ev = await waitFor(s, 'progress', 5000, (p) => p.seq === 11);
        assert.equal(ev.sessionId, sessionId);
      }
    } finally {
      closeAll(sockets);
    }
  });
});
