// herald-client against the real herald binary.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { HeraldClient, HeraldError } from '../dist/index.js';
import { spawnHerald, waitUntil, postEvents, getJson, uniqueId, recorder } from './helpers.mjs';

let server;
const clients = [];
function newClient(opts = {}) {
  const c = new HeraldClient(server.url, { transports: ['websocket'], reconnectionDelay: 200, ...opts });
  clients.push(c);
  return c;
}

before(async () => { server = await spawnHerald(); });
after(async () => {
  for (const c of clients) c.close();
  const { code } = await server.stop();
  assert.equal(code, 0);
});

const ISO_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

function assertContiguous(rec, from = 1) {
  const seqs = rec.seqs();
  assert.deepEqual(seqs, seqs.map((_, i) => from + i), `seqs must be ${from}.. without gaps or duplicates: ${seqs}`);
}

test('subscribe: live events reach the typed handlers in order, onEvent sees each', async () => {
  const client = newClient();
  const sid = uniqueId('live');
  const rec = recorder();
  const all = [];
  const sub = client.subscribe(sid, { ...rec.handlers, onEvent: (ev) => all.push(ev) });
  await waitUntil(() => rec.subscribed.length === 1, 5000, 'subscribed');
  assert.equal(rec.subscribed[0].sessionId, sid);
  assert.equal(rec.subscribed[0].lastSeq, 0);

  await postEvents(server.url, sid, [
    { event: 'progress', data: { status: 'PROCESSING', progress: 10, prompts: { total: 1, completed: 0, processing: 1, pending: 0, failed: 0 }, hasClarifications: false, clarificationCount: 0 } },
    { event: 'model_result', data: { promptId: 'p1', modelName: 'm', provider: 'simulated', duration: 5, result: 'hi', status: 'completed' } },
    { event: 'clarification', data: { clarificationId: 'c-1', question: 'Which?', status: 'pending' } },
    { event: 'error', data: { error: 'model m failed', code: 'MODEL_FAILED' } },
    { event: 'completed', data: { result: { answer: 42 }, extra: 'kept' } },
  ]);
  await waitUntil(() => rec.events.length === 5, 5000, '5 events');
  assert.deepEqual(rec.events.map((x) => x.kind), ['progress', 'modelResult', 'clarification', 'error', 'completed']);
  assertContiguous(rec);
  assert.deepEqual(all.map((x) => x.event), ['progress', 'model_result', 'clarification', 'error', 'completed']);
  const [p, m, c, e, done] = rec.events.map((x) => x.e);
  assert.equal(p.status, 'PROCESSING');
  assert.equal(p.progress, 10);
  assert.equal(p.prompts.total, 1);
  assert.equal(m.modelName, 'm');
  assert.equal(m.result, 'hi');
  assert.equal(c.clarificationId, 'c-1');
  assert.equal(e.code, 'MODEL_FAILED');
  assert.deepEqual(done.result, { answer: 42 });
  assert.equal(done.extra, 'kept');
  for (const { e: ev } of rec.events) {
    assert.equal(ev.sessionId, sid);
    assert.match(ev.timestamp, ISO_MS);
  }
  assert.equal(sub.lastSeq, 5);

  // After unsubscribe nothing more is delivered.
  sub.unsubscribe();
  assert.equal(client.subscriptionCount, 0);
  await postEvents(server.url, sid, { event: 'error', data: { error: 'late' } }, '?reopen=true');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(rec.events.length, 5);
});

