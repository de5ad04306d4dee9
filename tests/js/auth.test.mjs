// Auth with the real socket.io-client (SPEC §5): refusals reach `err.message` with their
// code, a forbidden subscribe leaves the socket connected and served, a live socket is told
// and disconnected when its token expires, an `auth` callback brings a fresh token on the
// next connect, and pages from other origins cannot open either transport.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import {
  spawnHerald, stopAndAssertClean, connect, waitFor, emitAck, post, uniqueId, sampleData,
  closeAll, safeJson,
} from './helpers.mjs';

const SECRET = 'js-auth-test-secret-0123456789';
const PUBLISH_KEY = 'js-publisher-secret';

const b64url = (value) => Buffer.from(value).toString('base64url');

/** An HS256 JWT; `claims` override sub/exp/aud. */
function sign(claims, secret = SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const body = { sub: 'alice', exp: now + 60, aud: 'herald', ...claims };
  const unsigned = `${b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64url(JSON.stringify(body))}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

/** Resolves with the `connect_error` a connection attempt ends in (fails if it connects). */
function refusal(socket) {
  return new Promise((resolve, reject) => {
    socket.once('connect', () => reject(new Error('connected, but a refusal was expected')));
    socket.once('connect_error', resolve);
  });
}

let server;
before(async () => {
  server = await spawnHerald(
    ['--jwt-audience', 'herald', '--jwt-leeway-secs', '0'],
    { env: { HERALD_JWT_SECRET: SECRET, HERALD_API_KEYS: `worker:${PUBLISH_KEY}:publish` } },
  );
});
after(async () => { await stopAndAssertClean(server); });

const publish = (sessionId, n) => post(server.url, sessionId,
  { event: 'progress', data: sampleData('progress', n) },
  { headers: { authorization: `Bearer ${PUBLISH_KEY}` } });

for (const transports of [['websocket'], ['polling']]) {
  const via = transports[0];
  describe(`handshake refusals (${via})`, () => {
    const now = Math.floor(Date.now() / 1000);
    const cases = [
      ['no token', undefined, 'UNAUTHORIZED: '],
      ['a malformed token', 'not.a.jwt', 'INVALID_TOKEN: '],
      ['a wrong signature', sign({}, 'another-secret'), 'INVALID_TOKEN: '],
      ['an expired token', sign({ exp: now - 10 }), 'TOKEN_EXPIRED: '],
      ['a wrong audience', sign({ aud: 'someone-else' }), 'INVALID_TOKEN: '],
    ];
    for (const [what, token, prefix] of cases) {
      test(`${what} is refused with ${prefix.trim()}`, async () => {
        const socket = connect(server.url, { transports, ...(token ? { auth: { token } } : {}) });
        try {
          const err = await refusal(socket);
          assert.ok(err.message.startsWith(prefix), `err.message: ${err.message}`);
        } finally {
          closeAll(socket);
        }
      });
    }
  });

  test(`a forbidden subscribe leaves the socket connected and served (${via})`, async () => {
    const allowed = uniqueId('allowed');
    const socket = connect(server.url, { transports, auth: { token: sign({ sessions: ['allowed*'] }) } });
    try {
      await waitFor(socket, 'connected');
      const denied = await emitAck(socket, 'subscribe', uniqueId('secret'));
      assert.equal(denied.ok, false, safeJson(denied));
      assert.equal(denied.error.code, 'FORBIDDEN');
      const error = await waitFor(socket, 'error');
      assert.equal(error.code, 'FORBIDDEN', safeJson(error));
      assert.ok(socket.connected, 'still connected');

      const ok = await emitAck(socket, 'subscribe', allowed);
      assert.equal(ok.ok, true, safeJson(ok));
      assert.equal((await publish(allowed, 1)).status, 202);
      const event = await waitFor(socket, 'progress', 5000, (p) => p.sessionId === allowed);
      assert.equal(event.seq, 1);
    } finally {
      closeAll(socket);
    }
  });

  test(`expiry disconnects a live socket, and an auth callback reconnects it (${via})`, async () => {
    const sessionId = uniqueId('expiry');
    let minted = 0;
    // The first token lives two seconds; every later one a minute.
    const auth = (cb) => {
      minted += 1;
      const exp = Math.floor(Date.now() / 1000) + (minted === 1 ? 2 : 60);
      cb({ token: sign({ exp, sessions: '*' }) });
    };
    const socket = connect(server.url, { transports, auth });
    try {
      await waitFor(socket, 'connected');
      assert.equal((await emitAck(socket, 'subscribe', sessionId)).ok, true);
      assert.equal((await publish(sessionId, 1)).status, 202);
      await waitFor(socket, 'progress', 5000, (p) => p.seq === 1);

      const expired = await waitFor(socket, 'error', 6000, (e) => e.code === 'TOKEN_EXPIRED');
      assert.ok(expired.error.length > 0);
      // Ended for good (a token that expired cannot reconnect as it is), having said why.
      assert.equal(await waitFor(socket, 'disconnect', 5000), 'io server disconnect');

      // What a front end does on TOKEN_EXPIRED: connect again; the callback mints afresh.
      socket.connect();
      await waitFor(socket, 'connected');
      assert.equal(minted, 2, 'the auth callback ran again');
      const again = await emitAck(socket, 'subscribe', { sessionId, lastSeq: 1 });
      assert.equal(again.ok, true, safeJson(again));
      assert.equal((await publish(sessionId, 2)).status, 202);
      await waitFor(socket, 'progress', 5000, (p) => p.seq === 2);
    } finally {
      closeAll(socket);
    }
  });
}

describe('origin check', () => {
  let strict;
  before(async () => {
    strict = await spawnHerald(['--cors-origins', 'https://app.example.com'], { dev: false });
  });
  after(async () => { await stopAndAssertClean(strict); });

  for (const transports of [['websocket'], ['polling']]) {
    test(`a page from another origin cannot connect (${transports[0]})`, async () => {
      const evil = connect(strict.url, { transports, extraHeaders: { origin: 'https://evil.example' } });
      const allowed = connect(strict.url, { transports, extraHeaders: { origin: 'https://app.example.com' } });
      try {
        const err = await refusal(evil);
        assert.ok(err, 'refused');
        await waitFor(allowed, 'connected');
      } finally {
        closeAll(evil, allowed);
      }
    });
  }
});
