// recovered:false → onResync(snapshot), then delivery continues after snapshot.lastSeq.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { HeraldClient } from '../dist/index.js';
import { spawnHerald, waitUntil, postEvents, uniqueId, recorder } from './helpers.mjs';

let server;
before(async () => { server = await spawnHerald(['--max-events-per-session', '3']); });
after(async () => {
  const { code } = await server.stop();
  assert.equal(code, 0);
});

const progress = (n) => ({
  event: 'progress',
  data: { status: 'PROCESSING', progress: n * 5, prompts: { total: 1, completed: 0, processing: 1, pending: 0, failed: 0 }, hasClarifications: false, clarificationCount: 0 },
});

test('events no longer retained: onResync with the snapshot, then only newer events', async () => {
  const sid = uniqueId('resync');
  const posted = await postEvents(server.url, sid, Array.from({ length: 10 }, (_, i) => progress(i + 1)));
  assert.equal(posted.lastSeq, 10);

  const client = new HeraldClient(server.url, { transports: ['websocket'] });
  try {
    const rec = recorder();
    const sub = client.subscribe(sid, rec.handlers, { lastSeq: 1 });
    await waitUntil(() => rec.resyncs.length === 1, 5000, 'onResync');
    const snap = rec.resyncs[0];
    assert.equal(snap.sessionId, sid);
    assert.equal(snap.lastSeq, 10);
    assert.equal(snap.progress, 50);
    assert.equal(snap.status, 'PROCESSING');
    assert.equal(rec.subscribed[0].recovered, false);
    assert.equal(rec.events.length, 0, 'nothing replayed or delivered before the snapshot');
    assert.equal(sub.lastSeq, 10);

    await postEvents(server.url, sid, [progress(11), progress(12)]);
    await waitUntil(() => rec.events.length === 2, 5000, 'seq 11 and 12');
    assert.deepEqual(rec.seqs(), [11, 12]);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(rec.resyncs.length, 1);
    assert.equal(rec.events.length, 2);
  } finally {
    client.close();
  }
});

test('a fresh subscribe whose start is no longer retained resyncs too', async () => {
  const sid = uniqueId('resync0');
  await postEvents(server.url, sid, Array.from({ length: 5 }, (_, i) => progress(i + 1)));
  const client = new HeraldClient(server.url, { transports: ['websocket'] });
  try {
    const rec = recorder();
    client.subscribe(sid, rec.handlers);
    await waitUntil(() => rec.resyncs.length === 1, 5000, 'onResync');
    assert.equal(rec.resyncs[0].lastSeq, 5);
    assert.equal(rec.events.length, 0);
  } finally {
    client.close();
  }
});