test('late subscribe to a finished orchestrated session gets the whole run', async () => {
  const client = newClient();
  const snap = await client.createSession({ prompts: ['What is a monad?', 'Explain closures'], models: ['sim-fast'] });
  assert.equal(typeof snap.sessionId, 'string');
  await waitUntil(async () => (await client.getSession(snap.sessionId)).status === 'COMPLETED', 20000, 'COMPLETED');
  const final = await client.getSession(snap.sessionId);

  const rec = recorder();
  client.subscribe(snap.sessionId, rec.handlers);
  await waitUntil(() => rec.events.length === final.lastSeq, 10000, `${final.lastSeq} events`);
  assertContiguous(rec);
  assert.equal(rec.events[0].kind, 'progress');
  assert.equal(rec.last().kind, 'completed');
  assert.equal(rec.resyncs.length, 0);
  const results = rec.events.filter((x) => x.kind === 'modelResult' && x.e.status === 'completed');
  assert.equal(results.length, 2);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(rec.events.length, final.lastSeq, 'no duplicates after the replay');
});

for (const transports of [['websocket'], ['polling', 'websocket']]) {
test(`forced server-side disconnects mid-run (${transports.join('+')}): every seq exactly once, in order, ending with completed`, async () => {
  const client = newClient({ transports });
  const connects = [];
  client.socket.on('connect', () => connects.push(Date.now()));
  const disconnects = [];
  client.socket.on('disconnect', (reason) => disconnects.push(reason));

  const snap = await client.createSession({
    prompts: ['Explain [clarify] closures', 'What is a monad?'],
    models: ['sim-slow', 'sim-fast'],
  });
  const sid = snap.sessionId;
  const rec = recorder();
  client.subscribe(sid, rec.handlers);

  // 1st drop: while the run is going and a clarification is pending.
  await waitUntil(() => rec.events.some((x) => x.kind === 'clarification' && x.e.status === 'pending'), 15000, 'a pending clarification');
  let dropped = await fetch(`${server.url}/api/dev/session/${sid}/drop-sockets`, { method: 'POST' }).then((r) => r.json());
  assert.ok(dropped.dropped >= 1, `dropped ${JSON.stringify(dropped)}`);
  await waitUntil(() => disconnects.length >= 1, 5000, 'the disconnect');
  await waitUntil(() => client.socket.connected && rec.subscribed.length >= 2, 10000, 'reconnect + resubscribe');

  // Answer each pending clarification as it arrives (each model asks its own); drop the
  // sockets once more after the first answer, while the slow model is still writing.
  const answered = new Set();
  let secondDrop = null;
  await waitUntil(async () => {
    for (const { kind, e } of rec.events) {
      if (kind === 'clarification' && e.status === 'pending' && !answered.has(e.clarificationId)) {
        answered.add(e.clarificationId);
        await client.respond(sid, e.clarificationId, 'the basics');
        if (!secondDrop) {
          secondDrop = await fetch(`${server.url}/api/dev/session/${sid}/drop-sockets`, { method: 'POST' }).then((r) => r.json());
        }
      }
    }
    return rec.events.some((x) => x.kind === 'completed');
  }, 40000, 'completed');
  assert.ok(answered.size >= 1);
  assert.ok(secondDrop && secondDrop.dropped >= 1, `second drop: ${JSON.stringify(secondDrop)}`);
  assert.ok(disconnects.length >= 2, `disconnects: ${disconnects}`);
  const final = await client.getSession(sid);
  assert.equal(final.status, 'COMPLETED');
  await new Promise((r) => setTimeout(r, 300));
  assertContiguous(rec);
  assert.equal(rec.events.length, final.lastSeq);
  assert.equal(rec.last().kind, 'completed');
  assert.ok(connects.length >= 2, `reconnected (${connects.length} connects, disconnects: ${disconnects})`);
  // herald drops the transport, as a network failure would: socket.io-client reconnects by itself.
  assert.equal(disconnects[0], 'transport close');
  assert.equal(rec.resyncs.length, 0);
  // Every resubscribe after the first carried the last seq seen.
  assert.ok(rec.subscribed.every((s) => s.recovered !== false));
  // The history agrees, event for event.
  const hist = await getJson(server.url, `/api/wizard/session/${sid}/events?after=0&limit=1000`);
  const kinds = { progress: 'progress', model_result: 'modelResult', clarification: 'clarification', completed: 'completed', error: 'error' };
  assert.deepEqual(rec.events.map((x) => x.kind), hist.body.events.map((e) => kinds[e.event]));
});
}

