// herald-client with auth on: `token` (a string or a function), HeraldAuthError, and
// reconnecting with a fresh token after herald expires the socket's token.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { HeraldAuthError, HeraldClient, HeraldError } from '../dist/index.js';
import { spawnHerald, waitUntil, uniqueId, recorder } from './helpers.mjs';

const SECRET = 'herald-js-auth-test-secret-0123456789';
const PUBLISH_KEY = 'js-publish-key-5c2e';
const ADMIN_KEY = 'js-admin-key-9d41';

let server;
const clients = [];
function newClient(opts = {}) {
  const c = new HeraldClient(server.url, { transports: ['websocket'], reconnectionDelay: 100, ...opts });
  clients.push(c);
  return c;
}

before(async () => {
  server = await spawnHerald([
    '--jwt-secret', SECRET,
    '--jwt-leeway-secs', '0', // a token expires exactly at its exp
    '--api-keys', `publisher:${PUBLISH_KEY}:publish,ops:${ADMIN_KEY}:admin`,
  ]);
});
after(async () => {
  for (const c of clients) c.close();
  const { code } = await server.stop();
  assert.equal(code, 0);
});

const b64url = (s) => Buffer.from(s).toString('base64url');
const now = () => Math.floor(Date.now() / 1000);

/** An HS256 JWT as herald (`--jwt-secret SECRET`) verifies it. */
function mint({ sub = 'alice', ttl = 60, exp, secret = SECRET, ...claims } = {}) {
  const body = { sub, iat: now(), exp: exp ?? now() + ttl, ...claims };
  const input = `${b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64url(JSON.stringify(body))}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

async function publish(sessionId, items, credential = PUBLISH_KEY) {
  const res = await fetch(`${server.url}/api/sessions/${encodeURIComponent(sessionId)}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${credential}` },
    body: JSON.stringify(items),
  });
  const body = await res.json();
  if (res.status !== 202) throw new Error(`ingest ${sessionId}: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

const progress = (n) => ({ event: 'progress', data: { status: 'PROCESSING', progress: n % 100, n } });

/** Posts one event every 20 ms until stopped. */
function producer(sessionId) {
  const p = { posted: 0, stopped: false };
  p.done = (async () => {
    while (!p.stopped) {
      await publish(sessionId, [progress(p.posted + 1)]);
      p.posted += 1;
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  p.stop = async () => {
    p.stopped = true;
    await p.done;
    return p.posted;
  };
  return p;
}

function assertContiguous(rec, what) {
  const seqs = rec.seqs();
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `${what}: seqs must be 1..n exactly once: ${seqs}`);
}

for (const transports of [['websocket'], ['polling']]) {
  test(`token function: after TOKEN_EXPIRED the client reconnects with a fresh token, gap-free (${transports})`, async () => {
    const firstExp = now() + 2;
    let calls = 0;
    const token = async () => {
      calls += 1;
      return calls === 1 ? mint({ exp: firstExp, sessions: ['team-*'] }) : mint({ sessions: ['team-*'] });
    };
    const authErrors = [];
    const client = newClient({ transports, token, onAuthError: (e) => authErrors.push(e) });
    const sid = uniqueId('team');
    const rec = recorder();
    client.subscribe(sid, rec.handlers);
    await waitUntil(() => rec.subscribed.length === 1, 5000, 'subscribed');
    const firstSocket = client.socket.id;
    const prod = producer(sid);
    let posted;
    try {
      await waitUntil(() => authErrors.length > 0, 6000, 'TOKEN_EXPIRED');
      const err = authErrors[0];
      assert.ok(err instanceof HeraldAuthError && err instanceof HeraldError, `typed error, got ${err}`);
      assert.equal(err.code, 'TOKEN_EXPIRED');
      assert.equal(err.status, 0);
      assert.ok(Date.now() / 1000 >= firstExp - 0.05, 'herald expired the socket before exp');
      await waitUntil(
        () => client.socket.connected && client.socket.id !== firstSocket && rec.subscribed.length >= 2,
        10000,
        'reconnected and re-subscribed',
      );
      assert.ok(calls >= 2, `the token function should be called again on reconnect (calls=${calls})`);
      const seen = rec.events.length;
      await waitUntil(() => rec.events.length >= seen + 5, 5000, 'live events after the refresh');
    } finally {
      posted = await prod.stop();
    }
    await waitUntil(() => rec.events.length === posted, 5000, `all ${posted} events`);
    assertContiguous(rec, 'across the token refresh');
    assert.deepEqual(authErrors.map((e) => e.code), ['TOKEN_EXPIRED']);
    assert.deepEqual(rec.errors, []);
    client.close();
  });
}

test('a fixed token: TOKEN_EXPIRED is reported and the client does not retry', async () => {
  const authErrors = [];
  const connectErrors = [];
  const client = newClient({ token: mint({ exp: now() + 2, sessions: ['team-*'] }), onAuthError: (e) => authErrors.push(e) });
  client.socket.on('connect_error', (e) => connectErrors.push(e));
  client.subscribe(uniqueId('team'), recorder().handlers);
  await waitUntil(() => authErrors.length > 0 && !client.socket.connected, 6000, 'expiry and disconnect');
  await new Promise((r) => setTimeout(r, 500)); // bounded negative wait: no reconnect attempt
  assert.equal(client.socket.connected, false);
  assert.equal(client.socket.active, false, 'no reconnection is scheduled');
  assert.deepEqual(authErrors.map((e) => e.code), ['TOKEN_EXPIRED']);
  assert.deepEqual(connectErrors, []);
  client.close();
});

const REFUSED = [
  ['no token', undefined, 'UNAUTHORIZED'],
  ['an unknown credential', 'not-a-credential', 'UNAUTHORIZED'],
  ['a malformed token', 'abc.def.ghi', 'INVALID_TOKEN'],
  ['a wrong signature', mint({ secret: 'another-secret', sessions: ['*'] }), 'INVALID_TOKEN'],
  ['an expired token', mint({ exp: now() - 5 }), 'TOKEN_EXPIRED'],
];

for (const [what, token, code] of REFUSED) {
  for (const transports of [['websocket'], ['polling']]) {
    test(`${what}: connect refused with HeraldAuthError ${code} (${transports})`, async () => {
      const authErrors = [];
      const connectErrors = [];
      const client = newClient({ transports, token, onAuthError: (e) => authErrors.push(e) });
      client.socket.on('connect_error', (e) => connectErrors.push(e));
      await waitUntil(() => authErrors.length > 0, 5000, 'onAuthError');
      const err = authErrors[0];
      assert.ok(err instanceof HeraldAuthError, `expected a HeraldAuthError, got ${err}`);
      assert.equal(err.code, code);
      assert.equal(err.status, 0);
      assert.ok(err.message.length > 5, err.message);
      // what plain socket.io-client code sees: the message starts with the code
      assert.ok(connectErrors[0].message.startsWith(`${code}: `), connectErrors[0].message);
      assert.equal(client.socket.connected, false);
      // HTTP calls with the same credential: the same code, with the status
      await assert.rejects(client.getSession(uniqueId('team')), (e) => {
        assert.ok(e instanceof HeraldAuthError, `HTTP: expected a HeraldAuthError, got ${e}`);
        assert.equal(e.status, 401);
        assert.equal(e.code, code);
        return true;
      });
      client.close();
    });
  }
}

test('a token function whose first token is refused is retried with backoff until one is accepted', async () => {
  let calls = 0;
  const token = () => {
    calls += 1;
    return calls === 1 ? mint({ exp: now() - 5 }) : mint({ sessions: ['team-*'] });
  };
  const authErrors = [];
  const client = newClient({ token, onAuthError: (e) => authErrors.push(e) });
  await waitUntil(() => client.socket.connected, 5000, 'connected with the second token');
  assert.deepEqual(authErrors.map((e) => e.code), ['TOKEN_EXPIRED']);
  assert.ok(calls >= 2);
  client.close();
});

test('a token function that throws: UNAUTHORIZED with the cause; HTTP calls reject with it', async () => {
  const failure = new Error('the token service is down');
  const authErrors = [];
  const client = newClient({ token: () => { throw failure; }, reconnection: false, onAuthError: (e) => authErrors.push(e) });
  await waitUntil(() => authErrors.length > 0, 5000, 'onAuthError');
  assert.equal(authErrors[0].code, 'UNAUTHORIZED');
  assert.equal(authErrors[0].cause, failure);
  assert.match(authErrors[0].message, /token service is down/);
  await assert.rejects(client.getSession('team-x'), (e) => e === failure);
  client.close();
});

test('a forbidden subscribe: onSubscribeError gets HeraldAuthError FORBIDDEN; the socket keeps its allowed sessions', async () => {
  const client = newClient({ token: mint({ sessions: ['team-*'] }) });
  const other = uniqueId('other');
  const sid = uniqueId('team');
  const denied = recorder();
  const allowed = recorder();
  client.subscribe(other, denied.handlers);
  client.subscribe(sid, allowed.handlers);
  await waitUntil(() => denied.errors.length === 1 && allowed.subscribed.length === 1, 5000, 'both answers');
  const err = denied.errors[0];
  assert.ok(err instanceof HeraldAuthError, `expected a HeraldAuthError, got ${JSON.stringify(err)}`);
  assert.equal(err.code, 'FORBIDDEN');
  assert.ok(client.socket.connected, 'herald keeps the socket');
  await publish(other, [progress(1)]);
  await publish(sid, [progress(1), progress(2)]);
  await waitUntil(() => allowed.events.length === 2, 5000, 'allowed events');
  assertContiguous(allowed, 'allowed session');
  assert.equal(denied.events.length, 0);
  client.close();
});

test('HTTP calls send the token (a function is asked before each call); 401 / 403 are HeraldAuthError', async () => {
  let calls = 0;
  const token = async () => {
    calls += 1;
    return mint({ sub: 'carol', scope: 'read create answer cancel' }); // no `sessions`: what carol owns
  };
  const client = newClient({ token, autoConnect: false });
  const snap = await client.createSession({ prompts: ['Explain [clarify] closures'], models: ['sim-slow'] });
  assert.equal((await client.getSession(snap.sessionId)).sessionId, snap.sessionId);
  await assert.rejects(client.respond(snap.sessionId, 'no-such-clarification', 'x'), (e) => {
    assert.ok(!(e instanceof HeraldAuthError), `authorized, so not an auth error: ${e}`);
    return e instanceof HeraldError && e.status >= 400;
  });
  const cancelled = await client.cancel(snap.sessionId);
  assert.equal(cancelled.status, 'FAILED');
  assert.equal(calls, 4, 'the token function runs before each HTTP call');

  const dave = newClient({ token: mint({ sub: 'dave' }), autoConnect: false });
  await assert.rejects(dave.getSession(snap.sessionId), (e) => e instanceof HeraldAuthError && e.status === 403 && e.code === 'FORBIDDEN');
  const anonymous = newClient({ autoConnect: false });
  await assert.rejects(anonymous.getSession(snap.sessionId), (e) => e instanceof HeraldAuthError && e.status === 401 && e.code === 'UNAUTHORIZED');
  const creator = newClient({ token: mint({ sub: 'erin' }), autoConnect: false }); // default scopes lack `create`
  await assert.rejects(
    creator.createSession({ prompts: ['hi'], models: ['sim-fast'] }),
    (e) => e instanceof HeraldAuthError && e.status === 403 && e.code === 'FORBIDDEN',
  );
  for (const c of [client, dave, anonymous, creator]) c.close();
});

test('token and socket.io auth together are refused', () => {
  assert.throws(() => new HeraldClient(server.url, { token: 't', auth: { token: 'u' }, autoConnect: false }), /either `token` or `auth`/);
});

test('the dev drop route with an admin key: a token function is asked again on socket.io-client reconnects', async () => {
  let calls = 0;
  const client = newClient({ token: () => { calls += 1; return mint({ sessions: ['team-*'] }); } });
  const sid = uniqueId('team');
  const rec = recorder();
  client.subscribe(sid, rec.handlers);
  await waitUntil(() => rec.subscribed.length === 1, 5000, 'subscribed');
  const res = await fetch(`${server.url}/api/dev/session/${sid}/drop-sockets`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_KEY}` },
  });
  assert.equal(res.status, 200);
  await waitUntil(() => rec.subscribed.length === 2, 10000, 're-subscribed after the drop');
  assert.equal(calls, 2);
  client.close();
});