test('respond, cancel and HeraldError codes', async () => {
  const client = newClient();

  await assert.rejects(client.getSession('no-such-session'), (err) => {
    assert.ok(err instanceof HeraldError);
    assert.equal(err.status, 404);
    assert.equal(err.code, 'SESSION_NOT_FOUND');
    assert.ok(err.message.length > 0);
    return true;
  });
  await assert.rejects(client.createSession({ prompts: ['x'], models: ['no-such-model'] }),
    (err) => err instanceof HeraldError && err.status === 400 && err.code === 'UNKNOWN_MODEL');
  await assert.rejects(client.createSession({ prompts: [] }),
    (err) => err instanceof HeraldError && err.status === 400 && err.code === 'INVALID_REQUEST');

  // respond
  const a = await client.createSession({ prompts: ['Explain [clarify] monads'], models: ['sim-fast'] });
  const rec = recorder();
  client.subscribe(a.sessionId, rec.handlers);
  const ask = await waitUntil(() => rec.events.find((x) => x.kind === 'clarification' && x.e.status === 'pending'), 15000, 'clarification');
  const cid = ask.e.clarificationId;
  await assert.rejects(client.respond(a.sessionId, 'no-such-clarification', 'x'),
    (err) => err instanceof HeraldError && err.status === 404 && err.code === 'CLARIFICATION_NOT_FOUND');
  const ok = await client.respond(a.sessionId, cid, 'the basics');
  assert.equal(ok.ok, true);
  assert.equal(ok.clarificationId, cid);
  await assert.rejects(client.respond(a.sessionId, cid, 'again'),
    (err) => err instanceof HeraldError && err.status === 409 && err.code === 'CLARIFICATION_CLOSED');
  await waitUntil(() => rec.events.some((x) => x.kind === 'completed'), 20000, 'completed');
  const answered = rec.events.find((x) => x.kind === 'clarification' && x.e.status === 'answered');
  assert.equal(answered.e.answer, 'the basics');
  const done = rec.last().e;
  assert.match(JSON.stringify(done.result), /clarified: the basics/);

  // cancel
  const b = await client.createSession({ prompts: ['Explain [clarify] closures'], models: ['sim-slow'] });
  const recB = recorder();
  client.subscribe(b.sessionId, recB.handlers);
  await waitUntil(() => recB.events.some((x) => x.kind === 'clarification'), 15000, 'clarification (b)');
  const cancelled = await client.cancel(b.sessionId);
  assert.equal(cancelled.status, 'FAILED');
  await waitUntil(() => recB.events.some((x) => x.kind === 'error'), 5000, 'error CANCELLED');
  assert.equal(recB.last().e.code, 'CANCELLED');
  assertContiguous(recB);
  await assert.rejects(client.cancel(b.sessionId),
    (err) => err instanceof HeraldError && err.status === 409 && err.code === 'SESSION_ENDED');
  await assert.rejects(client.cancel('no-such-session'),
    (err) => err instanceof HeraldError && err.status === 404 && err.code === 'SESSION_NOT_FOUND');
});

test('a refused subscribe reaches onSubscribeError', async () => {
  const client = newClient();
  const rec = recorder();
  client.subscribe('-bad id-', rec.handlers);
  await waitUntil(() => rec.errors.length === 1, 5000, 'subscribe error');
  assert.equal(rec.errors[0].code, 'INVALID_SESSION_ID');
});

test('HTTP network failure is a HeraldError with status 0', async () => {
  const client = new HeraldClient('http://127.0.0.1:1', { autoConnect: false });
  await assert.rejects(client.getSession('x'), (err) => err instanceof HeraldError && err.status === 0 && err.code === 'NETWORK_ERROR');
  client.close();
});
